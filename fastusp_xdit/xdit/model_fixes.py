"""Corrections to xfuser 0.7.0's model code around attention, active only when a fastusp backend runs.

xfuser's transformer wrappers shard the token sequence before the blocks. Where the sequence does not
divide the sequence-parallel degree they either zero-pad it (``_chunk_and_pad_sequence``,
``chunk_and_pad_sequence``, ``_pad_to_sp_divisible``: the pad rows then become keys every token
attends to) or ``torch.chunk`` it unevenly (ranks hold different lengths). A patched wrapper forward
here records the *global layout* of the sequence it is about to shard -- per sp rank, how many rows it
holds and how many of them are real -- computed from the input's shape (the same on every rank, no
host sync, plain Python ints), in :data:`_STATE` while its blocks run. The USP adapter reads it
(:func:`adapt`): the rank holding pad rows passes its K/V sliced to the real rows and every rank passes
the per-rank lengths (``seq_len_q/kv``, and ``shards_q/kv`` where they are not the balanced split),
so attention equals the unpadded model; Q keeps its pad rows (the wrapper drops their outputs).

Corrected, each named for the xfuser code it fixes (``FIXES``):

* ``transformer_wan.xFuserWanTransformer3DWrapper.forward`` (Wan 2.1/2.2): pad keys excluded;
* ``transformer_flux2.xFuserFlux2Transformer2DWrapper.forward`` (FLUX.2): image pad keys excluded,
  ``torch.chunk``-uneven text shards passed as such;
* ``transformer_qwen.xFuserQwenImageTransformerWrapper.forward`` (Qwen-Image): text and image pad
  keys excluded;
* ``transformer_hunyuan_video.xFuserHunyuanVideoTransformer3DWrapper.forward`` (HunyuanVideo):
  ``torch.chunk``-uneven image shards passed as such, and the final ``all_gather`` made uneven;
* ``transformer_flux.xFuserFlux1Transformer2DWrapper`` (FLUX.1, runner): the missing
  ``_pad_to_sp_divisible`` supplied (its ``pad_to_sp_divisible``) and the pad keys excluded; text
  that does not divide the degree is replicated on every rank by xfuser -- attended once, as joint
  tokens, instead of once per rank;
* ``transformer_z_image.xFuserZImageTransformer2DWrapper._chunk_and_pad_sequence`` (Z-Image): pad keys of
  the image, caption and joint sequences excluded (only degrees that do not divide 32, e.g. 3, pad);
* ``attention_processor.xFuserAttnProcessor2_0.__call__`` with ``latte_temporal_attention`` (Latte):
  temporal attention (sequence = frames, each rank holds all frames of its spatial positions) runs
  locally instead of through USP.

With any other backend each patched function runs xfuser's original unchanged (stock behaviour,
including its errors, is not ours to change). A layout is recorded only for shapes that need it, so
dividing shapes run exactly today's code.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Optional

import torch

from .. import layout as _layout
from . import hooks
from .targets import check_module

# "layout": the SeqLayout of the sequence the running wrapper sharded (None outside such a forward).
_STATE: dict = {"layout": None}


@dataclass(frozen=True)
class Segment:
    """One stretch of each rank's local sequence: rows held per sp rank, and how many are real (a prefix).

    ``held=None``: an evenly split stretch whose length is whatever the call's local length leaves
    (the same on every rank; e.g. HunyuanVideo's text, sharded only when it divides the degree).
    """

    held: Optional[tuple]
    real: Optional[tuple]


@dataclass(frozen=True)
class SeqLayout:
    """Global layout of one sharded sequence, identical on every rank by construction."""

    segments: tuple = ()
    front: int = 0                # rows replicated on every rank before the segments (joint, "front")
    needs_attn_layer: bool = False  # only calls passing ``attn_layer`` are over this sequence (Wan)
    local: bool = False           # run attention locally (Latte temporal blocks)


LOCAL = SeqLayout(local=True)


def pad_segment(total: int, sp: int) -> Segment:
    held, real = _layout.padded_chunk_real(total, sp)
    return Segment(tuple(held), tuple(real))


def chunk_segment(total: int, sp: int) -> Segment:
    sizes = tuple(_layout.chunk_sizes(total, sp))
    return Segment(sizes, sizes)


def _needed(lay: SeqLayout) -> bool:
    """Whether the layout differs from plain even shards (else leave today's path untouched)."""
    if lay.local or lay.front:
        return True
    return any(s.held is not None and (s.held != s.real or len(set(s.held)) > 1) for s in lay.segments)


def _run(lay: Optional[SeqLayout], fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``lay`` recorded for the USP adapter (restored after)."""
    if lay is None or not _needed(lay):
        return fn(*args, **kwargs)
    prev = _STATE["layout"]
    _STATE["layout"] = lay
    try:
        return fn(*args, **kwargs)
    finally:
        _STATE["layout"] = prev


def active() -> Optional[SeqLayout]:
    """The layout recorded by the running wrapper, or None."""
    return _STATE["layout"]


def _fastusp() -> bool:
    from . import backend as _backend
    from xfuser.core.distributed import get_runtime_state

    return get_runtime_state().attention_backend in _backend.MEMBERS


def _sp():
    from xfuser.core.distributed import get_sequence_parallel_rank, get_sequence_parallel_world_size

    return get_sequence_parallel_rank(), get_sequence_parallel_world_size()


def _refuse_empty(name: str, sizes, total: int, sp: int, what: str):
    if 0 in sizes:
        ok = next(n for n in range(total, total + 4 * sp * sp + 1) if 0 not in _layout.chunk_sizes(n, sp))
        raise ValueError(f"{name}: {total} {what} torch.chunk'ed over sequence-parallel degree {sp} leave rank(s) "
                         f"{[r for r, s in enumerate(sizes) if s == 0]} without tokens ({sizes}); use at least "
                         f"{ok} {what} or a smaller degree")


# ---------------------------------------------------------------------------------------- USP side
def adapt(query, key, value, joint_query, joint_key, joint_value, joint_strategy, attn_layer, ulysses, ring):
    """Apply the recorded layout to one fastusp USP call.

    Returns ``(query, key, value, joint_query, joint_key, joint_value, joint_strategy, kwargs)``, where
    ``kwargs`` are extra :func:`~fastusp_xdit.usp.usp_attention` keywords (``seq_len_q/kv``,
    ``shards_q/kv``; ``ulysses_group=None, ring_group=None`` for local attention). Calls not over the
    recorded sequence (other lengths, cross-attention) pass through unchanged.
    """
    lay = _STATE["layout"]
    same = (query, key, value, joint_query, joint_key, joint_value, joint_strategy, {})
    if lay is None:
        return same
    if lay.local:
        return (*same[:7], {"ulysses_group": None, "ring_group": None})
    if lay.needs_attn_layer and attn_layer is None:
        return same
    n = ulysses * ring
    me, sp = _sp()
    if sp != n:
        return same
    local = query.shape[2]
    if key.shape[2] != local:
        return same
    known = [s for s in lay.segments if s.held is not None]
    rest = local - lay.front - sum(s.held[me] for s in known)
    if rest < 0 or (rest > 0 and len(known) == len(lay.segments)):
        return same  # not this sequence
    if lay.front:
        if joint_query is not None:
            raise ValueError("fastusp: xfuser passed joint tokens and replicated text rows together")
        f = lay.front
        joint_query, joint_key, joint_value = query[:, :, :f], key[:, :, :f], value[:, :, :f]
        query, key, value = query[:, :, f:], key[:, :, f:], value[:, :, f:]
        joint_strategy = "front"
    held = [[rest] * n if s.held is None else list(s.held) for s in lay.segments]
    real = [[rest] * n if s.held is None else list(s.real) for s in lay.segments]
    shards_q = [sum(h[r] for h in held) for r in range(n)]
    shards_kv = [sum(x[r] for x in real) for r in range(n)]
    if any(h[me] != x[me] for h, x in zip(held, real)):  # this rank holds pad rows: keep its real K/V rows
        pieces_k, pieces_v, at = [], [], 0
        for h, x in zip(held, real):
            if x[me]:
                pieces_k.append(key[:, :, at:at + x[me]])
                pieces_v.append(value[:, :, at:at + x[me]])
            at += h[me]
        if pieces_k:
            key, value = torch.cat(pieces_k, dim=2), torch.cat(pieces_v, dim=2)
        else:
            key, value = key[:, :, :0], value[:, :, :0]
    kwargs = {"seq_len_q": sum(shards_q), "seq_len_kv": sum(shards_kv)}
    if shards_q != _layout.shard_sizes(kwargs["seq_len_q"], ulysses, ring):
        kwargs["shards_q"] = shards_q
    if shards_kv != _layout.shard_sizes(kwargs["seq_len_kv"], ulysses, ring):
        kwargs["shards_kv"] = shards_kv
    return query, key, value, joint_query, joint_key, joint_value, joint_strategy, kwargs


# ---------------------------------------------------------------------------------------- wrappers
WAN = "xfuser.model_executor.models.transformers.transformer_wan"
FLUX2 = "xfuser.model_executor.models.transformers.transformer_flux2"
QWEN = "xfuser.model_executor.models.transformers.transformer_qwen"
HUNYUAN_VIDEO = "xfuser.model_executor.models.transformers.transformer_hunyuan_video"
FLUX1 = "xfuser.model_executor.models.transformers.transformer_flux"
Z_IMAGE = "xfuser.model_executor.models.transformers.transformer_z_image"
PROCESSORS = "xfuser.model_executor.layers.attention_processor"

_orig: dict = {}


def _wrap(cls, name: str, make):
    key = (cls.__module__, cls.__qualname__, name)
    if key in _orig:
        return
    _orig[key] = fn = getattr(cls, name)
    new = make(fn)
    functools.update_wrapper(new, fn)
    new.__fastusp_fix__ = True
    setattr(cls, name, new)


def _record_layout(cls, layout_of):
    """Wrap ``cls.forward`` so that, with a fastusp backend, ``layout_of(self, sp, *args, **kwargs)``
    (a :class:`SeqLayout` of the global shapes) is recorded while it runs."""
    def make(orig):
        def forward(self, *args, **kwargs):
            if not _fastusp():
                return orig(self, *args, **kwargs)
            return _run(layout_of(self, _sp()[1], *args, **kwargs), orig, self, *args, **kwargs)
        return forward

    _wrap(cls, "forward", make)


# xfuser 0.7.0 transformer_wan.py, xFuserWanTransformer3DWrapper.forward: _chunk_and_pad_sequence
# zero-pads the patch sequence to a multiple of the sp degree; the pad rows were attended as keys.
def _fix_wan(module: types.ModuleType):
    check_module(module)

    def layout_of(self, sp, hidden_states, *args, **kwargs):
        p_t, p_h, p_w = self.config.patch_size
        _, _, f, h, w = hidden_states.shape
        return SeqLayout((pad_segment((f // p_t) * (h // p_h) * (w // p_w), sp),), needs_attn_layer=True)

    _record_layout(module.xFuserWanTransformer3DWrapper, layout_of)


# xfuser 0.7.0 transformer_flux2.py, xFuserFlux2Transformer2DWrapper.forward: the image is zero-padded
# (_pad_to_sp_divisible) and the text torch.chunk'ed; local sequence = [text shard, image shard].
def _fix_flux2(module: types.ModuleType):
    check_module(module)

    def layout_of(self, sp, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        text = encoder_hidden_states.shape[1]
        txt = chunk_segment(text, sp)
        _refuse_empty("FLUX.2", txt.held, text, sp, "text tokens")
        return SeqLayout((txt, pad_segment(hidden_states.shape[1], sp)))

    _record_layout(module.xFuserFlux2Transformer2DWrapper, layout_of)


# xfuser 0.7.0 transformer_qwen.py, xFuserQwenImageTransformerWrapper.forward: text and image are both
# zero-padded (chunk_and_pad_sequence); local sequence = [text shard, image shard].
def _fix_qwen(module: types.ModuleType):
    check_module(module)

    def layout_of(self, sp, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        return SeqLayout((pad_segment(encoder_hidden_states.shape[1], sp), pad_segment(hidden_states.shape[1], sp)))

    _record_layout(module.xFuserQwenImageTransformerWrapper, layout_of)


class _UnevenGatherGroup:
    """xfuser's sp GroupCoordinator whose ``all_gather`` takes torch.chunk-uneven shards (sizes known)."""

    def __init__(self, group, sizes):
        self._group, self._sizes = group, list(sizes)

    def __getattr__(self, name):
        return getattr(self._group, name)

    def all_gather(self, input_, dim=0, separate_tensors=False):
        dim = dim % input_.dim()
        top = max(self._sizes)
        me = self._group.rank_in_group
        if input_.shape[dim] != self._sizes[me] or separate_tensors:
            return self._group.all_gather(input_, dim=dim, separate_tensors=separate_tensors)
        if top != input_.shape[dim]:
            pad = list(input_.shape)
            pad[dim] = top - input_.shape[dim]
            input_ = torch.cat([input_, input_.new_zeros(pad)], dim=dim)
        full = self._group.all_gather(input_, dim=dim)
        return torch.cat([full.narrow(dim, r * top, s) for r, s in enumerate(self._sizes)], dim=dim)


# xfuser 0.7.0 transformer_hunyuan_video.py, xFuserHunyuanVideoTransformer3DWrapper.forward: the image
# sequence is torch.chunk'ed (uneven when it does not divide) and gathered back with an even all_gather.
def _fix_hunyuan_video(module: types.ModuleType):
    check_module(module)

    def make(orig):
        def forward(self, hidden_states, *args, **kwargs):
            if not _fastusp():
                return orig(self, hidden_states, *args, **kwargs)
            _, sp = _sp()
            p, p_t = self.config.patch_size, self.config.patch_size_t
            _, _, f, h, w = hidden_states.shape
            tokens = (f // p_t) * (h // p) * (w // p)
            img = chunk_segment(tokens, sp)
            _refuse_empty("HunyuanVideo", img.held, tokens, sp, "latent patches")
            # text follows the image: sharded evenly when it divides the degree, else joint ("rear")
            lay = SeqLayout((img, Segment(None, None)))
            if len(set(img.held)) == 1:
                return orig(self, hidden_states, *args, **kwargs)
            get_sp_group = module.get_sp_group
            module.get_sp_group = lambda: _UnevenGatherGroup(get_sp_group(), img.held)
            try:
                return _run(lay, orig, self, hidden_states, *args, **kwargs)
            finally:
                module.get_sp_group = get_sp_group
        return forward

    _wrap(module.xFuserHunyuanVideoTransformer3DWrapper, "forward", make)


# xfuser 0.7.0 transformer_flux.py, xFuserFlux1Transformer2DWrapper (the runner's FLUX.1): forward calls
# self._pad_to_sp_divisible, which the class lacks (it defines pad_to_sp_divisible); text that does not
# divide the degree stays whole on every rank and was attended once per rank.
def _fix_flux1(module: types.ModuleType):
    check_module(module)
    cls = module.xFuserFlux1Transformer2DWrapper
    if "_pad_to_sp_divisible" not in vars(cls):
        def _pad_to_sp_divisible(self, tensor, padding_length, dim):
            if not _fastusp():  # stock xfuser 0.7.0: the helper does not exist
                raise AttributeError(f"'{type(self).__name__}' object has no attribute '_pad_to_sp_divisible'")
            return self.pad_to_sp_divisible(tensor, padding_length, dim)
        _pad_to_sp_divisible.__fastusp_fix__ = True
        cls._pad_to_sp_divisible = _pad_to_sp_divisible

    def make(orig):
        def forward(self, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if not _fastusp():
                return orig(self, hidden_states, encoder_hidden_states, *args, **kwargs)
            _, sp = _sp()
            text = encoder_hidden_states.shape[-2]
            img = pad_segment(hidden_states.shape[1], sp)
            if text % sp == 0:  # xfuser shards the text evenly in front of the image
                lay = SeqLayout((Segment((text // sp,) * sp, (text // sp,) * sp), img))
            else:               # xfuser keeps the whole text on every rank: attend it once, as joint tokens
                lay = SeqLayout((img,), front=text)
            return _run(lay, orig, self, hidden_states, encoder_hidden_states, *args, **kwargs)
        return forward

    _wrap(cls, "forward", make)


# xfuser 0.7.0 layers/attention_processor.py, xFuserAttnProcessor2_0.__call__: with
# latte_temporal_attention the sequence is the frames and the batch the spatial positions, each rank
# holding all frames of its positions; both branches still called USP (attending across ranks' positions).
def _fix_latte(module: types.ModuleType):
    check_module(module)

    def make(orig):
        def __call__(self, attn, hidden_states, *args, latte_temporal_attention=False, **kwargs):
            if latte_temporal_attention and _fastusp():
                return _run(LOCAL, orig, self, attn, hidden_states, *args,
                            latte_temporal_attention=latte_temporal_attention, **kwargs)
            return orig(self, attn, hidden_states, *args, latte_temporal_attention=latte_temporal_attention, **kwargs)
        return __call__

    _wrap(module.xFuserAttnProcessor2_0, "__call__", make)


# xfuser 0.7.0 transformer_z_image.py, xFuserZImageTransformer2DWrapper: _chunk_and_pad_sequence zero-pads
# the image, caption and joint sequences in turn (each a multiple of 32 tokens: only degrees like 3 pad) and
# the pad rows were attended as keys; each chunked sequence's layout holds until _gather_and_unpad.
def _fix_z_image(module: types.ModuleType):
    check_module(module)
    cls = module.xFuserZImageTransformer2DWrapper

    def make_chunk(orig):
        def _chunk_and_pad_sequence(self, x, sp_world_rank, sp_world_size, pad_amount, dim):
            if x.dim() == 3 and dim % 3 == 1 and _fastusp():  # a hidden sequence (or its RoPE): masks are 2-D
                lay = SeqLayout((pad_segment(x.shape[dim], sp_world_size),))
                _STATE["layout"] = lay if _needed(lay) else None
            return orig(self, x, sp_world_rank, sp_world_size, pad_amount, dim)
        return _chunk_and_pad_sequence

    def make_gather(orig):
        def _gather_and_unpad(self, x, pad_amount, dim):
            if _fastusp():
                _STATE["layout"] = None
            return orig(self, x, pad_amount, dim)
        return _gather_and_unpad

    def make_forward(orig):
        def forward(self, *args, **kwargs):
            prev = _STATE["layout"]
            try:
                return orig(self, *args, **kwargs)
            finally:
                _STATE["layout"] = prev
        return forward

    _wrap(cls, "_chunk_and_pad_sequence", make_chunk)
    _wrap(cls, "_gather_and_unpad", make_gather)
    _wrap(cls, "forward", make_forward)


FIXES = {WAN: _fix_wan, FLUX2: _fix_flux2, QWEN: _fix_qwen, HUNYUAN_VIDEO: _fix_hunyuan_video, FLUX1: _fix_flux1,
         PROCESSORS: _fix_latte, Z_IMAGE: _fix_z_image}


def install() -> None:
    """Install every fix the moment its xfuser module loads (or now)."""
    for name, fn in FIXES.items():
        hooks.after_import(name, fn)
