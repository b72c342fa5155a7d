"""Drop-in replacement for xfuser 0.7.0's ``USP``: fastusp backends run :func:`~fastusp_xdit.usp.usp_attention`.

:func:`USP` has xfuser's signature. On every call it looks up the effective backend (the ``backend``
argument, else the runtime state's, which per-step hybrid schedules change between steps): a member
of :data:`.backend.MEMBERS` runs fastusp on yunchang's Ulysses/ring groups; anything else goes to
xfuser's own ``USP`` unchanged. Mapping of xfuser's arguments:

* ``joint_query/key/value``, ``joint_strategy``: passed through (same semantics: the replicated
  joint query rows come back at the ``joint_strategy`` end, joint K/V are attended once);
* ``attn_layer`` with a PipeFusion KV cache: xfuser's ``_update_and_get_kv_cache`` runs as the
  ``kv_hook`` (after the all-to-all, before attention), as in xfuser;
* ``attention_kwargs["valid_kv_len"]``: K/V trimmed to that length inside the hook, as in xfuser;
* ``kv_head_repeat``: K/V stay compact (fastusp handles grouped-query attention natively);
* ``combine_qkv_a2a``: ignored (fastusp always packs Q|K|V into one collective);
  ``head_balance_layer``: ignored (xfuser balances only sparse backends);
* ``dropout_p``, ``is_causal``, ``attn_mask``, varlen keys, ``--use_fp8_comms``: refused with an error
  naming the alternative.

:func:`install` puts :func:`USP` into ``xfuser.model_executor.layers.usp`` as soon as it loads. Model
files import ``USP`` by value, so it also rebinds every module global and instance attribute still
holding xfuser's original (for the case where xfuser was imported before ``activate()``).
"""
from __future__ import annotations

import gc
import sys
import types
from typing import Callable, NamedTuple

from yunchang.globals import PROCESS_GROUP

from ..usp import usp_attention, usp_attention_staged
from . import backend as _backend
from . import hooks, model_fixes
from .targets import check_module

USP_MODULE = "xfuser.model_executor.layers.usp"


class _Xfuser(NamedTuple):
    """xfuser 0.7.0 functions the adapter calls (a tuple: the rebinding sweep leaves it alone)."""

    usp: Callable
    get_runtime_state: Callable
    ulysses_degree: Callable
    ring_degree: Callable
    has_kv_cache: Callable
    update_kv_cache: Callable


_xf: _Xfuser | None = None


def _kv_hook(cache_layer, valid_kv_len):
    if cache_layer is None and valid_kv_len is None:
        return None

    def hook(key, value):
        if cache_layer is not None:
            key, value = _xf.update_kv_cache(key, value, cache_layer)
        if valid_kv_len is not None:
            if valid_kv_len > key.shape[2]:  # only a PipeFusion cache makes the length unknown upfront
                raise ValueError(f"valid_kv_len ({valid_kv_len}) exceeds the {key.shape[2]} cached keys of this block")
            key, value = key[:, :, :valid_kv_len], value[:, :, :valid_kv_len]
        return key, value

    return hook


def USP(
    query,
    key,
    value,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    joint_query=None,
    joint_key=None,
    joint_value=None,
    joint_strategy: str | None = None,
    attn_layer=None,
    combine_qkv_a2a: bool | None = None,
    backend=None,
    attention_kwargs: dict | None = None,
    head_balance_layer=None,
    kv_head_repeat: int = 1,
):
    """xfuser's ``USP`` contract (BHSD shards in, this rank's BHSD output out); see the module doc."""
    state = _xf.get_runtime_state()
    variant = _backend.MEMBERS.get(state.attention_backend if backend is None else backend)
    if variant is None:
        return _xf.usp(query, key, value, dropout_p, is_causal, joint_query, joint_key, joint_value,
                       joint_strategy, attn_layer, combine_qkv_a2a, backend, attention_kwargs,
                       head_balance_layer, kv_head_repeat)
    _backend.check_supported(dropout_p, is_causal, attention_kwargs)
    _check_state(state)
    if kv_head_repeat != 1 and query.shape[1] != key.shape[1] * kv_head_repeat:
        raise ValueError(f"query heads ({query.shape[1]}) must equal key/value heads ({key.shape[1]}) times "
                         f"kv_head_repeat ({kv_head_repeat})")
    ulysses, ring = _xf.ulysses_degree(), _xf.ring_degree()
    # The cache is an identity without pipeline patches (xfuser 0.7.0 CacheManager): skip its copies.
    cached = state.num_pipeline_patch > 1 and _xf.has_kv_cache(attn_layer)
    valid_kv_len = (attention_kwargs or {}).get("valid_kv_len")
    if valid_kv_len is not None:
        block = key.shape[2] * ulysses  # keys of one ring block after the all-to-all (a cache may hold more)
        if valid_kv_len < 1 or (valid_kv_len > block and not cached):
            raise ValueError(f"attention_kwargs['valid_kv_len'] = {valid_kv_len}: keep it in [1, {block}], the keys "
                             "of one ring block after the Ulysses all-to-all")
    # xfuser's model code padded or torch.chunk'ed this sequence unevenly: its global layout (model_fixes)
    query, key, value, joint_query, joint_key, joint_value, joint_strategy, layout_kwargs = model_fixes.adapt(
        query, key, value, joint_query, joint_key, joint_value, joint_strategy, attn_layer, ulysses, ring)
    return usp_attention(
        query, key, value, **{**_groups(ulysses, ring), **layout_kwargs},
        joint_query=joint_query, joint_key=joint_key, joint_value=joint_value,
        joint_strategy=joint_strategy or None,
        kv_hook=_kv_hook(attn_layer if cached else None, valid_kv_len),
        **variant.usp_kwargs,
    )


def _groups(ulysses: int, ring: int) -> dict:
    """yunchang's Ulysses and ring groups of this rank as ``usp_attention`` keywords (None at degree 1)."""
    return dict(ulysses_group=PROCESS_GROUP.ULYSSES_PG if ulysses > 1 else None,
                ring_group=PROCESS_GROUP.RING_PG if ring > 1 else None)


def _check_state(state) -> None:
    if state.fp8_comms is not None:
        raise NotImplementedError("--use_fp8_comms is xfuser's AMD FP8 all-to-all; with fastusp drop it and use "
                                  "--attention_backend fastusp_fp8")


def staged_backend() -> bool:
    """Whether the effective backend is a staged variant (false before the adapter loads)."""
    if _xf is None:
        return False
    variant = _backend.MEMBERS.get(_xf.get_runtime_state().attention_backend)
    return variant is not None and variant.staged


def staged_usp(value_fn, query_fn, key_fn, after=None):
    """:func:`~fastusp_xdit.usp.staged.usp_attention_staged` on yunchang's groups with the effective
    backend's options: the call of the FLUX overlap mode (:mod:`.flux_overlap`)."""
    state = _xf.get_runtime_state()
    _check_state(state)
    return usp_attention_staged(value_fn, query_fn, key_fn, after=after,
                                **_groups(_xf.ulysses_degree(), _xf.ring_degree()),
                                **_backend.MEMBERS[state.attention_backend].usp_kwargs)


def _rebind(old, new) -> None:
    """Point every module global and instance attribute holding ``old`` at ``new``."""
    module_dicts = {id(vars(m)) for m in list(sys.modules.values()) if isinstance(m, types.ModuleType)}
    for ref in gc.get_referrers(old):
        if isinstance(ref, dict):
            owner_is_instance = id(ref) not in module_dicts and any(
                getattr(o, "__dict__", None) is ref and not isinstance(o, (type, types.FunctionType))
                for o in gc.get_referrers(ref))
            if id(ref) in module_dicts or owner_is_instance:
                for name in [k for k, v in ref.items() if v is old]:
                    ref[name] = new
        elif not isinstance(ref, (tuple, list, type, types.FunctionType, types.ModuleType, types.CellType)) \
                and hasattr(ref, "__dict__"):
            for name in [k for k, v in vars(ref).items() if v is old]:
                setattr(ref, name, new)


# xfuser 0.7.0 model_executor/layers/usp.py: USP and the helpers it uses for PipeFusion.
def _install(usp_module: types.ModuleType) -> None:
    global _xf
    if usp_module.USP is USP:
        return
    check_module(usp_module)
    stock = usp_module.USP
    _xf = _Xfuser(stock, usp_module.get_runtime_state, usp_module.get_ulysses_parallel_world_size,
                  usp_module.get_ring_parallel_world_size, usp_module._has_kv_cache,
                  usp_module._update_and_get_kv_cache)
    usp_module.USP = USP
    _rebind(stock, USP)


def stock_usp() -> Callable:
    """xfuser's own ``USP`` (for A/B comparisons); requires the adapter to be installed."""
    if _xf is None:
        raise RuntimeError("xfuser's usp module is not loaded yet: call activate() and import xfuser first")
    return _xf.usp


def install() -> None:
    """Replace xfuser's ``USP`` now if its module is loaded, else the moment it loads."""
    hooks.after_import(USP_MODULE, _install)
