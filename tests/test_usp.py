"""USP equivalence in real multi-process gloo runs: every (ulysses, ring) factorization of 2, 3, 4, 8.

Each spawned job runs many cases (randomized shapes drawn from a fresh seed: odd lengths, odd head
counts, GQA, joint front/rear, Sq != Skv, batch 2, shards shorter than the world; the canonical case
of each factorization runs one head group, the random ones 2 or 3 pipelined head groups) and every rank
compares its output rows with a float64 single-process reference.
"""
import random

import pytest

from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.usp.verify import run_cases

TOL = {"float32": 1e-5, "bfloat16": 1e-2}


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def random_cases(world: int, seed: int, per_factorization: int, sp_sizes=None) -> list:
    """Canonical (even) case plus random ones for each (ulysses, ring) with ulysses*ring in sp_sizes."""
    rng = random.Random(seed)
    cases = []
    for sp in sp_sizes or [world]:
        for u in _divisors(sp):
            r = sp // u
            cases.append(dict(ulysses=u, ring=r, batch=1, heads=2 * u, kv_heads=2 * u, seq_q=8 * sp, seq_kv=8 * sp,
                              head_dim=16, dtype="float32", seed=rng.randrange(2**31)))
            for i in range(per_factorization):
                heads = rng.randint(u, u + 3)
                joint = rng.choice([None, "front", "rear"])
                cases.append(dict(
                    ulysses=u, ring=r, batch=rng.choice([1, 2]), heads=heads,
                    kv_heads=rng.choice([d for d in _divisors(heads)]),
                    seq_q=rng.randint(1, 4 * sp + 3), seq_kv=rng.randint(1, 4 * sp + 3),
                    head_dim=rng.choice([8, 16]), dtype=rng.choice(["float32", "bfloat16"]),
                    joint=joint, joint_len=rng.randint(1, 5) if joint else 0, head_groups=2 + i % 2,
                    seed=rng.randrange(2**31)))
    return cases


def _check(results_per_rank, seed):
    failures = []
    for rank, results in enumerate(results_per_rank):
        for res in results:
            case = res["case"]
            if not res["err"] <= TOL[case["dtype"]]:
                failures.append(f"rank {rank}: err {res['err']:.3g} > {TOL[case['dtype']]} for {case}")
            if case.get("compile"):
                if res["graph_breaks"] != 0 or res["graphs"] != 1:
                    failures.append(f"rank {rank}: {res['graph_breaks']} graph breaks, {res['graphs']} graphs: {case}")
                if not res["compile_err"] <= 1e-6:
                    failures.append(f"rank {rank}: compiled != eager ({res['compile_err']:.3g}): {case}")
    assert not failures, f"seed={seed}\n" + "\n".join(failures)


@pytest.mark.parametrize("world,per_factorization,timeout", [(2, 6, 120), (3, 4, 120), (4, 3, 180), (8, 1, 300)])
def test_usp_matches_single_process_reference(world, per_factorization, timeout, seed):
    cases = random_cases(world, seed, per_factorization)
    _check(run_distributed(run_cases, world, cases, timeout=timeout), seed)


def test_replicated_groups_per_cfg_or_dp_replica(seed):
    """World 4 split into 2 replicas of sequence-parallel size 2 (as with CFG or data parallel)."""
    cases = random_cases(4, seed, 2, sp_sizes=[2])
    _check(run_distributed(run_cases, 4, cases, timeout=180), seed)


@pytest.mark.parametrize("world,factorizations", [(2, [(2, 1, 3), (1, 2, 1)]), (4, [(2, 2, 2)])])
def test_compiles_fullgraph_with_zero_graph_breaks(world, factorizations, seed):
    rng = random.Random(seed)
    cases = [dict(ulysses=u, ring=r, batch=1, heads=3 * u, kv_heads=3 * u, seq_q=5 * world + 1, seq_kv=4 * world - 1,
                  head_dim=8, dtype="float32", joint=rng.choice(["front", "rear"]), joint_len=3,
                  head_groups=hg, seed=rng.randrange(2**31), compile=True) for u, r, hg in factorizations]
    _check(run_distributed(run_cases, world, cases, timeout=300), seed)


def recompile_job(steps: list) -> list:
    """One compiled ``usp_attention`` called with changing lengths and head groups (Dynamo then makes
    the changed sizes dynamic: every host-side size must still trace); error vs float64 per call."""
    import torch
    import torch.distributed as dist

    from fastusp_xdit import layout, usp_attention
    from fastusp_xdit.usp.groups import usp_groups
    from fastusp_xdit.usp.verify import reference_attention

    compiled, groups, errs = torch.compile(usp_attention, fullgraph=True, backend="aot_eager"), {}, []
    for u, r, hg, s in steps:
        ug, rg = groups.setdefault((u, r), usp_groups(u, r))
        q, k, v = (torch.randn(1, 6, s, 16, generator=torch.Generator().manual_seed(s + i)) for i in range(3))
        got = compiled(*(layout.shard(t, 2, dist.get_rank(), u, r) for t in (q, k, v)), ulysses_group=ug,
                       ring_group=rg, seq_len_q=s, seq_len_kv=s, head_groups=hg)
        want = layout.shard(reference_attention(q, k, v), 2, dist.get_rank(), u, r)
        errs.append((got.double() - want).abs().max().item())
    return errs


def test_compiled_call_survives_new_lengths_and_head_groups():
    steps = [(2, 1, 2, 64), (2, 1, 3, 81), (1, 2, 1, 64), (1, 2, 1, 70)]
    for rank, errs in enumerate(run_distributed(recompile_job, 2, steps, timeout=300)):
        assert max(errs) <= 1e-5, f"rank {rank}: {list(zip(steps, errs))}"
