"""FastUSP members of xfuser's ``AttentionBackendType`` and their local kernel.

``--attention_backend fastusp`` reaches xfuser as ``AttentionBackendType["FASTUSP"]`` at seven sites
(runtime state, runner, hybrid schedules, ...), all of which reject names the enum lacks. The enum is
closed and every xfuser module holds the class object, so :func:`install` adds one member per
:data:`.variants.VARIANTS` entry to that same class in place (:data:`MEMBERS` maps them back).

The registry entry (xfuser's contract ``fn(q, k, v, dropout_p, is_causal, attention_kwargs) -> (out,
lse)``) serves xfuser code that calls a backend without ``USP`` (``usp.attention``, stock ring
attention); distributed calls go through :mod:`.usp_adapter`.
"""
from __future__ import annotations

import types

from ..ops import attention_with_lse
from . import hooks
from .targets import check_module
from .variants import VARIANTS

# enum member -> its variant; filled when xfuser's attention_backend module loads.
MEMBERS: dict = {}

_VARLEN_KEYS = ("indices_k", "cu_seqlens_k", "max_seqlen_k")


def check_supported(dropout_p: float, is_causal: bool, attention_kwargs) -> None:
    """Raise for call options fastusp does not implement (before any communication)."""
    if dropout_p:
        raise NotImplementedError(f"fastusp attention is inference-only (dropout_p={dropout_p}): pass dropout_p=0.0 "
                                  "or choose another --attention_backend")
    if is_causal:
        raise NotImplementedError("fastusp implements bidirectional (DiT) attention; for is_causal=True choose "
                                  "another --attention_backend")
    kwargs = attention_kwargs or {}
    if kwargs.get("attn_mask") is not None:
        raise NotImplementedError("fastusp does not take attention_kwargs['attn_mask']: express uniform trailing "
                                  "key padding as attention_kwargs['valid_kv_len'], or choose --attention_backend sdpa")
    varlen = [k for k in _VARLEN_KEYS if kwargs.get(k) is not None]
    if varlen:
        raise NotImplementedError(f"fastusp does not pack variable-length keys ({', '.join(varlen)}): express uniform "
                                  "trailing key padding as attention_kwargs['valid_kv_len'], or choose a flash backend")


def local_attention(query, key, value, dropout_p=0.0, is_causal=False, attention_kwargs=None):
    """xfuser registry kernel: BHSD in (K/V may have fewer heads), ``(out, lse)`` out, LSE (B, H, Sq) in fp32.

    Like xfuser's dense kernels it leaves ``valid_kv_len`` to the caller (``USP`` trims K/V first).
    """
    check_supported(dropout_p, is_causal, attention_kwargs)
    return attention_with_lse(query, key, value)


def _add_member(enum_cls, name: str, value: str):
    """Add ``name = value`` to an existing Enum class in place (lookup by name/value, iteration, pickling)."""
    if name in enum_cls._member_map_:
        return enum_cls._member_map_[name]
    if value in enum_cls._value2member_map_:
        raise RuntimeError(f"{enum_cls.__name__} already has the value {value!r}")
    member = object.__new__(enum_cls)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses to bind member names
    return member


# xfuser 0.7.0 core/distributed/attention_backend.py: AttentionBackendType, register_attention_function.
def _register(module: types.ModuleType):
    check_module(module)
    for variant in VARIANTS.values():
        member = _add_member(module.AttentionBackendType, variant.member, variant.description)
        module.register_attention_function(member)(local_attention)
        MEMBERS[member] = variant


def install() -> None:
    """Add the members and kernel as soon as xfuser's attention_backend module exists.

    The runner allowlists stay as they are: Cosmos3 also runs causal ``usp.attention`` and Krea-2
    key-padding masks, neither of which fastusp implements, so their early refusal is the right one.
    """
    hooks.after_import("xfuser.core.distributed.attention_backend", _register)
