"""Float64 reference attention and the distributed equivalence check used by tests and the demo.

A *case* is a dict: ``ulysses, ring, batch, heads, kv_heads, seq_q, seq_kv, head_dim, dtype``
(``"float32"``...), optional ``joint`` (``"front"``/``"rear"``) with ``joint_len``, ``seed``,
``compile`` (also run ``torch.compile(fullgraph=True)``, with ``compile_mode`` if given), ``iters`` (timed repetitions), ``fp8`` (an
FP8 spec such as ``"qvo"``: also reports the error against the same run without FP8) and
``head_groups`` (``usp_attention``'s), ``device`` (``"cuda"`` puts the shards on this rank's GPU; the reference stays on the CPU) and
``outliers`` (a factor: a few channels of V that much larger, and K offset by that much in a few
channels, the outlier patterns of real activations; Q is RMS-normalised in DiTs). Every rank
draws the same global tensors from the seed, runs :func:`usp_attention` on its shard and compares with
the float64 reference for its own rows, so nothing but the attention itself is communicated.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .. import layout
from .groups import usp_groups
from .attention import usp_attention


def reference_attention(q, k, v, scale=None):
    """Plain softmax attention in float64 (GQA by head repetition); (B, H, Sq, D) -> same."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def make_inputs(case: dict):
    """Global Q, K, V and joint Q, K, V (or Nones) for a case, identical on every rank."""
    g = torch.Generator().manual_seed(case["seed"])
    b, h, hkv, d = case["batch"], case["heads"], case.get("kv_heads", case["heads"]), case["head_dim"]
    dtype = getattr(torch, case["dtype"])

    scale, shift = torch.ones(d), torch.zeros(d)
    if case.get("outliers"):
        scale[torch.randperm(d, generator=g)[: max(1, d // 32)]] = case["outliers"]
        shift[torch.randperm(d, generator=g)[: max(1, d // 32)]] = case["outliers"]

    def rnd(*shape, kind="q"):
        x = torch.randn(*shape, generator=g)
        return (x * scale if kind == "v" else x + shift if kind == "k" else x).to(dtype)

    q = rnd(b, h, case["seq_q"], d)
    k, v = rnd(b, hkv, case["seq_kv"], d, kind="k"), rnd(b, hkv, case["seq_kv"], d, kind="v")
    joint = (None, None, None)
    if case.get("joint"):
        sj = case["joint_len"]
        joint = (rnd(b, h, sj, d), rnd(b, hkv, sj, d, kind="k"), rnd(b, hkv, sj, d, kind="v"))
    return (q, k, v), joint


def expected_local(case: dict, sp_rank: int):
    """The float64 reference: (the output rows this sequence-parallel rank must return, the whole output)."""
    (q, k, v), (jq, jk, jv) = make_inputs(case)
    u, r = case["ulysses"], case["ring"]
    if jk is not None:
        k, v = torch.cat([jk, k], 2), torch.cat([jv, v], 2)
    joint_len = 0 if jq is None else jq.shape[2]
    full = reference_attention(q if jq is None else torch.cat([jq, q], 2), k, v)
    joint_out, rows = full[:, :, :joint_len], layout.shard(full[:, :, joint_len:], 2, sp_rank, u, r)
    if joint_len:
        rows = torch.cat([joint_out, rows] if case["joint"] == "front" else [rows, joint_out], dim=2)
    return rows, full


def _fro_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error in the Frobenius norm (the metric for lossy FP8 communication)."""
    if ref.numel() == 0:
        return 0.0
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _rel_err(out: torch.Tensor, ref: torch.Tensor, scale_of: torch.Tensor | None = None) -> float:
    """Largest element error relative to the largest element of ``scale_of`` (default ``ref``).

    The distributed check divides by the whole output's largest element, not the rank's own rows:
    a rank may own one row that happens to be small, while a ring merges bf16-rounded partial
    outputs that can be many times larger (they cancel), so a per-rank scale would measure the
    row draw rather than the algorithm.
    """
    if ref.numel() == 0:
        return 0.0
    scale = (ref if scale_of is None else scale_of).abs().max()
    return ((out.double() - ref).abs().max() / scale.clamp_min(1e-30)).item()


def run_case(case: dict, groups) -> dict:
    """Run one case on this rank; returns errors (vs float64 and, if compiled, vs eager) and timing."""
    u, r = case["ulysses"], case["ring"]
    ug, rg = groups
    sp_rank = (0 if rg is None else rg.rank()) * u + (0 if ug is None else ug.rank())
    (q, k, v), joint = make_inputs(case)
    device = torch.device("cuda", torch.cuda.current_device()) if case.get("device") == "cuda" else torch.device("cpu")
    jq, jk, jv = (None if t is None else t.to(device) for t in joint)
    args = [layout.shard(t, 2, sp_rank, u, r).to(device) for t in (q, k, v)]
    kwargs = dict(ulysses_group=ug, ring_group=rg, seq_len_q=q.shape[2], seq_len_kv=k.shape[2],
                  joint_query=jq, joint_key=jk, joint_value=jv, joint_strategy=case.get("joint"),
                  head_groups=case.get("head_groups", 1))
    if case.get("fp8"):
        raw = usp_attention(*args, **kwargs)
        kwargs["fp8"] = case["fp8"]
    out = usp_attention(*args, **kwargs)
    rows, full = expected_local(case, sp_rank)
    result = {"case": case, "err": _rel_err(out.cpu(), rows, full),
              "shape": tuple(out.shape)}
    if case.get("fp8"):
        result["fp8_vs_raw"] = _fro_err(out.cpu(), raw.cpu().double())
    if case.get("compile"):
        from torch import _dynamo

        explain = _dynamo.explain(usp_attention)(*args, **kwargs)
        result["graph_breaks"] = explain.graph_break_count
        result["graphs"] = explain.graph_count
        _dynamo.reset()
        compiled = torch.compile(usp_attention, fullgraph=True, mode=case.get("compile_mode"))
        for _ in range(3):  # with mode="reduce-overhead": warm-up, CUDA-graph record, replay
            got = compiled(*args, **kwargs).clone()
        result["compile_err"] = _rel_err(got.cpu(), out.cpu().double())
    iters = case.get("iters", 0)
    if iters:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            usp_attention(*args, **kwargs)
        _sync(device)
        result["ms"] = (time.perf_counter() - t0) / iters * 1e3
    return result


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def run_cases(cases: list) -> list:
    """Worker entry point: run every case on this rank (groups cached per (ulysses, ring))."""
    cache: dict = {}
    out = []
    for case in cases:
        key = (case["ulysses"], case["ring"])
        if key not in cache:
            cache[key] = usp_groups(*key, device_type="cuda" if case.get("device") == "cuda" else "cpu")
        out.append(run_case(case, cache[key]))
    return out
