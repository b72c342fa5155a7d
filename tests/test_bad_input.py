"""Bad input to ``usp_attention`` in real multi-process runs.

* The same bad input on every rank: every rank raises the same ``ValueError`` (naming the fix)
  before any data collective (the data collectives are replaced by a function that fails the test).
* Bad input on one rank only: every rank raises the same ``ValueError`` (the cross-rank check's
  report, naming that rank), the bad rank with its own error chained; nobody waits in a collective.
* Inf/NaN with FP8 communication: refused on every rank (naming the ranks that hold them) whenever
  the cross-rank check runs (first call; every call with ``FASTUSP_CHECK_CONSISTENCY=1``); with it
  off, no rank hangs, and docs/reliability.md states what the output holds.
"""
import pytest
import torch

from fastusp_xdit.apps.launch import run_distributed

# case -> a substring of the expected message (identical on every rank)
SAME_ON_ALL_RANKS = {
    "int_dtype": "pass float16, bfloat16, float32 or float64",
    "mixed_dtypes": "dtypes differ",
    "three_dims": "4-D (batch, heads, seq, head_dim)",
    "five_dims": "4-D (batch, heads, seq, head_dim)",
    "not_a_tensor": "4-D (batch, heads, seq, head_dim)",
    "head_dim_q_vs_k": "head_dim differs",
    "value_head_dim": "same shape",
    "batch_q_vs_k": "batch sizes differ",
    "zero_heads": "must all be >= 1",
    "zero_head_dim": "must all be >= 1",
    "zero_keys": "zero keys",
    "gqa_not_multiple": "multiple of key/value heads",
    "joint_without_strategy": "joint_strategy must be",
    "joint_wrong_heads": "replicated",
    "joint_dtype": "match query's dtype",
    "seq_len_float": "non-negative int",
    "seq_len_negative": "non-negative int",
    "fp8_spec": "comma list",
    "fp8_float64": "FP8 communication takes",
    "fp8_head_dim": "head_dim % 4",
}


def _bad_call(case: str):
    """Arguments of ``case`` for a 2-rank Ulysses or ring world (4 heads, 3 tokens per rank)."""
    def t(b=1, h=4, s=3, d=8, dtype=torch.float32):
        return torch.randn(b, h, s, d, dtype=dtype)

    q, k, v, kw = t(), t(), t(), {}
    if case == "int_dtype":
        q, k, v = (torch.ones(1, 4, 3, 8, dtype=torch.int32) for _ in range(3))
    elif case == "mixed_dtypes":
        k = k.bfloat16()
    elif case == "three_dims":
        q = q[0]
    elif case == "five_dims":
        q = q[None]
    elif case == "not_a_tensor":
        q = q.tolist()
    elif case == "head_dim_q_vs_k":
        q = t(d=16)
    elif case == "value_head_dim":
        v = t(d=16)
    elif case == "batch_q_vs_k":
        q = t(b=2)
    elif case == "zero_heads":
        q, k, v = t(h=0), t(h=0), t(h=0)
    elif case == "zero_head_dim":
        q, k, v = t(d=0), t(d=0), t(d=0)
    elif case == "zero_keys":
        k, v = t(s=0), t(s=0)
    elif case == "too_few_heads":  # bad for ulysses degree 2 only
        q, k, v = t(h=1), t(h=1), t(h=1)
    elif case == "gqa_not_multiple":
        k, v = t(h=3), t(h=3)
    elif case == "joint_without_strategy":
        kw = dict(joint_key=t(s=2), joint_value=t(s=2))
    elif case == "joint_wrong_heads":
        kw = dict(joint_key=t(h=2, s=2), joint_value=t(h=2, s=2), joint_strategy="front")
    elif case == "joint_dtype":
        kw = dict(joint_query=t(s=2, dtype=torch.float64), joint_strategy="rear")
    elif case == "seq_len_float":
        kw = dict(seq_len_q=6.0)
    elif case == "seq_len_negative":
        kw = dict(seq_len_kv=-1)
    elif case == "fp8_spec":
        kw = dict(fp8="qkv")
    elif case == "fp8_float64":
        q, k, v, kw = q.double(), k.double(), v.double(), dict(fp8="qvo")
    elif case == "fp8_head_dim":
        q, k, v, kw = t(d=6), t(d=6), t(d=6), dict(fp8="qvo")
    return (q, k, v), kw


def _no_data_collective(*_args, **_kwargs):
    raise AssertionError("a data collective was issued before the bad input was rejected")


def same_bad_input_worker(runs: list) -> list:
    """Every rank makes the same bad calls (``runs`` = [((ulysses, ring), cases)]) with the data
    collectives disabled; returns the errors."""
    import fastusp_xdit.usp.steps as steps
    from fastusp_xdit.usp import usp_attention
    from fastusp_xdit.usp.groups import usp_groups

    steps.all_to_all = steps.ring_shift = _no_data_collective
    errors = []
    for (u, r), cases in runs:
        ug, rg = usp_groups(u, r)
        for case in cases:
            (q, k, v), kw = _bad_call(case)
            try:
                usp_attention(q, k, v, ulysses_group=ug, ring_group=rg, **kw)
                errors.append(("no error", ""))
            except Exception as e:  # noqa: BLE001 - the error is the test's evidence
                errors.append((type(e).__name__, str(e)))
    return errors


def test_same_bad_input_raises_same_error_on_every_rank_before_any_collective():
    runs = [((2, 1), [*SAME_ON_ALL_RANKS, "too_few_heads"]), ((1, 2), list(SAME_ON_ALL_RANKS))]
    per_rank = run_distributed(same_bad_input_worker, 2, runs, timeout=120, collective_timeout=20)
    needles = dict(SAME_ON_ALL_RANKS, too_few_heads="ulysses degree 2 exceeds")
    failures = []
    for i, (fac, case) in enumerate((f, c) for f, cases in runs for c in cases):
        got = {res[i] for res in per_rank}
        kind, message = next(iter(got))
        if len(got) != 1 or kind != "ValueError" or needles[case] not in message:
            failures.append(f"{case} at ulysses x ring = {fac}: {sorted(got)}")
    assert not failures, "\n".join(failures)


ONE_RANK_BAD = ("int_dtype", "three_dims", "zero_head_dim", "seq_len_float", "fp8_spec", "wrong_shard")


def one_bad_rank_worker(cases: list, bad_rank: int) -> list:
    """Rank ``bad_rank`` passes the bad input of each case, the others a valid call; every call checked."""
    import os

    import torch.distributed as dist

    from fastusp_xdit import usp_attention
    from fastusp_xdit.usp.groups import usp_groups

    os.environ["FASTUSP_CHECK_CONSISTENCY"] = "1"
    ug, _ = usp_groups(2, 1)
    bad = dist.get_rank() == bad_rank
    out = []
    for case in cases:
        if case == "wrong_shard":  # 7 tokens over 2 ranks are 4 + 3; the bad rank holds one too many
            n = (4 if dist.get_rank() == 0 else 3) + bad
            (q, k, v), kw = (torch.randn(1, 4, n, 8) for _ in range(3)), dict(seq_len_q=7, seq_len_kv=7)
        else:
            (q, k, v), kw = _bad_call(case if bad else "valid")
        try:
            usp_attention(q, k, v, ulysses_group=ug, **kw)
            out.append(("no error", "", ""))
        except Exception as e:  # noqa: BLE001
            out.append((type(e).__name__, str(e), f"{type(e.__cause__).__name__}: {e.__cause__}"))
    return out


def test_bad_input_on_one_rank_is_reported_on_every_rank():
    per_rank = run_distributed(one_bad_rank_worker, 2, list(ONE_RANK_BAD), 1, timeout=120, collective_timeout=20)
    failures = []
    for i, case in enumerate(ONE_RANK_BAD):
        (kind0, msg0, _), (kind1, msg1, cause1) = per_rank[0][i], per_rank[1][i]
        if not (kind0 == kind1 == "ValueError" and msg0 == msg1 and "ranks [1] rejected their arguments" in msg0):
            failures.append(f"{case}: rank 0 {kind0}: {msg0}\n  rank 1 {kind1}: {msg1}")
        elif not cause1.startswith("ValueError"):
            failures.append(f"{case}: rank 1's own error is not chained: {cause1}")
    assert not failures, "\n".join(failures)


INJECTIONS = (("q", float("inf")), ("k", float("nan")), ("v", float("-inf")))


def nonfinite_worker(u: int, r: int, spec: str, seed: int, mode: str) -> list:
    """With ``FASTUSP_CHECK_CONSISTENCY=mode``, for each of :data:`INJECTIONS` put one non-finite value
    into Q, K or V on rank 1 and call without and with FP8 ``spec``. Per injection: the non-finite
    masks of both outputs (as lists), or the FP8 call's error message."""
    import os

    import torch.distributed as dist

    from fastusp_xdit import usp_attention
    from fastusp_xdit.usp.groups import usp_groups

    os.environ["FASTUSP_CHECK_CONSISTENCY"] = mode
    ug, rg = usp_groups(u, r)
    g = torch.Generator().manual_seed(seed * 8 + dist.get_rank())
    out = []
    for where, value in INJECTIONS:
        q, k, v = (torch.randn(1, 4, 5, 16, generator=g).bfloat16() for _ in range(3))
        if dist.get_rank() == 1:
            dict(q=q, k=k, v=v)[where][0, 2, 3, 7] = value
        kw = dict(ulysses_group=ug, ring_group=rg)
        raw = usp_attention(q, k, v, **kw)  # no FP8: values are not checked
        try:
            fp8 = usp_attention(q, k, v, fp8=spec, **kw)
        except ValueError as e:
            out.append(str(e))
            continue
        out.append(((~torch.isfinite(raw)).tolist(), (~torch.isfinite(fp8)).tolist()))
    return out  # lists: tensors returned through the harness's queue lose their shared memory at exit


@pytest.mark.parametrize("u,r,spec", [(2, 1, "qvo,k"), (1, 2, "qvo,k,ring_kv")])
def test_nonfinite_fp8_input_is_refused_on_every_rank_when_checked(u, r, spec, seed):
    per_rank = run_distributed(nonfinite_worker, 2, u, r, spec, seed, "1", timeout=60, collective_timeout=20)
    for i, (where, value) in enumerate(INJECTIONS):
        messages = {res[i] if isinstance(res[i], str) else "no error" for res in per_rank}
        assert len(messages) == 1 and "ranks [1] hold inf/nan" in messages.pop(), (seed, where, value, per_rank)


def test_nonfinite_fp8_input_unchecked_returns_on_every_rank(seed):
    """With the check off nothing hangs; a non-finite V row stays non-finite in every output it reaches."""
    per_rank = run_distributed(nonfinite_worker, 2, 2, 1, "qvo,k", seed, "0", timeout=60, collective_timeout=20)
    assert all(not isinstance(res, str) for results in per_rank for res in results), per_rank
    v_index = [w for w, _ in INJECTIONS].index("v")
    raw_any = False
    for rank, results in enumerate(per_rank):
        raw, fp8 = (torch.tensor(m) for m in results[v_index])
        raw_any |= bool(raw.any())
        assert not (raw & ~fp8).any(), f"seed={seed}, rank {rank}: FP8 output finite where the bf16 output is not"
    assert raw_any, f"seed={seed}: the injected -inf vanished even without FP8"


def _cpu_kernel_zeroes_nan_query_rows() -> bool:
    """Whether torch's CPU attention returns a finite row for an all-NaN query row (pytorch#141128) at
    the shape the workers below hand it (per rank 2 heads x 10 tokens, bf16): it depends on the length."""
    from fastusp_xdit.ops import attention_with_lse

    q, k, v = (torch.randn(1, 2, 10, 16).bfloat16() for _ in range(3))
    q[0, 1, 3] = float("nan")
    return bool(torch.isfinite(attention_with_lse(q, k, v)[0][0, 1, 3]).all())


def test_fp8_inf_query_row_stays_nonfinite_on_cpu(seed):
    """The FP8 codec turns a row holding inf into an all-NaN row; the output keeps it non-finite unless the
    local kernel zeroes NaN query rows (known limit, docs/reliability.md), which is probed first."""
    if _cpu_kernel_zeroes_nan_query_rows():
        pytest.xfail("torch's CPU attention returns zeros for an all-NaN query row here (pytorch#141128)")
    per_rank = run_distributed(nonfinite_worker, 2, 2, 1, "qvo", seed, "0", timeout=60, collective_timeout=20)
    q_index = [w for w, _ in INJECTIONS].index("q")
    masks = [tuple(torch.tensor(m) for m in results[q_index]) for results in per_rank]
    if not any(raw.any() for raw, _ in masks):  # scores of +-inf: the kernel's own handling, no FP8 involved
        pytest.xfail(f"seed={seed}: torch's CPU attention returned a finite row for the inf query without FP8 too")
    for rank, (raw, fp8) in enumerate(masks):
        assert not (raw & ~fp8).any(), f"seed={seed}, rank {rank}: FP8 output finite where the bf16 output is not"
