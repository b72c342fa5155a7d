"""CPU compatibility layer for xfuser 0.7.0: lets xfuser import and run on gloo without an accelerator.

In-memory patches only (no site-packages edit), installed by :func:`install` on machines with no
CUDA/ROCm/NPU/MUSA/MPS device and a no-op elsewhere. Each patch lands right after its module
executes (see :mod:`.hooks`), after :func:`.targets.check_module` confirmed the symbols it replaces.
``install`` must run before ``import xfuser`` (which fails on CPU without it).

Not patched: ``xFuserFluxPipeline.prepare_run`` / ``xFuserStableDiffusion3Pipeline.prepare_run``
build ``torch.Generator(device="cuda")``; skip that warm-up on CPU and call the pipeline directly.
"""
from __future__ import annotations

import sys
import types

import torch

from . import hooks
from .targets import check_module


def cpu_only() -> bool:
    """True when torch sees no accelerator xfuser knows (CUDA/ROCm, NPU, MUSA, MPS)."""
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return False
    return not any(getattr(torch, dev, None) is not None and getattr(torch, dev).is_available()
                   for dev in ("npu", "musa"))


# xfuser 0.7.0 core/sparge_attention/block_mask.py imports triton at module level (GPU-only); sparge.py
# imports get_block_map_meansim from it. Sparge backends need a GPU anyway.
def _block_mask_stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name, "fastusp CPU stand-in for xfuser's triton block-mask kernels")

    def get_block_map_meansim(*args, **kwargs):
        raise RuntimeError("xfuser's Sparge block masks need triton and a GPU; pick a dense --attention_backend")

    module.get_block_map_meansim = get_block_map_meansim
    module.__fastusp_substitute__ = True
    return module


def _no_device_version():
    """CPU stand-in for xfuser 0.7.0 ``envs.get_device_version`` (which raises without an accelerator)."""
    return None


def _gloo():
    """CPU stand-in for xfuser 0.7.0 ``envs.get_torch_distributed_backend`` (raises without an accelerator)."""
    return "gloo"


def _patch_envs(envs: types.ModuleType):
    check_module(envs)
    envs.get_device_version = _no_device_version        # read lazily by envs.CUDA_VERSION
    envs.get_torch_distributed_backend = _gloo
    # xfuser 0.7.0 PackagesEnvChecker.check_long_ctx_attn reports yunchang missing without CUDA/NPU,
    # which silently forces ulysses = ring = 1; yunchang works on CPU.
    from yunchang import set_seq_parallel_pg  # noqa: F401  (fail here if yunchang is missing)

    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
    stale = [name for name, m in list(sys.modules.items())
             if name.startswith("xfuser.") and getattr(m, "HAS_LONG_CTX_ATTN", None) is False]
    if stale:
        raise RuntimeError(f"{stale} were imported before fastusp_xdit.xdit.activate() and copied "
                           "has_long_ctx_attn=False: call activate() before importing xfuser")


# xfuser 0.7.0 binds PROCESS_GROUP to None in these modules unless CUDA or an NPU is available.
def _point_process_group(module: types.ModuleType):
    check_module(module)
    from yunchang.globals import PROCESS_GROUP

    module.PROCESS_GROUP = PROCESS_GROUP


def _no_sync(device=None):
    """CPU stand-in for ``torch.cuda.synchronize`` (nothing runs asynchronously on CPU)."""


# xfuser 0.7.0 group_coordinator imports torch.cuda.synchronize for its pipeline send/recv.
def _patch_group_coordinator(module: types.ModuleType):
    check_module(module)
    module.synchronize = _no_sync


def _sdpa_flash_cpu(query, key, value, dropout_p, is_causal, attention_kwargs=None):
    """xfuser 0.7.0 SDPA_FLASH with torch's CPU flash kernel: same op family, returns the LSE."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p=dropout_p, is_causal=is_causal)
    return out, lse


# xfuser 0.7.0 registers SDPA_FLASH as aten._scaled_dot_product_flash_attention, which has no CPU
# kernel; no stock backend gives an LSE on CPU, so stock ring attention could not run at all.
def _patch_attention_backend(module: types.ModuleType):
    check_module(module)
    module.ATTENTION_FUNCTION_REGISTRY[module.AttentionBackendType.SDPA_FLASH] = _sdpa_flash_cpu


def install() -> bool:
    """Install the CPU patches if this machine has no accelerator; returns whether it did."""
    if not cpu_only():
        return False
    hooks.substitute("xfuser.core.sparge_attention.block_mask", _block_mask_stub)
    hooks.after_import("xfuser.envs", _patch_envs)
    for name in ("xfuser.model_executor.layers.usp", "xfuser.core.distributed.fp8_comms",
                 "xfuser.core.sparge_attention.head_balance"):
        hooks.after_import(name, _point_process_group)
    hooks.after_import("xfuser.core.distributed.group_coordinator", _patch_group_coordinator)
    hooks.after_import("xfuser.core.distributed.attention_backend", _patch_attention_backend)
    return True
