"""Local (single-device) kernels: attention with LSE and the LSE merge."""
from .attention import BACKENDS, attention_with_lse, select_backend
from .merge import lse_merge, merge_into, merge_partials

__all__ = ["BACKENDS", "attention_with_lse", "select_backend", "lse_merge", "merge_into", "merge_partials"]
