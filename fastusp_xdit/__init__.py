"""FastUSP for xDiT: Ulysses x pipelined-ring sequence-parallel attention with traceable communication.

Layers, lowest first (a layer imports only those above it in this list):
``layout`` (split sizes from global shapes) -> ``comm`` (functional collectives) -> ``ops`` (local
attention with LSE, LSE merge) -> ``usp`` (the distributed algorithm) -> ``launch`` (process harness).
"""
from .layout import shard, shard_sizes
from .ops import attention_with_lse, merge_partials
from .usp import usp_attention

__version__ = "0.1.0"
__all__ = ["usp_attention", "attention_with_lse", "merge_partials", "shard", "shard_sizes", "__version__"]
