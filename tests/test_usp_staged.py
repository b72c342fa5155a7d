"""``usp_attention_staged`` in real multi-process gloo runs.

Q, K, V come from three separate projections of one input (as in a FLUX block); every rank checks:
the staged output is bitwise equal to ``usp_attention`` on the same tensors (also with FP8
communication) and, without FP8, within ``test_usp``'s tolerance of the float64 reference; the
all-to-alls are issued in the staged order (V's before Q is projected, Q's before K is projected,
the output's before ``after`` runs); a projection of the wrong shape raises the same ``ValueError``
on every rank; the staged call traces with ``torch.compile(fullgraph=True)`` in one graph and the
compiled output equals eager. ``test_usp_nccl`` runs the worker on 2 GPUs under CUDA graphs.
"""
import random

import pytest
import torch
from test_usp import TOL

from fastusp_xdit import layout
from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.usp.verify import reference_attention


def _setup(case):
    """Global input and projection weights from the seed; this rank's shard; the groups."""
    from fastusp_xdit.usp.groups import usp_groups

    u, r, b, h, s, d = (case[k] for k in ("ulysses", "ring", "batch", "heads", "seq", "head_dim"))
    g = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    cuda = case.get("device") == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    x = torch.randn(b, s, 8, generator=g).to(device)
    weights = [(torch.randn(8, h * d, generator=g) / 8**0.5).to(device) for _ in range(3)]
    joint = [torch.randn(b, h, case["joint_len"], d, generator=g).to(device, dtype) for _ in range(3)] \
        if case["joint"] else [None] * 3
    groups = usp_groups(u, r, device_type=device.type)
    sp_rank = (0 if groups[1] is None else groups[1].rank()) * u + (0 if groups[0] is None else groups[0].rank())
    return x, weights, joint, groups, sp_rank, dtype


def _project(x, w, case, dtype):
    return (x @ w).to(dtype).unflatten(-1, (case["heads"], -1)).transpose(1, 2)


def staged_worker(cases):
    from fastusp_xdit.usp import steps as usp_module
    from fastusp_xdit.usp import usp_attention
    from fastusp_xdit.usp.staged import usp_attention_staged

    out = []
    for case in cases:
        x, (wq, wk, wv), (jq, jk, jv), (ug, rg), sp_rank, dtype = _setup(case)
        x_loc = layout.shard(x, 1, sp_rank, case["ulysses"], case["ring"])
        events = []
        issue = usp_module.all_to_all

        def record(*args, **kwargs):
            events.append("a2a")
            return issue(*args, **kwargs)

        def proj(name, w, x=x_loc):
            def fn():
                events.append(name)
                out = _project(x, w, case, dtype)
                return out[..., :case.get("wrong_len"), :] if name == "q" else out  # wrong_len: a bad Q
            return fn

        kwargs = dict(ulysses_group=ug, ring_group=rg, seq_len=case["seq"], joint_query=jq, joint_key=jk,
                      joint_value=jv, joint_strategy=case["joint"], fp8=case["fp8"])
        usp_module.all_to_all = record
        try:
            staged, extra = usp_attention_staged(proj("v", wv), proj("q", wq), proj("k", wk),
                                                 after=lambda: events.append("after") or "done", **kwargs)
        except ValueError as e:
            out.append({"error": str(e)})
            continue
        finally:
            usp_module.all_to_all = issue
        plain = usp_attention(proj("q", wq)(), proj("k", wk)(), proj("v", wv)(), seq_len_q=case["seq"],
                              seq_len_kv=case["seq"], **{k: v for k, v in kwargs.items() if k != "seq_len"})
        full = [_project(x, w, case, dtype).cpu() for w in (wq, wk, wv)]
        jq, jk, jv = (None if t is None else t.cpu() for t in (jq, jk, jv))
        q_ref = layout.shard(full[0], 2, sp_rank, case["ulysses"], case["ring"])
        keys, values = full[1], full[2]
        if jq is not None:
            q_ref = torch.cat([jq, q_ref] if case["joint"] == "front" else [q_ref, jq], 2)
            keys, values = torch.cat([jk, keys], 2), torch.cat([jv, values], 2)
        ref = reference_attention(q_ref, keys, values)
        # scaled by the whole output's largest element, as fastusp_xdit.usp.verify does (a rank may own one small row)
        whole = reference_attention(full[0] if jq is None else torch.cat([jq, full[0]], 2), keys, values)
        res = {"equal": torch.equal(staged, plain), "extra": extra, "events": events[:events.index("after") + 1]}
        res["err"] = ((staged.cpu().double() - ref).abs().max() / whole.abs().max()).item() if ref.numel() else 0.0
        if case.get("compile"):
            from torch import _dynamo

            def f(x_loc):
                return usp_attention_staged(proj("v", wv, x_loc), proj("q", wq, x_loc), proj("k", wk, x_loc),
                                            after=lambda: x_loc.sum(), **kwargs)

            explain = _dynamo.explain(f)(x_loc)
            _dynamo.reset()
            compiled = torch.compile(f, fullgraph=True, backend=case.get("compiler", "aot_eager"),
                                     **({"mode": case["compile_mode"]} if "compile_mode" in case else {}))
            for _ in range(3):  # with mode="reduce-overhead": warm-up, CUDA-graph record, replay
                got = compiled(x_loc)[0].clone()
            err = ((got.double() - staged.double()).abs().max() / staged.double().abs().max()).item() \
                if staged.numel() else 0.0  # a rank may hold no rows
            res.update(breaks=explain.graph_break_count, graphs=explain.graph_count,
                       compiled_equal=torch.equal(got, staged), compile_err=err)
        out.append(res)
    return out


def _case(rng, ulysses, ring, **over):
    joint = rng.choice([None, "front", "rear"])
    dtype = rng.choice(["float32", "bfloat16"])
    case = dict(ulysses=ulysses, ring=ring, batch=rng.randint(1, 2), heads=rng.randint(ulysses, ulysses + 3),
                seq=rng.randint(1, 5 * ulysses * ring + 3), head_dim=rng.choice([8, 16]), dtype=dtype, joint=joint,
                joint_len=rng.randint(1, 4) if joint else 0,
                fp8=rng.choice([None, "qvo,k"]) if dtype == "bfloat16" else None, seed=rng.randrange(2**31))
    case.update(over)
    return case


def _expected_events(ulysses: int) -> list:
    return ["v", "a2a", "q", "a2a", "k", "a2a", "a2a", "after"] if ulysses > 1 else ["v", "q", "k", "after"]


@pytest.mark.parametrize("world,shapes", [(2, [(2, 1), (1, 2)]), (3, [(3, 1)]), (4, [(2, 2), (4, 1)])])
def test_staged_equals_usp_attention(world, shapes, seed):
    rng = random.Random(seed)
    cases = [_case(rng, u, r) for u, r in shapes for _ in range(3)]
    failures = []
    for rank, results in enumerate(run_distributed(staged_worker, world, cases, timeout=60 + 30 * world)):
        for case, res in zip(cases, results):
            if "error" in res:
                failures.append(f"rank {rank}: {res['error']} for {case}")
                continue
            if not res["equal"]:
                failures.append(f"rank {rank}: staged != usp_attention for {case}")
            if not case["fp8"] and not res["err"] <= TOL[case["dtype"]]:  # FP8: equality above (test_usp_fp8 bounds it)
                failures.append(f"rank {rank}: error {res['err']:.3g} vs float64 for {case}")
            if res["extra"] != "done" or res["events"] != _expected_events(case["ulysses"]):
                failures.append(f"rank {rank}: order {res['events']}, after() -> {res['extra']!r} for {case}")
    assert not failures, f"seed={seed}\n" + "\n".join(failures)


def test_staged_compiles_whole(seed):
    rng = random.Random(seed)
    cases = [_case(rng, 2, 1, compile=True, fp8=None), _case(rng, 1, 2, compile=True, fp8=None)]
    for rank, results in enumerate(run_distributed(staged_worker, 2, cases, timeout=240)):
        for case, res in zip(cases, results):
            assert res["breaks"] == 0 and res["graphs"] == 1, f"rank {rank}: {res} for {case}"
            assert res["compiled_equal"], f"rank {rank}: compiled != eager for {case}"


def test_staged_rejects_mismatched_projection_on_every_rank(seed):
    rng = random.Random(seed)
    cases = [_case(rng, u, r, seq=8, wrong_len=-1) for u, r in ((2, 1), (1, 2))]
    for rank, results in enumerate(run_distributed(staged_worker, 2, cases, timeout=60)):
        for res in results:
            assert "query_fn returned" in res.get("error", ""), f"rank {rank}: {res}"
