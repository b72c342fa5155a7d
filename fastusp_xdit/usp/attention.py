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

With ``head_groups = G > 1`` (Ulysses > 1) every peer's heads are cut into G contiguous groups that
run steps 1-3 as a pipeline: group g+1's input all-to-all is issued before group g's attention, and
each group's output all-to-all is waited for only at the end, so transfers overlap attention (eager:
functional collectives wait at first use; compiled: the graph keeps the order for Inductor).

Internally every activation is *token-major*: memory order (tokens, [K|V], batch, heads, head_dim),
so per-peer pieces, ring blocks and output rows are contiguous slices along dim 0. All split sizes
come from :mod:`fastusp_xdit.layout` (global shapes only), so every rank issues identical
collectives; every check runs before the first collective and raises ``ValueError`` naming the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .. import layout
from ..comm import all_to_all, ring_shift
from ..comm.fp8 import FP8Options, encoded_row_bytes, fp8_encode
from ..comm.packing import pack, part_size, unpack, wire_dtype
from .consistency import check_call
from ..ops import attention_with_lse, lse_merge, select_backend

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
    q_starts: list   # first query head of each peer's range in the input tensors
    kv_starts: list
    kv_blocks: list  # key/value tokens of every ring block
    joint_q: int     # joint query tokens (replicated)
    joint_kv: int    # joint key/value tokens (replicated)
    front: bool      # joint tokens before (True) or after the sequence tokens

    def heads(self, kind: str) -> tuple[int, int]:
        """This rank's head range ``[lo, hi)`` of the input tensors."""
        sizes, starts = (self.q_heads, self.q_starts) if kind == "q" else (self.kv_heads, self.kv_starts)
        return starts[self.u_rank], starts[self.u_rank] + sizes[self.u_rank]

    def head_groups(self, requested: int) -> "list[_Plan]":
        """Plans of ``min(requested, fewest K/V heads of a peer)`` head groups (one when Ulysses is 1):
        each peer's range is cut into contiguous sub-ranges, query heads following their K/V heads."""
        n = min(requested, *self.kv_heads) if self.ulysses > 1 else 1
        if n <= 1:
            return [self]
        rep = self.q_heads[0] // self.kv_heads[0]
        cuts = [layout.split_sizes(h, n) for h in self.kv_heads]
        plans = []
        for g in range(n):
            kv = [c[g] for c in cuts]
            starts = [s + layout.offsets(c)[g] for s, c in zip(self.kv_starts, cuts)]
            plans.append(replace(self, q_heads=[rep * h for h in kv], kv_heads=kv,
                                 q_starts=[rep * s for s in starts], kv_starts=starts))
        return plans


def _degree_rank(group) -> tuple[int, int]:
    return (1, 0) if group is None else (group.size(), group.rank())


def _check(cond: bool, msg: Callable[[], str]):
    """Raise ``ValueError(msg())``; the message is built only on failure (under ``torch.compile``
    with dynamic shapes, formatting symbolic sizes would break the graph)."""
    if not cond:
        raise ValueError(msg())


def _validate_and_plan(q, k, v, joint, joint_strategy, ulysses_group, ring_group, seq_len_q, seq_len_kv):
    jq, jk, jv = joint
    for name, t in (("query", q), ("key", k), ("value", v)):
        _check(isinstance(t, torch.Tensor) and t.dim() == 4,
               lambda: f"{name} must be a 4-D (batch, heads, seq, head_dim) tensor, got "
               f"{getattr(t, 'shape', type(t).__name__)}: transpose BSHD inputs with .transpose(1, 2)")
        _check(t.dtype.is_floating_point and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
               lambda: f"{name} has dtype {t.dtype}: pass float16, bfloat16, float32 or float64 tensors")
    _check(q.dtype == k.dtype == v.dtype,
           lambda: f"query/key/value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    _check(q.device == k.device == v.device,
           lambda: "query/key/value are on different devices: move them to one device")
    _check(k.shape == v.shape, lambda: f"key {tuple(k.shape)} and value {tuple(v.shape)} must have the same shape")
    _check(q.shape[0] == k.shape[0], lambda: f"batch sizes differ: query {q.shape[0]}, key {k.shape[0]}")
    _check(q.shape[3] == k.shape[3], lambda: f"head_dim differs: query {q.shape[3]}, key {k.shape[3]}")
    hq, hkv = q.shape[1], k.shape[1]
    _check(hq > 0 and hkv > 0 and q.shape[3] > 0,
           lambda: f"query heads ({hq}), key/value heads ({hkv}) and head_dim ({q.shape[3]}) must all be >= 1")
    _check(hq % hkv == 0, lambda: f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    ulysses, u_rank = _degree_rank(ulysses_group)
    ring, r_rank = _degree_rank(ring_group)
    _check(hq >= ulysses, lambda: f"ulysses degree {ulysses} exceeds the {hq} attention heads: "
           f"use a ulysses degree <= {hq} and a larger ring degree")
    sp_rank, n = r_rank * ulysses + u_rank, ulysses * ring
    lengths = []
    for name, t, total in (("query", q, seq_len_q), ("key/value", k, seq_len_kv)):
        _check(total is None or (isinstance(total, (int, torch.SymInt)) and total >= 0),
               lambda: f"seq_len_{'q' if name == 'query' else 'kv'} must be a non-negative int (the global length) "
               f"or None, got {total!r}")
        total = t.shape[2] * n if total is None else total
        expected = layout.shard_sizes(total, ulysses, ring)[sp_rank]
        _check(t.shape[2] == expected,
               lambda: f"this rank (sequence-parallel rank {sp_rank} of {n}) holds {t.shape[2]} {name} tokens, but a "
               f"global length of {total} gives it {expected}: shard with fastusp_xdit.layout.shard() and pass "
               f"the global length as seq_len_{'q' if name == 'query' else 'kv'}")
        lengths.append(total)
    if jq is not None or jk is not None or jv is not None:
        _check(joint_strategy in ("front", "rear"),
               lambda: f"joint_strategy must be 'front' or 'rear' when joint tensors are given, got {joint_strategy!r}")
        _check((jk is None) == (jv is None), lambda: "pass joint_key and joint_value together")
        for name, t, heads in (("joint_query", jq, hq), ("joint_key", jk, hkv), ("joint_value", jv, hkv)):
            if t is None:
                continue
            _check(t.dim() == 4 and t.shape[0] == q.shape[0] and t.shape[1] == heads and t.shape[3] == q.shape[3],
                   lambda: f"{name} must be (batch={q.shape[0]}, heads={heads}, seq, head_dim={q.shape[3]}), the full "
                   f"replicated tensor; got {tuple(t.shape)}")
            _check(t.dtype == q.dtype and t.device == q.device, lambda: f"{name} must match query's dtype and device")
        if jk is not None:
            _check(jk.shape == jv.shape,
                   lambda: f"joint_key {tuple(jk.shape)} and joint_value {tuple(jv.shape)} differ")
    elif joint_strategy is not None:
        _check(joint_strategy in ("front", "rear"),
               lambda: f"joint_strategy must be 'front', 'rear' or None, got {joint_strategy!r}")
    joint_kv = 0 if jk is None else jk.shape[2]
    _check(lengths[1] + joint_kv > 0, lambda: "attention over zero keys: give a non-empty key/value sequence")
    # With fewer K/V heads than Ulysses ranks, K/V heads are repeated up to the query heads first.
    kv_heads_eff = hkv if hkv >= ulysses else hq
    q_heads, kv_heads = layout.head_split(hq, kv_heads_eff, ulysses)
    q_sh = layout.shard_sizes(lengths[0], ulysses, ring)[r_rank * ulysses:(r_rank + 1) * ulysses]
    kv_sh = layout.shard_sizes(lengths[1], ulysses, ring)[r_rank * ulysses:(r_rank + 1) * ulysses]
    return _Plan(ulysses, ring, u_rank, r_rank, q_sh, kv_sh, q_heads, kv_heads,
                 layout.offsets(q_heads), layout.offsets(kv_heads), layout.block_sizes(lengths[1], ulysses, ring),
                 0 if jq is None else jq.shape[2], joint_kv, joint_strategy != "rear")


def _tm(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) view -> token-major (S, B, H, D) view."""
    return x.permute(2, 0, 1, 3)


def _with_joint(pieces: list, joint, front: bool) -> list:
    return pieces if joint is None else ([joint] + pieces if front else pieces + [joint])


def _centered(k_tm: torch.Tensor):
    """Token-major K minus its per-(batch, head, channel) mean over tokens, and that mean, in fp32.

    Attention scores are shift-invariant per key set only, so the mean travels with the encoded K
    and is added back after decoding; removing it first keeps large per-channel offsets out of the
    FP8 row scales (K carries them in real activations).
    """
    k = k_tm.float()
    mean = k.mean(dim=0) if k.shape[0] else k.new_zeros(k.shape[1:])
    return k - mean, mean


def _peer_parts(kind: str, x: torch.Tensor, plan: _Plan, j: int, fp8: FP8Options) -> list:
    """[(token-major tensor, fp8)] that Ulysses peer ``j`` gets of ``x`` (``kind`` ``"q"``, ``"k"`` or ``"v"``)."""
    heads, starts = (plan.q_heads, plan.q_starts) if kind == "q" else (plan.kv_heads, plan.kv_starts)
    part = _tm(x[:, starts[j]:starts[j] + heads[j]])
    if kind == "k" and fp8.k:  # the fp32 mean travels raw and is added back after decoding
        part, mean = _centered(part)
        return [(part, True), (mean, False)]
    return [(part, fp8.qvo if kind in "qv" else False)]


def _peer_specs(kind: str, plan: _Plan, j: int, b: int, d: int, fp8: FP8Options) -> list:
    """Unpack specs of what this rank receives of ``kind`` from Ulysses peer ``j``."""
    if kind == "q":
        return [((plan.q_shards[j], b, plan.q_heads[plan.u_rank], d), fp8.qvo)]
    shape = (plan.kv_shards[j], b, plan.kv_heads[plan.u_rank], d)
    if kind == "k":
        return [(shape, fp8.k)] + ([((b, plan.kv_heads[plan.u_rank], d), False, torch.float32)] if fp8.k else [])
    return [(shape, fp8.qvo)]


def _send_in(tensors: dict, plan: _Plan, group, fp8: FP8Options):
    """Issue one packed all-to-all of ``tensors`` (``{"q"|"k"|"v": tensor}``, any non-empty subset)
    for ``plan``'s heads; :func:`_recv_in` unpacks (and waits)."""
    kinds = [c for c in "qkv" if c in tensors]
    first = tensors[kinds[0]]
    b, d, dtype = first.shape[0], first.shape[3], first.dtype
    parts = [[p for c in kinds for p in _peer_parts(c, tensors[c], plan, j, fp8)] for j in range(plan.ulysses)]
    specs = [[s for c in kinds for s in _peer_specs(c, plan, j, b, d, fp8)] for j in range(plan.ulysses)]
    wire = wire_dtype(dtype, any(f for peer in parts for _, f in peer))
    send_sizes = [sum(part_size(x.shape, x.dtype, f, wire) for x, f in peer) for peer in parts]
    recv_sizes = [sum(part_size(s[0], s[2] if len(s) > 2 else dtype, s[1], wire) for s in peer) for peer in specs]
    send = pack([p for peer in parts for p in peer], wire)
    return all_to_all(send, recv_sizes, send_sizes, group), [s for peer in specs for s in peer], kinds


def _recv_in(pending, dtype: torch.dtype, fp8: FP8Options) -> dict:
    """``{kind: per-peer token-major pieces}`` of this rank's block from :func:`_send_in`'s result."""
    buf, specs, kinds = pending
    recv = iter(unpack(buf, specs, dtype))
    pieces = {c: [] for c in kinds}
    n_peers = len(specs) // sum(2 if c == "k" and fp8.k else 1 for c in kinds)
    for _ in range(n_peers):
        for c in kinds:
            x = next(recv)
            pieces[c].append((x.float() + next(recv)).to(dtype) if c == "k" and fp8.k else x)
    return pieces


def _send_out(out_tm: torch.Tensor, plan: _Plan, group, fp8: FP8Options):
    """Issue the output all-to-all of token-major (rows, B, local heads, D); ``unpack(*result, dtype)``
    waits and gives one token-major (rows, B, heads of peer j, D) piece per Ulysses peer."""
    _, b, h, d = out_tm.shape
    jq, rows = plan.joint_q, layout.offsets(plan.q_shards)
    if jq:
        joint = out_tm[:jq] if plan.front else out_tm[out_tm.shape[0] - jq:]
        base = jq if plan.front else 0
        pieces = [t for i, s in enumerate(plan.q_shards)
                  for t in _with_joint([out_tm[base + rows[i]:base + rows[i] + s]], joint, plan.front)]
    else:
        pieces = [out_tm[rows[i]:rows[i] + s] for i, s in enumerate(plan.q_shards)]
    wire = wire_dtype(out_tm.dtype, fp8.qvo)
    if wire == out_tm.dtype and not jq:
        send = out_tm.reshape(-1)  # already the peers' rows back to back: no copy
    else:
        send = pack([(x, fp8.qvo) for x in pieces], wire)
    s_out = plan.q_shards[plan.u_rank] + jq
    send_sizes = [part_size(((s + jq), b, h, d), out_tm.dtype, fp8.qvo, wire) for s in plan.q_shards]
    specs = [((s_out, b, hj, d), fp8.qvo) for hj in plan.q_heads]
    recv_sizes = [part_size(shape, out_tm.dtype, f, wire) for shape, f in specs]
    return all_to_all(send, recv_sizes, send_sizes, group), specs


def _attend(q_tm, k_tm, v_tm, scale, backend):
    """Local attention on token-major views; returns token-major output and (S, B, H) LSE."""
    out, lse = attention_with_lse(q_tm.permute(1, 2, 0, 3), k_tm.permute(1, 2, 0, 3), v_tm.permute(1, 2, 0, 3),
                                  scale, backend)
    return out.permute(2, 0, 1, 3), lse.permute(2, 0, 1)


def _ring_wire(block: torch.Tensor, fp8: FP8Options) -> torch.Tensor:
    """What a ring step sends: the raw (S, 2, B, H, D) block, or with ``fp8.ring_kv`` one flat byte
    buffer [FP8 K centred on its mean | FP8 V | fp32 K mean]."""
    if not fp8.ring_kv:
        return block
    k, mean = _centered(block[:, 0])
    return torch.cat([fp8_encode(k).reshape(-1), fp8_encode(block[:, 1]).reshape(-1), mean.view(torch.uint8).reshape(-1)])


def _ring_wire_size(rows: int, shape, fp8: FP8Options) -> int:
    """Dim-0 size of :func:`_ring_wire` for a block of ``rows`` tokens of block ``shape``."""
    if not fp8.ring_kv:
        return rows
    _, _, b, h, d = shape
    return 2 * rows * b * h * encoded_row_bytes(d) + b * h * d * 4


def _ring_unwire(buf: torch.Tensor, rows: int, shape, dtype: torch.dtype, fp8: FP8Options):
    """(K, V) token-major views of a received block."""
    if not fp8.ring_kv:
        return buf[:, 0], buf[:, 1]
    _, _, b, h, d = shape
    k8, v8, mean = unpack(buf, [((rows, b, h, d), True), ((rows, b, h, d), True), ((b, h, d), False, torch.float32)],
                          torch.float32)
    return (k8 + mean).to(dtype), v8.to(dtype)


def _ring(q_tm, own: list, plan: _Plan, group, scale, backend, fp8: FP8Options, shift=None) -> torch.Tensor:
    """Pipelined ring over ``group``: returns token-major output of ``q_tm`` against every block.

    ``own`` = [own K/V block, the slice of it to send], the caller's only references: the list is
    emptied, so after step 0 the own block is freed and at most two K/V blocks (the one computed on
    and the one in flight) are alive whatever the ring degree. With ``fp8.ring_kv`` the rotating
    blocks travel FP8-encoded (K centred) and are decoded right before their attention. ``shift``:
    the transfer, default :func:`~fastusp_xdit.comm.ring_shift` (a seam for the tests' one-device
    ring emulation).
    """
    shift = ring_shift if shift is None else shift
    acc = lse = None
    cur, send = own
    own.clear()
    shape, dtype = cur.shape, cur.dtype
    send = _ring_wire(send, fp8)
    acc_dtype = torch.promote_types(q_tm.dtype, torch.float32)
    rows_at = [plan.kv_blocks[(plan.r_rank - step) % plan.ring] + (plan.joint_kv if step == 0 else 0)
               for step in range(plan.ring)]
    last = max([-1] + [step for step, rows in enumerate(rows_at) if rows])  # the last merge writes `dtype`
    for step, rows in enumerate(rows_at):
        nxt = None
        if step + 1 < plan.ring:  # issue the next block's transfer before computing on this one
            recv_rows = plan.kv_blocks[(plan.r_rank - step - 1) % plan.ring]
            nxt = shift(send, _ring_wire_size(recv_rows, shape, fp8), group)
        if rows and q_tm.shape[0]:
            k, v = (cur[:, 0], cur[:, 1]) if step == 0 else _ring_unwire(cur, rows, shape, dtype, fp8)
            out, out_lse = _attend(q_tm, k, v, scale, backend)
            if acc is None:  # block 0 is read in its own dtype by the first merge, never copied
                acc, lse = out, out_lse
            else:
                acc, lse = lse_merge(acc, lse, out, out_lse, dtype if step == last else acc_dtype)
        cur = send = nxt
    if acc is None:  # no query rows on this rank
        return q_tm.new_empty(q_tm.shape)
    return acc.to(dtype)  # a no-op when the last merge ran (it wrote `dtype`)


def _rows(pieces: list) -> torch.Tensor:
    """Concatenate token-major pieces along tokens (a view when there is only one)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _own_block(k_pieces: list, v_pieces: list) -> torch.Tensor:
    """Token-major (S, 2, B, H, D) K/V block for the ring, written from the pieces in one pass."""
    _, b, h, d = k_pieces[0].shape
    block = k_pieces[0].new_empty(sum(k.shape[0] for k in k_pieces), 2, b, h, d)
    start = 0
    for k, v in zip(k_pieces, v_pieces):
        block[start:start + k.shape[0], 0].copy_(k)
        block[start:start + k.shape[0], 1].copy_(v)
        start += k.shape[0]
    return block


def _blocks(pieces, joint, plan: _Plan, kv_hook):
    """This rank's token-major query rows and K/V rows from the per-peer ``pieces``
    (``{"q"|"k"|"v": list}``), joint tokens included.

    Returns ``(q, [kv])``: ``kv`` is ``(k, v)`` views for ring degree 1, else one packed (S, 2, B, H, D)
    block that the ring rotates (in a list, which :func:`_local` empties: no caller keeps the block).
    """
    q_lo, q_hi = plan.heads("q")
    kv_lo, kv_hi = plan.heads("kv")
    joint_query, joint_key, joint_value = joint
    q_pieces, k_pieces, v_pieces = pieces["q"], pieces["k"], pieces["v"]
    jq = None if joint_query is None else _tm(joint_query[:, q_lo:q_hi])
    q_tm = _rows(_with_joint(q_pieces, jq, plan.front))
    if kv_hook is not None:
        k, v = kv_hook(_rows(k_pieces).permute(1, 2, 0, 3), _rows(v_pieces).permute(1, 2, 0, 3))
        k_pieces, v_pieces = [_tm(k)], [_tm(v)]
    if joint_key is not None:
        k_pieces = _with_joint(k_pieces, _tm(joint_key[:, kv_lo:kv_hi]), plan.front)
        v_pieces = _with_joint(v_pieces, _tm(joint_value[:, kv_lo:kv_hi]), plan.front)
    if plan.ring == 1:
        return q_tm, [(_rows(k_pieces), _rows(v_pieces))]
    return q_tm, [_own_block(k_pieces, v_pieces)]


def _local(q_tm, holder: list, plan: _Plan, ring_group, scale, backend, fp8: FP8Options, kv_hook):
    """Token-major output of this rank's query rows against the whole sequence (the ring when R > 1)."""
    own = holder.pop()
    if plan.ring == 1:
        return _attend(q_tm, *own, scale, backend)[0] if q_tm.shape[0] else q_tm.new_empty(q_tm.shape)
    rows = own.shape[0] - plan.joint_kv
    if kv_hook is not None:
        plan = replace(plan, kv_blocks=[rows] * plan.ring)
    blocks = [own, own[plan.joint_kv:] if plan.front else own[:rows]]
    del own
    return _ring(q_tm, blocks, plan, ring_group, scale, backend, fp8)


_PLANS: dict = {}  # metadata of a validated eager call -> its plan
_PLANS_MAX = 256


def _cached_plan(*args) -> _Plan:
    """:func:`_validate_and_plan`, remembered for eager calls: the checks and sizes depend only on the
    shapes, dtypes and devices of the tensors, the groups and the other arguments, which form the key
    (compiled graphs drop the host work anyway, so tracing always validates)."""
    if torch.compiler.is_compiling():
        return _validate_and_plan(*args)
    q, k, v, joint, *rest = args
    try:
        key = (*((t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in (q, k, v, *joint)),
               *rest)
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable argument: validation will name it
        return _validate_and_plan(*args)
    if plan is None:
        plan = _validate_and_plan(*args)
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _prepare(query, key, value, joint, joint_strategy, ulysses_group, ring_group, seq_len_q, seq_len_kv, scale,
             kv_hook, backend, fp8, head_groups):
    """Validate a call and agree on it across ranks (before any data collective); returns
    ``(plan, FP8Options, backend, head_groups)``."""
    rejected = plan = None
    try:
        fp8 = _fp8_options(fp8, query)
        if not isinstance(head_groups, (int, torch.SymInt)) or head_groups < 1:
            raise ValueError(f"head_groups must be an int >= 1, got {head_groups!r}")
        head_groups = int(head_groups)  # a host decision: torch.compile specializes on it
        plan = _cached_plan(query, key, value, joint, joint_strategy, ulysses_group, ring_group, seq_len_q, seq_len_kv)
    except ValueError as e:
        rejected = e
    # Ranks must agree before any data collective (first call of a process, or every call with
    # FASTUSP_CHECK_CONSISTENCY=1); re-raises ``rejected``, after the other ranks have heard of it.
    check_call(query, key, value, rejected=rejected, ulysses_group=ulysses_group, ring_group=ring_group,
               seq_len_q=seq_len_q, seq_len_kv=seq_len_kv, joint=joint, joint_strategy=joint_strategy, scale=scale,
               kv_hook=kv_hook, fp8=fp8, head_groups=head_groups)
    return plan, fp8, select_backend(query, key) if backend is None else backend, head_groups


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
    fp8: "FP8Options | str | None" = None,
    head_groups: int = 1,
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
        fp8: FP8 communication (:class:`fastusp_xdit.comm.fp8.FP8Options` or its spec string, e.g.
            ``"qvo"``, ``"qvo,k"``, ``"qvo,k,ring_kv"``); ``None`` sends the input dtype. K is sent
            centred on its per-head channel mean (added back after decoding); the LSE stays fp32.
        head_groups: pipeline the Ulysses all-to-alls with attention over this many head groups
            (capped by the K/V heads per Ulysses rank; 1 with Ulysses 1 or a ``kv_hook``, whose
            cache holds a rank's whole head range).

    Returns:
        (B, H, [joint_q +] S_local, D) in the input dtype, memory in token-major order.
    """
    plan, fp8, backend, head_groups = _prepare(query, key, value, (joint_query, joint_key, joint_value),
                                               joint_strategy, ulysses_group, ring_group, seq_len_q, seq_len_kv,
                                               scale, kv_hook, backend, fp8, head_groups)
    if key.shape[1] < plan.ulysses:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        if joint_key is not None:
            joint_key, joint_value = joint_key.repeat_interleave(rep, 1), joint_value.repeat_interleave(rep, 1)
    joint = (joint_query, joint_key, joint_value)
    local = (ring_group, scale, backend, fp8, kv_hook)
    if plan.ulysses == 1:
        q_tm, own = _blocks({"q": [_tm(query)], "k": [_tm(key)], "v": [_tm(value)]}, joint, plan, kv_hook)
        return _local(q_tm, own, plan, *local).permute(1, 2, 0, 3)
    plans = plan.head_groups(head_groups if kv_hook is None else 1)
    qkv = {"q": query, "k": key, "v": value}
    pending, outs = _send_in(qkv, plans[0], ulysses_group, fp8), []
    for g, group_plan in enumerate(plans):
        # the next group's input all-to-all is in flight while this group attends
        nxt = _send_in(qkv, plans[g + 1], ulysses_group, fp8) if g + 1 < len(plans) else None
        q_tm, own = _blocks(_recv_in(pending, query.dtype, fp8), joint, group_plan, kv_hook)
        outs.append(_send_out(_local(q_tm, own, group_plan, *local).contiguous(), group_plan, ulysses_group, fp8))
        pending = nxt
    pieces = [unpack(*o, query.dtype) for o in outs]  # [group][peer]; heads run peer-major, then group
    return torch.cat([p[j] for j in range(plan.ulysses) for p in pieces], dim=2).permute(1, 2, 0, 3)


def _fp8_options(fp8, query: torch.Tensor) -> FP8Options:
    """Normalise the ``fp8`` argument; FP8 needs half/fp32 inputs and a head_dim multiple of 4."""
    opts = FP8Options.parse(fp8) if isinstance(fp8, str) else (fp8 or _NO_FP8)
    if not isinstance(opts, FP8Options):
        raise ValueError(f"fp8 must be an FP8Options, a spec string like 'qvo,k' or None, got {fp8!r}")
    if opts != _NO_FP8:
        _check(query.dtype in (torch.float16, torch.bfloat16, torch.float32),
               lambda: f"FP8 communication takes float16/bfloat16/float32 inputs, got {query.dtype}: pass fp8=None")
        _check(query.shape[-1] % 4 == 0, lambda: f"FP8 communication needs head_dim % 4 == 0, got {query.shape[-1]}: "
               "pass fp8=None")
    return opts


_NO_FP8 = FP8Options(qvo=False, k=False, ring_kv=False)
