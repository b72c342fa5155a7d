"""Whether a module of Triton kernels serves a CUDA device: the one place that decides it.

Kernel modules import triton at their top, so they are imported only here, on first use on a CUDA
device (CPU-only machines never import triton). The answer is cached per module and device.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch


@functools.lru_cache(maxsize=None)
def kernels_on(module: str, device_index: int, min_capability: tuple, what: str) -> bool:
    """True when ``device_index`` has compute capability >= ``min_capability`` and ``module`` imports;
    otherwise the caller uses its torch implementation (a missing triton is warned about once)."""
    if torch.cuda.get_device_capability(device_index) < min_capability:
        return False
    try:
        importlib.import_module(module)
    except ImportError as e:
        warnings.warn(f"{what}: triton unavailable ({e}); using the slower torch implementation")
        return False
    return True
