"""The public steps of a USP call; :func:`~.attention.usp_attention` and
:func:`~.staged.usp_attention_staged` are compositions of them over one :class:`~.spec.CallSpec`.

1. :func:`send_in` issues one packed all-to-all over the Ulysses group of any of Q, K, V for the
   spec's heads; :func:`receive_in` waits and unpacks (all heads, local tokens) -> (local heads,
   block tokens), one token-major piece per peer;
2. :func:`blocks` joins the pieces (and the replicated joint tokens, sliced to the local heads) into
   the query rows and the K/V block;
3. :func:`attend` runs this rank's rows against the whole sequence: local attention, or
   :func:`ring`, which rotates the K/V block through the ring group, issuing the transfer of step
   i+1 before step i's attention and keeping at most two blocks alive, and merges by LSE in fp32;
4. :func:`send_out` issues the output all-to-all, :func:`receive_out` waits for it.

Activations are *token-major*: memory order (tokens, [K|V], batch, heads, head_dim), so per-peer
pieces, ring blocks and output rows are contiguous slices along dim 0. What travels is encoded by
the spec's wire codecs (:mod:`fastusp_xdit.comm.codecs`); both ends of every transfer build their
message layout with the same function (:func:`_a2a_parts`, :func:`_ring_parts`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, NamedTuple

import torch

from .. import layout
from ..comm import all_to_all, ring_shift
from ..comm.packing import Part, pack, size, unpack, wire_dtype
from ..ops import attention_with_lse, lse_merge
from .spec import CallSpec

KVHook = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


class Pending(NamedTuple):
    """An issued all-to-all: the buffer (waited for at first use) and the layout of what arrives."""

    buf: torch.Tensor
    parts: list
    kinds: tuple


def token_major(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) view -> token-major (S, B, H, D) view."""
    return x.permute(2, 0, 1, 3)


def batch_major(out_tm: torch.Tensor) -> torch.Tensor:
    """Token-major (S, B, H, D) output -> its (B, H, S, D) view over (B, S, H, D) memory (a copy only
    when B > 1)."""
    if out_tm.shape[1] == 1:  # one batch row: (S, 1, H, D) memory already is (1, S, H, D)
        return out_tm.permute(1, 2, 0, 3)
    return out_tm.transpose(0, 1).contiguous().transpose(1, 2)


def _with_joint(pieces: list, joint, front: bool) -> list:
    return pieces if joint is None else ([joint] + pieces if front else pieces + [joint])


def _a2a_parts(spec: CallSpec, kinds, peer: int, receiving: bool, b: int, d: int, dtype) -> list:
    """The parts of ``kinds`` this rank sends to (``receiving``: gets from) Ulysses peer ``peer``:
    the sender's tokens, the receiver's heads. Both ends call this, so their layouts agree."""
    parts = []
    for c in kinds:
        shards, heads = (spec.q_shards, spec.q_heads) if c == "q" else (spec.kv_shards, spec.kv_heads)
        tokens = shards[peer] if receiving else shards[spec.u_rank]
        shape = (tokens, b, heads[spec.u_rank] if receiving else heads[peer], d)
        parts.append(Part(spec.wire.codec(c), shape, dtype))
    return parts


def send_in(tensors: dict, spec: CallSpec) -> Pending:
    """Issue one packed all-to-all of ``tensors`` (``{"q"|"k"|"v": (B, H, S_local, D)}``, any non-empty
    subset) for ``spec``'s heads; :func:`receive_in` waits and unpacks."""
    kinds = tuple(c for c in "qkv" if c in tensors)
    first = tensors[kinds[0]]
    b, d, dtype = first.shape[0], first.shape[3], first.dtype
    send_parts = [_a2a_parts(spec, kinds, j, False, b, d, dtype) for j in range(spec.ulysses)]
    recv_parts = [_a2a_parts(spec, kinds, j, True, b, d, dtype) for j in range(spec.ulysses)]
    pieces = []
    for j in range(spec.ulysses):
        for c in kinds:
            lo, hi = (spec.q_starts, spec.q_heads) if c == "q" else (spec.kv_starts, spec.kv_heads)
            pieces.append(token_major(tensors[c][:, lo[j]:lo[j] + hi[j]]))
    flat_send = [p for peer in send_parts for p in peer]
    wire = wire_dtype(flat_send)
    send = pack(pieces, flat_send, wire)
    buf = all_to_all(send, [size(p, wire) for p in recv_parts], [size(p, wire) for p in send_parts],
                     spec.ulysses_group)
    return Pending(buf, [p for peer in recv_parts for p in peer], kinds)


def receive_in(pending: Pending) -> dict:
    """``{kind: per-peer token-major pieces}`` of this rank's block from :func:`send_in`'s result."""
    buf, parts, kinds = pending
    recv = unpack(buf, parts)
    return {c: recv[i::len(kinds)] for i, c in enumerate(kinds)}


def _rows(pieces: list) -> torch.Tensor:
    """Concatenate token-major pieces along tokens (a view when there is only one)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def own_block(k_pieces: list, v_pieces: list) -> torch.Tensor:
    """Token-major (S, 2, B, H, D) K/V block for the ring, written from the pieces in one pass."""
    _, b, h, d = k_pieces[0].shape
    block = k_pieces[0].new_empty(sum(k.shape[0] for k in k_pieces), 2, b, h, d)
    start = 0
    for k, v in zip(k_pieces, v_pieces):
        block[start:start + k.shape[0], 0].copy_(k)
        block[start:start + k.shape[0], 1].copy_(v)
        start += k.shape[0]
    return block


def blocks(pieces: dict, joint, spec: CallSpec, kv_hook: KVHook | None):
    """This rank's token-major query rows and K/V rows from the per-peer ``pieces``
    (``{"q"|"k"|"v": list}``), joint tokens included.

    Returns ``(q, [kv])``: ``kv`` is ``(k, v)`` views for ring degree 1, else one packed (S, 2, B, H, D)
    block that the ring rotates (in a list, which :func:`attend` empties: no caller keeps the block).
    """
    q_lo, q_hi = spec.heads("q")
    kv_lo, kv_hi = spec.heads("kv")
    joint_query, joint_key, joint_value = joint
    k_pieces, v_pieces = pieces["k"], pieces["v"]
    jq = None if joint_query is None else token_major(joint_query[:, q_lo:q_hi])
    q_tm = _rows(_with_joint(pieces["q"], jq, spec.front))
    if kv_hook is not None:
        k, v = kv_hook(_rows(k_pieces).permute(1, 2, 0, 3), _rows(v_pieces).permute(1, 2, 0, 3))
        k_pieces, v_pieces = [token_major(k)], [token_major(v)]
    if joint_key is not None:
        k_pieces = _with_joint(k_pieces, token_major(joint_key[:, kv_lo:kv_hi]), spec.front)
        v_pieces = _with_joint(v_pieces, token_major(joint_value[:, kv_lo:kv_hi]), spec.front)
    if spec.ring == 1:
        return q_tm, [(_rows(k_pieces), _rows(v_pieces))]
    return q_tm, [own_block(k_pieces, v_pieces)]


def local_attention(q_tm, k_tm, v_tm, spec: CallSpec):
    """Local attention on token-major views; returns token-major output and (S, B, H) LSE."""
    out, lse = attention_with_lse(q_tm.permute(1, 2, 0, 3), k_tm.permute(1, 2, 0, 3), v_tm.permute(1, 2, 0, 3),
                                  spec.scale, spec.backend)
    return out.permute(2, 0, 1, 3), lse.permute(2, 0, 1)


def _ring_parts(rows: int, block_shape, dtype, spec: CallSpec) -> list:
    _, _, b, h, d = block_shape
    return [Part(spec.wire.codec("ring_k"), (rows, b, h, d), dtype), Part(spec.wire.codec("ring_v"), (rows, b, h, d),
                                                                          dtype)]


def ring_encode(block: torch.Tensor, spec: CallSpec) -> torch.Tensor:
    """What a ring step sends: the raw (S, 2, B, H, D) block, or one flat buffer of the encoded K and V."""
    if not spec.wire.codec("ring_k").lossy and not spec.wire.codec("ring_v").lossy:
        return block
    parts = _ring_parts(block.shape[0], block.shape, block.dtype, spec)
    return pack([block[:, 0], block[:, 1]], parts, torch.uint8)


def _ring_wire_size(rows: int, block_shape, dtype, spec: CallSpec) -> int:
    """Dim-0 size of :func:`ring_encode` for a block of ``rows`` tokens."""
    if not spec.wire.codec("ring_k").lossy and not spec.wire.codec("ring_v").lossy:
        return rows
    return size(_ring_parts(rows, block_shape, dtype, spec), torch.uint8)


def _ring_decode(buf: torch.Tensor, rows: int, block_shape, dtype, spec: CallSpec):
    """(K, V) token-major views of a received block."""
    if buf.dim() == 5:
        return buf[:, 0], buf[:, 1]
    return tuple(unpack(buf, _ring_parts(rows, block_shape, dtype, spec)))


def ring(q_tm, own: list, spec: CallSpec, shift=None) -> torch.Tensor:
    """Pipelined ring over ``spec.ring_group``: returns token-major output of ``q_tm`` against every block.

    ``own`` = [own K/V block, the slice of it to send], the caller's only references: the list is
    emptied, so after step 0 the own block is freed and at most two K/V blocks (the one computed on
    and the one in flight) are alive whatever the ring degree. With a lossy ``ring_kv`` codec the
    rotating blocks travel encoded and are decoded right before their attention. ``shift``: the
    transfer, default :func:`~fastusp_xdit.comm.ring_shift` (a seam for one-device ring emulation).
    """
    shift = ring_shift if shift is None else shift
    acc = lse = None
    cur, send = own
    own.clear()
    shape, dtype = cur.shape, cur.dtype
    send = ring_encode(send, spec)
    acc_dtype = torch.promote_types(q_tm.dtype, torch.float32)
    rows_at = [spec.kv_blocks[(spec.r_rank - step) % spec.ring] + (spec.joint_kv if step == 0 else 0)
               for step in range(spec.ring)]
    last = max([-1] + [step for step, rows in enumerate(rows_at) if rows])  # the last merge writes `dtype`
    for step, rows in enumerate(rows_at):
        nxt = None
        if step + 1 < spec.ring:  # issue the next block's transfer before computing on this one
            recv_rows = spec.kv_blocks[(spec.r_rank - step - 1) % spec.ring]
            nxt = shift(send, _ring_wire_size(recv_rows, shape, dtype, spec), spec.ring_group)
        if rows and q_tm.shape[0]:
            k, v = (cur[:, 0], cur[:, 1]) if step == 0 else _ring_decode(cur, rows, shape, dtype, spec)
            out, out_lse = local_attention(q_tm, k, v, spec)
            if acc is None:  # block 0 is read in its own dtype by the first merge, never copied
                acc, lse = out, out_lse
            else:
                acc, lse = lse_merge(acc, lse, out, out_lse, dtype if step == last else acc_dtype)
        cur = send = nxt
    if acc is None:  # no query rows on this rank
        return q_tm.new_empty(q_tm.shape)
    return acc.to(dtype)  # a no-op when the last merge ran (it wrote `dtype`)


def attend(q_tm, holder: list, spec: CallSpec, kv_hook: KVHook | None) -> torch.Tensor:
    """Token-major output of this rank's query rows against the whole sequence (the ring when R > 1)."""
    own = holder.pop()
    if spec.ring == 1:
        return local_attention(q_tm, *own, spec)[0] if q_tm.shape[0] else q_tm.new_empty(q_tm.shape)
    rows = own.shape[0] - spec.joint_kv
    if kv_hook is not None:
        spec = replace(spec, kv_blocks=(rows,) * spec.ring)
    parts = [own, own[spec.joint_kv:] if spec.front else own[:rows]]
    del own
    return ring(q_tm, parts, spec)


def send_out(out_tm: torch.Tensor, spec: CallSpec) -> Pending:
    """Issue the output all-to-all of token-major (rows, B, local heads, D); :func:`receive_out` waits
    and gives one token-major (rows, B, heads of peer j, D) piece per Ulysses peer."""
    _, b, h, d = out_tm.shape
    jq, rows, dtype = spec.joint_q, layout.offsets(spec.q_shards), out_tm.dtype
    codec = spec.wire.codec("o")
    send_parts = [[Part(codec, (s + jq, b, h, d), dtype)] for s in spec.q_shards]
    recv_parts = [Part(codec, (spec.q_shards[spec.u_rank] + jq, b, hj, d), dtype) for hj in spec.q_heads]
    wire = wire_dtype(send_parts[0])
    if wire == dtype and not jq:
        send = out_tm.reshape(-1)  # already the peers' rows back to back: no copy
    else:
        pieces = [out_tm[rows[i] + (jq if spec.front else 0):][:s] for i, s in enumerate(spec.q_shards)]
        if jq:  # each peer also gets the joint rows, at the joint_strategy end
            joint = out_tm[:jq] if spec.front else out_tm[out_tm.shape[0] - jq:]
            pieces = [_with_joint([p], joint, spec.front) for p in pieces]
            # row-wise codecs encode the two pieces apart; others see the peer's rows as one tensor
            pieces = [t for p in pieces for t in p] if codec.rowwise else [torch.cat(p) for p in pieces]
        send = pack(pieces, [Part(codec, t.shape, dtype) for t in pieces], wire)
    buf = all_to_all(send, [size([p], wire) for p in recv_parts], [size(p, wire) for p in send_parts],
                     spec.ulysses_group)
    return Pending(buf, recv_parts, ("o",))


def receive_out(pending: Pending) -> list:
    """The per-peer token-major output pieces of :func:`send_out`'s result."""
    return unpack(pending.buf, pending.parts)
