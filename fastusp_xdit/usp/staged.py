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

from .spec import check, prepare
from .steps import attend, batch_major, blocks, receive_in, receive_out, send_in, send_out, token_major


def _like(x: torch.Tensor, value: torch.Tensor, name: str) -> torch.Tensor:
    """``x`` if it has ``value``'s shape, dtype and device (the staged path plans from V alone)."""
    check(isinstance(x, torch.Tensor) and x.shape == value.shape and x.dtype == value.dtype
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
    shards: Optional[tuple] = None,
    joint_query: Optional[torch.Tensor] = None,
    joint_key: Optional[torch.Tensor] = None,
    joint_value: Optional[torch.Tensor] = None,
    joint_strategy: Optional[str] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
    wire=None,
    fp8=None,
    head_groups: int = 1,
) -> tuple[torch.Tensor, Any]:
    """``(usp_attention(query_fn(), key_fn(), value_fn(), ...), after())`` with the all-to-alls staged.

    The callables are called once each, in the order V, Q, K, then ``after`` (work that does not
    need the attention output) while the output all-to-all is in flight. Q, K and V must share one
    (B, H, S_local, D) shape (no grouped-query attention); ``seq_len`` is their global length,
    ``shards`` their layout (as ``usp_attention``'s ``shards_q``). The call is validated and agreed
    across ranks from V before its all-to-all; Q and K are checked against V as they arrive (the same
    code on every rank, so a mismatch raises on all of them). Staging keeps one head group
    (``head_groups`` is accepted, so every variant's options apply, and ignored: the per-projection
    all-to-alls are the overlap). Other arguments as in :func:`~fastusp_xdit.usp.usp_attention`.
    """
    value = value_fn()
    joint = (joint_query, joint_key, joint_value)
    spec = prepare(value, value, value, joint=joint, joint_strategy=joint_strategy, ulysses_group=ulysses_group,
                   ring_group=ring_group, seq_len_q=seq_len, seq_len_kv=seq_len, shards_q=shards, shards_kv=shards,
                   scale=scale, backend=backend, wire=wire, fp8=fp8, head_groups=head_groups)
    if spec.ulysses == 1:
        query, key = _like(query_fn(), value, "query"), _like(key_fn(), value, "key")
        q_tm, own = blocks({"q": [token_major(query)], "k": [token_major(key)], "v": [token_major(value)]}, joint,
                           spec, None)
        return batch_major(attend(q_tm, own, spec, None)), after() if after is not None else None
    pending_v = send_in({"v": value}, spec)
    pending_q = send_in({"q": _like(query_fn(), value, "query")}, spec)
    pending_k = send_in({"k": _like(key_fn(), value, "key")}, spec)
    pieces = {}
    for pending in (pending_q, pending_k, pending_v):
        pieces.update(receive_in(pending))
    q_tm, own = blocks(pieces, joint, spec, None)
    pending_out = send_out(attend(q_tm, own, spec, None).contiguous(), spec)
    extra = after() if after is not None else None
    return torch.cat([p.transpose(0, 1) for p in receive_out(pending_out)], dim=2).transpose(1, 2), extra
