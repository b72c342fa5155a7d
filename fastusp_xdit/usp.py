"""Unified Sequence Parallel attention: Ulysses all-to-all x pipelined ring, as a pure function.

``usp_attention`` takes this rank's shard of Q/K/V and the two process groups (Ulysses: contiguous
ranks, ring: strided ranks, as yunchang builds them) and returns this rank's shard of the output,
equal to single-device attention over the whole sequence. Data flow per call:

1. one packed all-to-all over the Ulysses group turns (all heads, local tokens) into (local heads,
   block tokens) for Q, K and V together; joint (text) tokens, replicated on every rank, are sliced
   to the local heads and join the block without communication;
2. the ring rotates the packed K/V block through the ring group: the transfer of step i+1 is issued
   before step i's attention, and at most two blocks (the one computed on and the one in flight)
   are alive, so memory is O(2 x block) whatever the ring degree; partial results merge by LSE in
   fp32;
3. one all-to-all over the Ulysses group returns (all heads, local tokens), joint query tokens
   included at the front or rear.

Internally every activation is *token-major*: memory order (tokens, [K|V], batch, heads, head_dim),
so per-peer pieces, ring blocks and output rows are contiguous slices along dim 0. All split sizes
come from :mod:`fastusp_xdit.layout` (global shapes only), so every rank issues identical
collectives; every check runs before the first collective and raises ``ValueError`` naming the fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import layout
from .comm import all_to_all, ring_shift
from .ops import attention_with_lse, merge_into, select_backend

KVHook = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class _Plan:
    """Host-side sizes of one call, identical on every rank by construction."""

    ulysses: int
    ring: int
    u_rank: int
    r_rank: int
    q_shards: list   # query tokens of each Ulysses peer (this ring block)
    kv_shards: list  # key/value tokens of each Ulysses peer (this ring block)
    q_heads: list    # query heads each Ulysses peer owns after the all-to-all
    kv_heads: list
    kv_blocks: list  # key/value tokens of every ring block
    joint_q: int     # joint query tokens (replicated)
    joint_kv: int    # joint key/value tokens (replicated)
    front: bool      # joint tokens before (True) or after the sequence tokens

    def heads(self, kind: str) -> tuple[int, int]:
        sizes = self.q_heads if kind == "q" else self.kv_heads
        start = layout.offsets(sizes)[self.u_rank]
        return start, start + sizes[self.u_rank]


def _degree_rank(group) -> tuple[int, int]:
    return (1, 0) if group is None else (group.size(), group.rank())


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


def _validate_and_plan(q, k, v, joint, joint_strategy, ulysses_group, ring_group, seq_len_q, seq_len_kv):
    jq, jk, jv = joint
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check(isinstance(t, torch.Tensor) and t.dim() == 4,
               f"{name} must be a 4-D (batch, heads, seq, head_dim) tensor, got "
               f"{getattr(t, 'shape', type(t).__name__)}: transpose BSHD inputs with .transpose(1, 2)")
        _check(t.dtype.is_floating_point and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
               f"{name} has dtype {t.dtype}: pass float16, bfloat16, float32 or float64 tensors")
    _check(q.dtype == k.dtype == v.dtype, f"query/key/value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    _check(q.device == k.device == v.device, "query/key/value are on different devices: move them to one device")
    _check(k.shape == v.shape, f"key {tuple(k.shape)} and value {tuple(v.shape)} must have the same shape")
    _check(q.shape[0] == k.shape[0], f"batch sizes differ: query {q.shape[0]}, key {k.shape[0]}")
    _check(q.shape[3] == k.shape[3], f"head_dim differs: query {q.shape[3]}, key {k.shape[3]}")
    hq, hkv = q.shape[1], k.shape[1]
    _check(hkv > 0 and hq % hkv == 0, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    ulysses, u_rank = _degree_rank(ulysses_group)
    ring, r_rank = _degree_rank(ring_group)
    _check(hq >= ulysses, f"ulysses degree {ulysses} exceeds the {hq} attention heads: "
           f"use a ulysses degree <= {hq} and a larger ring degree")
    sp_rank, n = r_rank * ulysses + u_rank, ulysses * ring
    lengths = []
    for name, t, total in (("query", q, seq_len_q), ("key/value", k, seq_len_kv)):
        total = t.shape[2] * n if total is None else int(total)
        expected = layout.shard_sizes(total, ulysses, ring)[sp_rank]
        _check(t.shape[2] == expected,
               f"this rank (sequence-parallel rank {sp_rank} of {n}) holds {t.shape[2]} {name} tokens, but a "
               f"global length of {total} gives it {expected}: shard with fastusp_xdit.layout.shard() and pass "
               f"the global length as seq_len_{'q' if name == 'query' else 'kv'}")
        lengths.append(total)
    if jq is not None or jk is not None or jv is not None:
        _check(joint_strategy in ("front", "rear"),
               f"joint_strategy must be 'front' or 'rear' when joint tensors are given, got {joint_strategy!r}")
        _check((jk is None) == (jv is None), "pass joint_key and joint_value together")
        for name, t, heads in (("joint_query", jq, hq), ("joint_key", jk, hkv), ("joint_value", jv, hkv)):
            if t is None:
                continue
            _check(t.dim() == 4 and t.shape[0] == q.shape[0] and t.shape[1] == heads and t.shape[3] == q.shape[3],
                   f"{name} must be (batch={q.shape[0]}, heads={heads}, seq, head_dim={q.shape[3]}), the full "
                   f"replicated tensor; got {tuple(t.shape)}")
            _check(t.dtype == q.dtype and t.device == q.device, f"{name} must match query's dtype and device")
        if jk is not None:
            _check(jk.shape == jv.shape, f"joint_key {tuple(jk.shape)} and joint_value {tuple(jv.shape)} differ")
    elif joint_strategy is not None:
        _check(joint_strategy in ("front", "rear"), f"joint_strategy must be 'front', 'rear' or None, got {joint_strategy!r}")
    joint_kv = 0 if jk is None else jk.shape[2]
    _check(lengths[1] + joint_kv > 0, "attention over zero keys: give a non-empty key/value sequence")
    # With fewer K/V heads than Ulysses ranks, K/V heads are repeated up to the query heads first.
    kv_heads_eff = hkv if hkv >= ulysses else hq
    q_heads, kv_heads = layout.head_split(hq, kv_heads_eff, ulysses)
    q_sh = layout.shard_sizes(lengths[0], ulysses, ring)[r_rank * ulysses:(r_rank + 1) * ulysses]
    kv_sh = layout.shard_sizes(lengths[1], ulysses, ring)[r_rank * ulysses:(r_rank + 1) * ulysses]
    return _Plan(ulysses, ring, u_rank, r_rank, q_sh, kv_sh, q_heads, kv_heads,
                 layout.block_sizes(lengths[1], ulysses, ring),
                 0 if jq is None else jq.shape[2], joint_kv, joint_strategy != "rear")


def _tm(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) view -> token-major (S, B, H, D) view."""
    return x.permute(2, 0, 1, 3)


def _kv_tm(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) key and value -> token-major (S, 2, B, H, D) view (copies)."""
    return torch.stack((k, v)).permute(3, 0, 1, 2, 4)


def _with_joint(pieces: list, joint, front: bool) -> list:
    return pieces if joint is None else ([joint] + pieces if front else pieces + [joint])


def _ulysses_in(q, k, v, plan: _Plan, group):
    """Packed Q|K|V all-to-all; returns per-peer token-major Q pieces and K/V pieces of this block."""
    b, d = q.shape[0], q.shape[3]
    sq, skv = q.shape[2], k.shape[2]
    q_off, kv_off = layout.offsets(plan.q_heads), layout.offsets(plan.kv_heads)
    send_sizes = [b * d * (sq * hq + 2 * skv * hkv) for hq, hkv in zip(plan.q_heads, plan.kv_heads)]
    send = q.new_empty(sum(send_sizes))
    start = 0
    for j, (hq, hkv) in enumerate(zip(plan.q_heads, plan.kv_heads)):
        nq = sq * b * hq * d
        send[start:start + nq].view(sq, b, hq, d).copy_(_tm(q[:, q_off[j]:q_off[j] + hq]))
        kv = send[start + nq:start + send_sizes[j]].view(skv, 2, b, hkv, d)
        kv[:, 0].copy_(_tm(k[:, kv_off[j]:kv_off[j] + hkv]))
        kv[:, 1].copy_(_tm(v[:, kv_off[j]:kv_off[j] + hkv]))
        start += send_sizes[j]
    hq, hkv = plan.q_heads[plan.u_rank], plan.kv_heads[plan.u_rank]
    recv_sizes = [b * d * (s * hq + 2 * t * hkv) for s, t in zip(plan.q_shards, plan.kv_shards)]
    recv = all_to_all(send, recv_sizes, send_sizes, group)
    q_pieces, kv_pieces, start = [], [], 0
    for s, t, n in zip(plan.q_shards, plan.kv_shards, recv_sizes):
        q_pieces.append(recv[start:start + s * b * hq * d].view(s, b, hq, d))
        kv_pieces.append(recv[start + s * b * hq * d:start + n].view(t, 2, b, hkv, d))
        start += n
    return q_pieces, kv_pieces


def _ulysses_out(out_tm: torch.Tensor, plan: _Plan, group) -> torch.Tensor:
    """Output all-to-all: token-major (rows, B, local heads, D) -> (B, all heads, local rows, D)."""
    _, b, h, d = out_tm.shape
    jq = plan.joint_q
    rows = layout.offsets(plan.q_shards)
    if jq:
        joint = out_tm[:jq] if plan.front else out_tm[out_tm.shape[0] - jq:]
        base = jq if plan.front else 0
        send = torch.cat([t for i, s in enumerate(plan.q_shards)
                          for t in _with_joint([out_tm[base + rows[i]:base + rows[i] + s]], joint, plan.front)])
    else:
        send = out_tm
    per_row = b * h * d
    s_out = plan.q_shards[plan.u_rank] + jq
    send_sizes = [(s + jq) * per_row for s in plan.q_shards]
    recv_sizes = [s_out * b * hj * d for hj in plan.q_heads]
    recv = all_to_all(send.reshape(-1), recv_sizes, send_sizes, group)
    chunks = [c.view(s_out, b, hj, d) for c, hj in zip(recv.split(recv_sizes), plan.q_heads)]
    return torch.cat(chunks, dim=2).permute(1, 2, 0, 3)


def _attend(q_tm, kv_tm, scale, backend):
    out, lse = attention_with_lse(q_tm.permute(1, 2, 0, 3), kv_tm[:, 0].permute(1, 2, 0, 3),
                                  kv_tm[:, 1].permute(1, 2, 0, 3), scale, backend)
    return out.permute(2, 0, 1, 3), lse.permute(2, 0, 1)


def _ring(q_tm, own: list, plan: _Plan, group, scale, backend) -> torch.Tensor:
    """Pipelined ring over ``group``: returns token-major output of ``q_tm`` against every block.

    ``own`` = [own K/V block, the slice of it to send], the caller's only references: the list is
    emptied, so after step 0 the own block is freed and at most two K/V blocks (the one computed on
    and the one in flight) are alive whatever the ring degree.
    """
    acc = lse = None
    cur, send = own
    own.clear()
    acc_dtype = torch.promote_types(q_tm.dtype, torch.float32)
    for step in range(plan.ring):
        nxt = None
        if step + 1 < plan.ring:  # issue the next block's transfer before computing on this one
            nxt = ring_shift(send, plan.kv_blocks[(plan.r_rank - step - 1) % plan.ring], group)
        if cur.shape[0] and q_tm.shape[0]:
            out, out_lse = _attend(q_tm, cur, scale, backend)
            if acc is None:
                acc, lse = out.to(acc_dtype), out_lse.to(acc_dtype)
            else:
                acc, lse = merge_into(acc, lse, out, out_lse)
        cur = send = nxt
    if acc is None:  # no query rows on this rank
        return q_tm.new_empty(q_tm.shape)
    return acc.to(q_tm.dtype)


def _blocks(query, key, value, joint, plan: _Plan, group, kv_hook):
    """This rank's token-major query rows and own K/V block, joint tokens included, after the all-to-all."""
    q_lo, q_hi = plan.heads("q")
    kv_lo, kv_hi = plan.heads("kv")
    joint_query, joint_key, joint_value = joint
    if plan.ulysses > 1:
        q_pieces, kv_pieces = _ulysses_in(query, key, value, plan, group)
    else:
        q_pieces, kv_pieces = [_tm(query)], [_kv_tm(key, value)]
    jq = None if joint_query is None else _tm(joint_query[:, q_lo:q_hi])
    jkv = None if joint_key is None else _kv_tm(joint_key[:, kv_lo:kv_hi], joint_value[:, kv_lo:kv_hi])
    q_rows = _with_joint(q_pieces, jq, plan.front)
    q_tm = q_rows[0] if len(q_rows) == 1 else torch.cat(q_rows)
    if kv_hook is not None:
        block = torch.cat(kv_pieces)
        k, v = kv_hook(block[:, 0].permute(1, 2, 0, 3), block[:, 1].permute(1, 2, 0, 3))
        kv_pieces = [_kv_tm(k, v)]
    own = _with_joint(kv_pieces, jkv, plan.front)
    own = own[0] if len(own) == 1 and plan.ring == 1 else torch.cat(own)
    return q_tm, own


def usp_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    ulysses_group=None,
    ring_group=None,
    seq_len_q: Optional[int] = None,
    seq_len_kv: Optional[int] = None,
    joint_query: Optional[torch.Tensor] = None,
    joint_key: Optional[torch.Tensor] = None,
    joint_value: Optional[torch.Tensor] = None,
    joint_strategy: Optional[str] = None,
    scale: Optional[float] = None,
    kv_hook: Optional[KVHook] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Bidirectional attention over a sequence sharded across ``ulysses_group x ring_group``.

    Args:
        query, key, value: this rank's shards, (B, H, S_local, D); K/V may have fewer heads (GQA).
            Shards follow :func:`fastusp_xdit.layout.shard_sizes` over ``sp_rank = ring_rank * U +
            ulysses_rank``.
        ulysses_group, ring_group: process groups (``None`` = degree 1); never the world group
            unless the whole world is one sequence-parallel replica.
        seq_len_q, seq_len_kv: global lengths; default ``S_local * U * R`` (evenly divisible).
        joint_query, joint_key, joint_value: replicated full-head joint (text) tensors, attended
            once by every query; joint query rows are returned at the ``joint_strategy`` end.
        kv_hook: ``(k, v) -> (k, v)`` applied to this rank's K/V block (B, H_local, S_block, D) after
            the all-to-all and before attention (PipeFusion's KV cache). With ring > 1 it must
            return equal-length blocks on every ring rank.
        scale: softmax scale, default ``head_dim ** -0.5``; backend: see :mod:`fastusp_xdit.ops`.

    Returns:
        (B, H, [joint_q +] S_local, D) in the input dtype, memory in token-major order.
    """
    plan = _validate_and_plan(query, key, value, (joint_query, joint_key, joint_value), joint_strategy,
                              ulysses_group, ring_group, seq_len_q, seq_len_kv)
    if backend is None:
        backend = select_backend(query, key)
    if key.shape[1] < plan.ulysses:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        if joint_key is not None:
            joint_key, joint_value = joint_key.repeat_interleave(rep, 1), joint_value.repeat_interleave(rep, 1)
    q_tm, own = _blocks(query, key, value, (joint_query, joint_key, joint_value), plan, ulysses_group, kv_hook)
    if plan.ring == 1:
        out_tm = _attend(q_tm, own, scale, backend)[0] if q_tm.shape[0] else q_tm.new_empty(q_tm.shape)
    else:
        rows = own.shape[0] - plan.joint_kv
        if kv_hook is not None:
            plan = _Plan(**{**plan.__dict__, "kv_blocks": [rows] * plan.ring})
        blocks = [own, own[plan.joint_kv:] if plan.front else own[:rows]]
        del own
        out_tm = _ring(q_tm, blocks, plan, ring_group, scale, backend)
    if plan.ulysses > 1:
        return _ulysses_out(out_tm.contiguous(), plan, ulysses_group)
    return out_tm.permute(1, 2, 0, 3)
