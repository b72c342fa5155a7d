"""FastUSP for xDiT: Ulysses x pipelined-ring sequence-parallel attention with traceable communication.

Layers, lowest first (a layer imports only those above it in this list):
``layout`` (split sizes from global shapes) -> ``comm`` (functional collectives, wire codecs, packing)
-> ``ops`` (local attention with LSE, LSE merge) -> ``usp`` (the distributed algorithm: call spec,
public steps, ``usp_attention``, ``usp_attention_staged``) -> ``xdit`` (everything that touches
xfuser: the variant registry, ``activate()``) -> ``apps`` (CLI, demo, serve, doctor, launch, run,
planner).

The names below load on first use (PEP 562): ``fastusp_xdit_autoload.pth`` imports
``fastusp_xdit._autoload`` at every interpreter start, which must not import torch.
"""
import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "usp_attention": ".usp",
    "usp_attention_staged": ".usp",
    "attention_with_lse": ".ops",
    "merge_partials": ".ops",
    "shard": ".layout",
    "shard_sizes": ".layout",
    "activate": ".xdit",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
