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

The call is validated and agreed across ranks into a :class:`~.spec.CallSpec` first (every check
before the first collective, ``ValueError`` naming the fix); the work is the public steps of
:mod:`.steps`. All split sizes come from :mod:`fastusp_xdit.layout` (global shapes only), so every
rank issues identical collectives.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..comm.codecs import WireSpec
from .spec import prepare
from .steps import KVHook, attend, batch_major, blocks, receive_in, receive_out, send_in, send_out, token_major


def usp_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    ulysses_group=None,
    ring_group=None,
    seq_len_q: Optional[int] = None,
    seq_len_kv: Optional[int] = None,
    shards_q: Optional[tuple] = None,
    shards_kv: Optional[tuple] = None,
    joint_query: Optional[torch.Tensor] = None,
    joint_key: Optional[torch.Tensor] = None,
    joint_value: Optional[torch.Tensor] = None,
    joint_strategy: Optional[str] = None,
    scale: Optional[float] = None,
    kv_hook: Optional[KVHook] = None,
    backend: Optional[str] = None,
    wire: "WireSpec | str | None" = None,
    fp8=None,
    head_groups: int = 1,
) -> torch.Tensor:
    """Bidirectional attention over a sequence sharded across ``ulysses_group x ring_group``.

    Args:
        query, key, value: this rank's shards, (B, H, S_local, D); K/V may have fewer heads (GQA).
            Shards follow :func:`fastusp_xdit.layout.shard_sizes` over ``sp_rank = ring_rank * U +
            ulysses_rank`` unless ``shards_q`` / ``shards_kv`` say otherwise.
        ulysses_group, ring_group: process groups (``None`` = degree 1); never the world group
            unless the whole world is one sequence-parallel replica.
        seq_len_q, seq_len_kv: global lengths; default ``S_local * U * R`` (evenly divisible).
        shards_q, shards_kv: every sequence-parallel rank's token count (a list indexed by sp_rank,
            identical on all ranks, e.g. :func:`fastusp_xdit.layout.chunk_sizes` for ``torch.chunk``
            layouts); default the balanced layout of the global length.
        joint_query, joint_key, joint_value: replicated full-head joint (text) tensors, attended
            once by every query; joint query rows are returned at the ``joint_strategy`` end.
        kv_hook: ``(k, v) -> (k, v)`` applied to this rank's K/V block (B, H_local, S_block, D) after
            the all-to-all and before attention (PipeFusion's KV cache). With ring > 1 it must
            return equal-length blocks on every ring rank.
        scale: softmax scale, default ``head_dim ** -0.5``; backend: see :mod:`fastusp_xdit.ops`.
        wire: the codec of each tensor that travels (:class:`fastusp_xdit.comm.codecs.WireSpec` or
            its spec string: ``"qvo"`` e4m3 Q, V and O, ``"qvo,k"``, ``"qvo,k,ring_kv"``,
            ``"qvo=int8,k=int8"``...); ``None`` sends the input dtype. Lossy codecs send K centred on
            its per-head channel mean (added back after decoding); the LSE stays fp32.
        fp8: the former name of ``wire`` (an ``FP8Options`` or the same spec strings).
        head_groups: pipeline the Ulysses all-to-alls with attention over this many head groups
            (capped by the K/V heads per Ulysses rank; 1 with Ulysses 1 or a ``kv_hook``, whose
            cache holds a rank's whole head range).

    Returns:
        (B, H, [joint_q +] S_local, D) in the input dtype, stored in (B, S, H, D) memory order: the
        ``.transpose(1, 2).reshape(B, S, H * D)`` xfuser's processors apply is then a free view, and
        the next projection gets a dense input (a strided one takes another GEMM path in cuBLAS, whose
        rounding differs: ``benchmarks/one_gpu/layout_probe.py``).
    """
    joint = (joint_query, joint_key, joint_value)
    spec = prepare(query, key, value, joint=joint, joint_strategy=joint_strategy, ulysses_group=ulysses_group,
                   ring_group=ring_group, seq_len_q=seq_len_q, seq_len_kv=seq_len_kv, shards_q=shards_q,
                   shards_kv=shards_kv, scale=scale, kv_hook=kv_hook, backend=backend,
                   wire=wire, fp8=fp8, head_groups=head_groups)
    if key.shape[1] < spec.ulysses:
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        if joint_key is not None:
            joint = (joint_query, joint_key.repeat_interleave(rep, 1), joint_value.repeat_interleave(rep, 1))
    if spec.ulysses == 1:
        q_tm, own = blocks({"q": [token_major(query)], "k": [token_major(key)], "v": [token_major(value)]}, joint,
                           spec, kv_hook)
        return batch_major(attend(q_tm, own, spec, kv_hook))
    specs = spec.groups() if kv_hook is None else [spec]
    qkv = {"q": query, "k": key, "v": value}
    pending, outs = send_in(qkv, specs[0]), []
    for g, group_spec in enumerate(specs):
        # the next group's input all-to-all is in flight while this group attends
        nxt = send_in(qkv, specs[g + 1]) if g + 1 < len(specs) else None
        q_tm, own = blocks(receive_in(pending), joint, group_spec, kv_hook)
        outs.append(send_out(attend(q_tm, own, group_spec, kv_hook).contiguous(), group_spec))
        pending = nxt
    pieces = [receive_out(o) for o in outs]  # [group][peer]; heads run peer-major, then group
    # the one copy of the output: written (B, S, H, D), what callers reshape to (B, S, H*D) for free
    return torch.cat([p[j].transpose(0, 1) for j in range(spec.ulysses) for p in pieces], dim=2).transpose(1, 2)

