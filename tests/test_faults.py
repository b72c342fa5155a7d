"""Faults with real processes: a failing or stalled rank, and ranks called with different configurations.

(a) A rank whose local attention raises (or stalls) after the first collective of a call: every other
rank finishes or fails within a bounded time, nobody hangs, and the harness's ``WorkerError`` names
the failed rank with its own error. Each rank writes its outcome (and when it happened) to a file,
so a rank the harness had to kill shows up as a missing file.
(b) One rank passes another global length, local length, dtype, FP8 spec, joint strategy, head
count or head_dim: the cross-rank check (:mod:`fastusp_xdit.usp.consistency`) raises the same
``ValueError`` on every rank, naming the field and the ranks, before any data collective.
"""
import json
import os
import time

import pytest

from fastusp_xdit.apps.launch import WorkerError, run_distributed

COLLECTIVE_TIMEOUT = 3.0  # s; gloo's own timeout for every collective in these jobs
SLACK = 4.0  # s; scheduling slack on 2 shared cores


def fault_worker(u: int, r: int, bad_rank: int, fault: str, out_dir: str):
    """A healthy usp_attention call, then one in which the local attention of ``bad_rank`` (reached after
    the call's first collective) raises (``"raise"``) or never returns (``"stall"``). Writes this rank's
    outcome ``{"status": "ok"|"error", "t": wall clock, "msg"}`` to ``out_dir/rank<N>.json``."""
    import torch
    import torch.distributed as dist

    import fastusp_xdit.usp.steps as steps
    from fastusp_xdit.usp import usp_attention
    from fastusp_xdit.usp.groups import usp_groups

    torch.manual_seed(0)
    rank = dist.get_rank()
    ug, rg = usp_groups(u, r)
    q, k, v = (torch.randn(1, 2 * u, 3, 8) for _ in range(3))
    usp_attention(q, k, v, ulysses_group=ug, ring_group=rg)  # a healthy call first (and the consistency check)
    if rank == bad_rank:
        def broken(*_args, **_kwargs):
            with open(os.path.join(out_dir, "injected"), "w") as f:
                f.write(str(time.time()))
            if fault == "stall":
                time.sleep(3600)
            raise RuntimeError(f"injected fault on rank {rank}")
        steps.local_attention = broken
    dist.barrier()
    try:
        usp_attention(q, k, v, ulysses_group=ug, ring_group=rg)
        outcome = {"status": "ok", "t": time.time(), "msg": ""}
    except Exception as e:  # noqa: BLE001 - the outcome is the test's evidence
        outcome = {"status": "error", "t": time.time(), "msg": f"{type(e).__name__}: {e}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    if outcome["status"] == "error":
        raise RuntimeError(outcome["msg"])


def _outcomes(out_dir, world):
    found = {}
    for rank in range(world):
        path = os.path.join(out_dir, f"rank{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                found[rank] = json.load(f)
    return found


@pytest.mark.parametrize("u,r,bad_rank,fault", [(2, 1, 1, "raise"), (1, 2, 0, "raise"), (2, 2, 3, "raise"),
                                                pytest.param(1, 4, 2, "raise", marks=pytest.mark.slow),
                                                (2, 1, 0, "stall")])
def test_failed_rank_makes_peers_fail_fast(u, r, bad_rank, fault, tmp_path):
    world = u * r
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        run_distributed(fault_worker, world, u, r, bad_rank, fault, str(tmp_path), timeout=120,
                        collective_timeout=COLLECTIVE_TIMEOUT)
    wall = time.monotonic() - t0
    message = str(info.value)
    with open(tmp_path / "injected") as f:
        injected = float(f.read())
    outcomes = _outcomes(tmp_path, world)
    summary = f"outcomes={outcomes} injected={injected} wall={wall:.1f}s\n{message[-3000:]}"
    if fault == "raise":
        assert f"rank {bad_rank} of {world} failed:" in message, summary
        assert f"injected fault on rank {bad_rank}" in message, summary
        assert outcomes[bad_rank]["status"] == "error", summary
    # Every rank but a stalled one reported, within the bound; the faulty rank's Ulysses peers cannot finish.
    ulysses_peers = {bad_rank - bad_rank % u + i for i in range(u)} - {bad_rank}
    for rank in set(range(world)) - ({bad_rank} if fault == "stall" else set()):
        assert rank in outcomes, f"rank {rank} never reported (hung and was killed): {summary}"
        assert outcomes[rank]["t"] - injected <= COLLECTIVE_TIMEOUT + SLACK, f"rank {rank} was slow: {summary}"
        if rank in ulysses_peers or fault == "stall":
            assert outcomes[rank]["status"] == "error", f"rank {rank} should have failed: {summary}"
            assert f"rank {rank} of {world} failed:" in message, summary
    assert wall < 60, summary


def _call(case: str, odd: bool, sp_rank: int, n: int):
    """Inputs and options of ``case`` on sequence-parallel rank ``sp_rank`` of ``n``; ``odd``: this
    rank deviates. Global length ``3n + 1`` (uneven shards), 4 heads, head_dim 8."""
    import torch

    from fastusp_xdit.layout import shard_sizes

    total, heads, head_dim, dtype = 3 * n + 1, 4, 8, torch.float32
    s_q = s_kv = shard_sizes(total, n, 1)[sp_rank]
    kw = dict(seq_len_q=total, seq_len_kv=total)
    if case == "seq_len":  # the same shards, another global length
        kw["seq_len_q"] = total + odd
    elif case == "local_len":  # no global length given: the shard lengths imply 3n vs 4n
        del kw["seq_len_q"]
        s_q = 4 if odd else 3
    elif case == "local_len_given":  # the global length agrees, this rank's shard does not
        s_kv += odd
    elif case == "dtype":
        dtype = torch.bfloat16 if odd else torch.float32
    elif case == "fp8":
        dtype, kw["fp8"] = torch.bfloat16, "qvo,k" if odd else "qvo"
    elif case == "joint_strategy":
        kw.update(joint_strategy="rear" if odd else "front",
                  **{f"joint_{x}": torch.randn(1, heads, 2, head_dim) for x in ("query", "key", "value")})
    elif case == "head_groups":  # another split of the same heads: mismatched collectives
        kw["head_groups"] = 2 if odd else 1
    elif case == "heads":
        heads += 2 * odd
    elif case == "head_dim":
        head_dim += 8 * odd
    q = torch.randn(1, heads, s_q, head_dim, dtype=dtype)
    k, v = (torch.randn(1, heads, s_kv, head_dim, dtype=dtype) for _ in range(2))
    return (q, k, v), kw


def mismatch_worker(u: int, r: int, odd_rank: int, cases: list, mode):
    """Run each case with ``FASTUSP_CHECK_CONSISTENCY=mode`` (None: unset); rank ``odd_rank`` deviates.
    Returns, per case, ``(exception type, message)`` or ``("ok", "")``."""
    import torch
    import torch.distributed as dist

    from fastusp_xdit import usp_attention
    from fastusp_xdit.usp.groups import usp_groups

    torch.manual_seed(dist.get_rank())
    if mode is None:
        os.environ.pop("FASTUSP_CHECK_CONSISTENCY", None)
    else:
        os.environ["FASTUSP_CHECK_CONSISTENCY"] = mode
    ug, rg = usp_groups(u, r)
    sp_rank = (0 if rg is None else rg.rank()) * u + (0 if ug is None else ug.rank())
    results = []
    for case in cases:
        (q, k, v), kw = _call(case, dist.get_rank() == odd_rank, sp_rank, u * r)
        try:
            usp_attention(q, k, v, ulysses_group=ug, ring_group=rg, **kw)
            results.append(("ok", ""))
        except Exception as e:  # noqa: BLE001 - the outcome is the test's evidence
            results.append((type(e).__name__, str(e)))
    return results


MISMATCH_FIELDS = {"seq_len": "seq_len_q differs", "local_len": "seq_len_q differs",
                   "local_len_given": "key/value tokens where seq_len_kv=",
                   "dtype": "dtype_q differs", "fp8": "wire differs", "joint_strategy": "joint_strategy differs",
                   "heads": "heads_q differs", "head_dim": "head_dim differs", "head_groups": "head_groups differs"}


def _check_mismatches(per_rank, cases, odd_rank):
    failures = []
    for i, case in enumerate(cases):
        got = [results[i] for results in per_rank]
        kinds, messages = {g[0] for g in got}, {g[1] for g in got}
        if kinds != {"ValueError"} or len(messages) != 1:
            failures.append(f"{case}: not the same ValueError on every rank: {got}")
            continue
        message = messages.pop()
        if MISMATCH_FIELDS[case] not in message or f"[{odd_rank}]" not in message:
            failures.append(f"{case}: message does not name the field/rank {odd_rank}: {message}")
    assert not failures, "\n".join(failures)


def test_mismatched_configurations_raise_on_every_rank():
    cases = list(MISMATCH_FIELDS)
    _check_mismatches(run_distributed(mismatch_worker, 2, 2, 1, 1, cases, "1", timeout=120,
                                      collective_timeout=20), cases, 1)


def test_mismatch_across_ulysses_and_ring_groups():
    """2 x 2: rank 3 shares neither group with rank 0; the two-stage gather still reaches everyone."""
    cases = ["seq_len", "fp8", "joint_strategy", "local_len_given"]
    _check_mismatches(run_distributed(mismatch_worker, 4, 2, 2, 3, cases, "1", timeout=180,
                                      collective_timeout=30), cases, 3)


def test_first_call_is_checked_by_default_and_0_disables():
    """Env unset: the first call is checked, later calls are not; ``0``: never checked (a joint-strategy
    mismatch then goes through silently: it changes no split size)."""
    per_rank = run_distributed(mismatch_worker, 2, 2, 1, 1, ["joint_strategy", "joint_strategy"], None,
                               timeout=120, collective_timeout=20)
    assert [res[0][0] for res in per_rank] == ["ValueError"] * 2, per_rank
    assert [res[1][0] for res in per_rank] == ["ok"] * 2, per_rank
    per_rank = run_distributed(mismatch_worker, 2, 2, 1, 1, ["joint_strategy"], "0", timeout=120,
                               collective_timeout=20)
    assert [res[0][0] for res in per_rank] == ["ok"] * 2, per_rank
