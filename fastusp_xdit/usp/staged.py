"""USP attention with each projection's all-to-all issued as soon as that projection is computed.

For attention blocks whose Q, K and V come out of separate projections (FLUX-style: V is ready
first, Q and K still need their RMSNorm and RoPE), :func:`usp_attention_staged` takes the three
projections as callables and interleaves::

    v = value_fn();  issue V's all-to-all
    q = query_fn();  issue Q's all-to-all      (V's transfer overlaps Q's projection)
    k = key_fn();    issue K's all-to-all      (Q's and V's overlap K's projection)
    attention (ring included);  issue the output all-to-all
    after()                                    (the output transfer overlaps independent work)

three input collectives of a third the size instead of one packed one, so it pays only where the
projections take longer than the extra collective latency: it is opt-in. The result equals
:func:`~fastusp_xdit.usp.usp_attention` on the same tensors.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..comm.packing import unpack
from .attention import _blocks, _check, _local, _prepare, _recv_in, _send_in, _send_out, _tm


def _like(x: torch.Tensor, value: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` if it has ``value``'s shape, dtype and device (the staged path plans from V alone)."""
    _check(isinstance(x, torch.Tensor) and x.shape == value.shape and x.dtype == value.dtype
           and x.device == value.device,
           lambda: f"{name}_fn returned {getattr(x, 'shape', type(x).__name__)}, but the staged path needs Q, K and V "
           f"of one shape, dtype and device (value: {tuple(value.shape)} {value.dtype}): use usp_attention")
    return x


def usp_attention_staged(
    value_fn: Callable[[], torch.Tensor],
    query_fn: Callable[[], torch.Tensor],
    key_fn: Callable[[], torch.Tensor],
    *,
    after: Optional[Callable[[], Any]] = None,
    ulysses_group=None,
    ring_group=None,
    seq_len: Optional[int] = None,
    joint_query: Optional[torch.Tensor] = None,
    joint_key: Optional[torch.Tensor] = None,
    joint_value: Optional[torch.Tensor] = None,
    joint_strategy: Optional[str] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    fp8=None,
) -> tuple[torch.Tensor, Any]:
    """``(usp_attention(query_fn(), key_fn(), value_fn(), ...), after())`` with the all-to-alls staged.

    The callables are called once each, in the order V, Q, K, then ``after`` (work that does not
    need the attention output) while the output all-to-all is in flight. Q, K and V must share one
    (B, H, S_local, D) shape (no grouped-query attention); ``seq_len`` is their global length. The
    call is validated and agreed across ranks from V before its all-to-all; Q and K are checked
    against V as they arrive (the same code on every rank, so a mismatch raises on all of them).
    Other arguments as in :func:`~fastusp_xdit.usp.usp_attention` (one head group, no ``kv_hook``).
    """
    value = value_fn()
    joint = (joint_query, joint_key, joint_value)
    plan, fp8, backend, _ = _prepare(value, value, value, joint, joint_strategy, ulysses_group, ring_group,
                                     seq_len, seq_len, scale, None, backend, fp8, 1)
    dtype = value.dtype
    if plan.ulysses == 1:
        query, key = _like(query_fn(), value, "query"), _like(key_fn(), value, "key")
        q_tm, own = _blocks({"q": [_tm(query)], "k": [_tm(key)], "v": [_tm(value)]}, joint, plan, None)
        out = _local(q_tm, own, plan, ring_group, scale, backend, fp8, None).permute(1, 2, 0, 3)
        return out, after() if after is not None else None
    pending_v = _send_in({"v": value}, plan, ulysses_group, fp8)
    pending_q = _send_in({"q": _like(query_fn(), value, "query")}, plan, ulysses_group, fp8)
    pending_k = _send_in({"k": _like(key_fn(), value, "key")}, plan, ulysses_group, fp8)
    pieces = {}
    for pending in (pending_q, pending_k, pending_v):
        pieces.update(_recv_in(pending, dtype, fp8))
    q_tm, own = _blocks(pieces, joint, plan, None)
    out = _local(q_tm, own, plan, ring_group, scale, backend, fp8, None).contiguous()
    pending_out = _send_out(out, plan, ulysses_group, fp8)
    extra = after() if after is not None else None
    return torch.cat(unpack(*pending_out, dtype), dim=2).permute(1, 2, 0, 3), extra
