"""The call spec: everything one USP call decides on the host, identical on every rank by construction.

:func:`prepare` validates a call (every check before the first collective, ``ValueError`` naming the
fix), agrees on it across ranks (:mod:`.consistency`) and returns a frozen :class:`CallSpec`: the
groups, degrees and ranks, every split size (from global shapes only, :mod:`fastusp_xdit.layout`),
the joint tokens and their strategy, the softmax scale, the wire codecs and the head groups. The
steps of :mod:`.steps` read nothing else.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Optional

import torch

from .. import layout
from ..comm.codecs import WireSpec
from ..ops import select_backend
from .consistency import check_call


@dataclass(frozen=True)
class CallSpec:
    """Host-side decisions of one call (all ranks hold equal specs but for their own ranks).

    No field has a default: ``torch.compile`` traces the construction, and dynamo (torch 2.11) cannot
    wrap a default held by the class."""

    ulysses_group: Any
    ring_group: Any
    ulysses: int
    ring: int
    u_rank: int
    r_rank: int
    q_shards: tuple   # query tokens of each Ulysses peer (this ring block)
    kv_shards: tuple  # key/value tokens of each Ulysses peer (this ring block)
    q_heads: tuple    # query heads each Ulysses peer owns after the all-to-all
    kv_heads: tuple
    q_starts: tuple   # first query head of each peer's range in the input tensors
    kv_starts: tuple
    kv_blocks: tuple  # key/value tokens of every ring block
    joint_q: int      # joint query tokens (replicated)
    joint_kv: int     # joint key/value tokens (replicated)
    front: bool       # joint tokens before (True) or after the sequence tokens
    scale: Optional[float]  # softmax scale (None: head_dim ** -0.5)
    backend: str      # local attention kernel (fastusp_xdit.ops)
    wire: WireSpec    # the codec of each travelling tensor
    head_groups: int  # requested head groups (see groups())

    def heads(self, kind: str) -> tuple[int, int]:
        """This rank's head range ``[lo, hi)`` of the input tensors (``kind`` ``"q"`` or ``"kv"``)."""
        sizes, starts = (self.q_heads, self.q_starts) if kind == "q" else (self.kv_heads, self.kv_starts)
        return starts[self.u_rank], starts[self.u_rank] + sizes[self.u_rank]

    def groups(self) -> "list[CallSpec]":
        """Specs of ``min(head_groups, fewest K/V heads of a peer)`` head groups (one when Ulysses is 1):
        each peer's range is cut into contiguous sub-ranges, query heads following their K/V heads."""
        n = min(self.head_groups, *self.kv_heads) if self.ulysses > 1 else 1
        if n <= 1:
            return [self]
        rep = self.q_heads[0] // self.kv_heads[0]
        cuts = [layout.split_sizes(h, n) for h in self.kv_heads]
        specs = []
        for g in range(n):
            kv = tuple(c[g] for c in cuts)
            starts = tuple(s + layout.offsets(c)[g] for s, c in zip(self.kv_starts, cuts))
            specs.append(replace(self, q_heads=tuple(rep * h for h in kv), kv_heads=kv,
                                 q_starts=tuple(rep * s for s in starts), kv_starts=starts))
        return specs


def _degree_rank(group) -> tuple[int, int]:
    return (1, 0) if group is None else (group.size(), group.rank())


def check(cond: bool, msg: Callable[[], str]):
    """Raise ``ValueError(msg())``; the message is built only on failure (under ``torch.compile``
    with dynamic shapes, formatting symbolic sizes would break the graph)."""
    if not cond:
        raise ValueError(msg())


def _check_tensors(q, k, v, joint, joint_strategy):
    jq, jk, jv = joint
    for name, t in (("query", q), ("key", k), ("value", v)):
        check(isinstance(t, torch.Tensor) and t.dim() == 4,
              lambda: f"{name} must be a 4-D (batch, heads, seq, head_dim) tensor, got "
              f"{getattr(t, 'shape', type(t).__name__)}: transpose BSHD inputs with .transpose(1, 2)")
        check(t.dtype.is_floating_point and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
              lambda: f"{name} has dtype {t.dtype}: pass float16, bfloat16, float32 or float64 tensors")
    check(q.dtype == k.dtype == v.dtype,
          lambda: f"query/key/value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}): cast them to one dtype")
    check(q.device == k.device == v.device, lambda: "query/key/value are on different devices: move them to one device")
    check(k.shape == v.shape, lambda: f"key {tuple(k.shape)} and value {tuple(v.shape)} must have the same shape")
    check(q.shape[0] == k.shape[0], lambda: f"batch sizes differ: query {q.shape[0]}, key {k.shape[0]}")
    check(q.shape[3] == k.shape[3], lambda: f"head_dim differs: query {q.shape[3]}, key {k.shape[3]}")
    hq, hkv = q.shape[1], k.shape[1]
    check(hq > 0 and hkv > 0 and q.shape[3] > 0,
          lambda: f"query heads ({hq}), key/value heads ({hkv}) and head_dim ({q.shape[3]}) must all be >= 1")
    check(hq % hkv == 0, lambda: f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if jq is not None or jk is not None or jv is not None:
        check(joint_strategy in ("front", "rear"),
              lambda: f"joint_strategy must be 'front' or 'rear' when joint tensors are given, got {joint_strategy!r}")
        check((jk is None) == (jv is None), lambda: "pass joint_key and joint_value together")
        for name, t, heads in (("joint_query", jq, hq), ("joint_key", jk, hkv), ("joint_value", jv, hkv)):
            if t is None:
                continue
            check(t.dim() == 4 and t.shape[0] == q.shape[0] and t.shape[1] == heads and t.shape[3] == q.shape[3],
                  lambda: f"{name} must be (batch={q.shape[0]}, heads={heads}, seq, head_dim={q.shape[3]}), the full "
                  f"replicated tensor; got {tuple(t.shape)}")
            check(t.dtype == q.dtype and t.device == q.device, lambda: f"{name} must match query's dtype and device")
        if jk is not None:
            check(jk.shape == jv.shape, lambda: f"joint_key {tuple(jk.shape)} and joint_value {tuple(jv.shape)} differ")
    elif joint_strategy is not None:
        check(joint_strategy in ("front", "rear"),
              lambda: f"joint_strategy must be 'front', 'rear' or None, got {joint_strategy!r}")


def _shards(name: str, t, total, given, ulysses: int, ring: int, sp_rank: int) -> list:
    """Every sequence-parallel rank's token count of one sequence (``given`` or the balanced layout)."""
    n, suffix = ulysses * ring, "q" if name == "query" else "kv"
    if given is not None:
        check(isinstance(given, (list, tuple)) and len(given) == n
              and all(isinstance(s, (int, torch.SymInt)) and s >= 0 for s in given),
              lambda: f"shards_{suffix} must list {n} non-negative token counts (one per sequence-parallel rank), "
              f"got {given!r}")
        check(total is None or total == sum(given),
              lambda: f"seq_len_{suffix}={total} but shards_{suffix} adds up to {sum(given)}: pass one of them")
        sizes = list(given)
    else:
        check(total is None or (isinstance(total, (int, torch.SymInt)) and total >= 0),
              lambda: f"seq_len_{suffix} must be a non-negative int (the global length) or None, got {total!r}")
        sizes = layout.shard_sizes(t.shape[2] * n if total is None else total, ulysses, ring)
    check(t.shape[2] == sizes[sp_rank],
          lambda: f"this rank (sequence-parallel rank {sp_rank} of {n}) holds {t.shape[2]} {name} tokens, but "
          f"the layout gives it {sizes[sp_rank]} (of {sum(sizes)}): shard with fastusp_xdit.layout.shard() and pass "
          f"the global length as seq_len_{suffix}")
    return sizes


def _lossy_ok(wire: WireSpec, query: torch.Tensor):
    if wire.lossy:
        check(query.dtype in (torch.float16, torch.bfloat16, torch.float32),
              lambda: f"FP8 communication takes float16/bfloat16/float32 inputs, got {query.dtype}: pass wire=None "
              "(8-bit codecs need half or fp32 inputs)")
        check(query.shape[-1] % 4 == 0, lambda: f"FP8 communication needs head_dim % 4 == 0, got "
              f"{query.shape[-1]}: pass wire=None (8-bit rows carry a 4-byte scale)")


def _build(q, k, joint, joint_strategy, ulysses_group, ring_group, seq_len_q, seq_len_kv, shards_q, shards_kv,
           scale, backend, wire, head_groups) -> CallSpec:
    jq, jk, _ = joint
    ulysses, u_rank = _degree_rank(ulysses_group)
    ring, r_rank = _degree_rank(ring_group)
    hq, hkv = q.shape[1], k.shape[1]
    check(hq >= ulysses, lambda: f"ulysses degree {ulysses} exceeds the {hq} attention heads: "
          f"use a ulysses degree <= {hq} and a larger ring degree")
    sp_rank = r_rank * ulysses + u_rank
    q_all = _shards("query", q, seq_len_q, shards_q, ulysses, ring, sp_rank)
    kv_all = _shards("key/value", k, seq_len_kv, shards_kv, ulysses, ring, sp_rank)
    joint_kv = 0 if jk is None else jk.shape[2]
    check(sum(kv_all) + joint_kv > 0, lambda: "attention over zero keys: give a non-empty key/value sequence")
    _lossy_ok(wire, q)
    # With fewer K/V heads than Ulysses ranks, K/V heads are repeated up to the query heads first.
    q_heads, kv_heads = layout.head_split(hq, hkv if hkv >= ulysses else hq, ulysses)
    mine = slice(r_rank * ulysses, (r_rank + 1) * ulysses)
    blocks = tuple(sum(kv_all[r * ulysses:(r + 1) * ulysses]) for r in range(ring))
    return CallSpec(ulysses_group, ring_group, ulysses, ring, u_rank, r_rank, tuple(q_all[mine]), tuple(kv_all[mine]),
                    tuple(q_heads), tuple(kv_heads), tuple(layout.offsets(q_heads)), tuple(layout.offsets(kv_heads)),
                    blocks, 0 if jq is None else jq.shape[2], joint_kv, joint_strategy != "rear",
                    scale, select_backend(q, k) if backend is None else backend, wire, head_groups)


_SPECS: dict = {}  # the key of a validated eager call -> its spec
_SPECS_MAX = 256


def _meta(t):
    return (t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t


class _Args(NamedTuple):
    """The host arguments of a call, by name."""

    joint_strategy: Optional[str]
    ulysses_group: Any
    ring_group: Any
    seq_len_q: Any
    seq_len_kv: Any
    shards_q: Optional[tuple]
    shards_kv: Optional[tuple]
    scale: Optional[float]
    backend: Optional[str]
    wire: WireSpec
    head_groups: int


def _cached_build(q, k, v, joint, args: _Args) -> CallSpec:
    """:func:`_build` after the tensor checks, remembered for eager calls: everything depends only on
    the tensors' shapes, dtypes and devices, the kernel override and the named arguments ``args``,
    which form the key (compiled graphs drop the host work anyway, so tracing always validates)."""
    if torch.compiler.is_compiling():
        _check_tensors(q, k, v, joint, args.joint_strategy)
        return _build(q, k, joint, *args)
    try:
        key = (_meta(q), _meta(k), _meta(v), *map(_meta, joint), os.environ.get("FASTUSP_ATTN_BACKEND"), args)
        spec = _SPECS.get(key)
    except TypeError:  # an unhashable argument (or a non-tensor input): validation will name it
        key, spec = None, None
    if spec is None:
        _check_tensors(q, k, v, joint, args.joint_strategy)
        spec = _build(q, k, joint, *args)
        if key is not None:
            if len(_SPECS) >= _SPECS_MAX:
                _SPECS.clear()
            _SPECS[key] = spec
    return spec


def prepare(query, key, value, *, joint=(None, None, None), joint_strategy=None, ulysses_group=None, ring_group=None,
            seq_len_q=None, seq_len_kv=None, shards_q=None, shards_kv=None, scale=None, kv_hook=None, backend=None,
            wire=None, fp8=None, head_groups=1) -> CallSpec:
    """Validate a call and agree on it across ranks (before any data collective); returns its spec.
    ``fp8`` is the former name of ``wire`` (pass one of them)."""
    rejected = spec = None
    if fp8 is not None:
        wire, fp8 = fp8, wire
    try:
        if fp8 is not None:
            raise ValueError("pass wire= (the codec spec) or its former name fp8=, not both")
        wire = WireSpec.of(wire)
        if not isinstance(head_groups, (int, torch.SymInt)) or head_groups < 1:
            raise ValueError(f"head_groups must be an int >= 1, got {head_groups!r}")
        head_groups = int(head_groups)  # a host decision: torch.compile specializes on it
        spec = _cached_build(query, key, value, joint, _Args(joint_strategy, ulysses_group, ring_group, seq_len_q,
                                                             seq_len_kv, shards_q and tuple(shards_q), shards_kv and tuple(shards_kv), scale,
                                                             backend, wire, head_groups))
    except ValueError as e:
        rejected = e
    # Ranks must agree before any data collective (first call of a process, or every call with
    # FASTUSP_CHECK_CONSISTENCY=1); re-raises ``rejected``, after the other ranks have heard of it.
    check_call(query, key, value, rejected=rejected, ulysses_group=ulysses_group, ring_group=ring_group,
               seq_len_q=seq_len_q, seq_len_kv=seq_len_kv, shards_q=shards_q, shards_kv=shards_kv, joint=joint,
               joint_strategy=joint_strategy, scale=scale, kv_hook=kv_hook, wire=wire, head_groups=head_groups)
    return spec

