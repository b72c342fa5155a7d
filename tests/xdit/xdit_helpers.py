"""Worker-side helpers shared by the xDiT tests: an initialised xfuser runtime on the current gloo group."""
from __future__ import annotations

from types import SimpleNamespace

import torch


def xfuser_runtime(ulysses: int, ring: int, backend: str = "fastusp", heads: int = 4, cfg: bool = False):
    """activate(), then xfuser's world group, model-parallel groups and a DiT runtime state.

    The runtime state is xfuser's own ``DiTRuntimeState``, built for a stand-in pipeline that only
    carries the transformer config fields the state reads (heads, patch size, VAE scale factor 1).
    """
    from fastusp_xdit.xdit import activate

    activate()
    from xfuser.config import xFuserArgs
    from xfuser.core.distributed import init_distributed_environment
    from xfuser.core.distributed.runtime_state import get_runtime_state, initialize_runtime_state

    init_distributed_environment()
    engine_config, _ = xFuserArgs(ulysses_degree=ulysses, ring_degree=ring, use_cfg_parallel=cfg,
                                  attention_backend=backend).create_config()
    config = SimpleNamespace(num_attention_heads=heads, patch_size=1, in_channels=4, attention_head_dim=8)
    initialize_runtime_state(SimpleNamespace(transformer=SimpleNamespace(config=config), vae_scale_factor=1),
                             engine_config)
    return get_runtime_state()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def fro_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F in float64: the FP8 metric of tests/test_usp_fp8.py."""
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
