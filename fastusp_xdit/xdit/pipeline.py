"""One xfuser pipeline loaded on this rank: the door through which the demo and the server run xDiT.

Worker side. In a process whose default ``torch.distributed`` group exists (gloo on CPU, NCCL on
GPUs), :class:`PipelineSession` runs ``activate()``, xfuser's world group, ``xFuserArgs`` ->
``create_config`` and ``xFuser<Family>Pipeline.from_pretrained`` -- what xDiT's examples do, minus
the CUDA-only ``prepare_run`` warm-up -- and then generates images with any attention backend,
switchable between calls (``RuntimeState.set_attention_backend``, as hybrid schedules do).

Families: FLUX.1 (``FluxPipeline``) and SD3 (``StableDiffusion3Pipeline``), read from the
checkpoint's ``model_index.json``. xfuser returns the image on the last sequence-parallel rank only
(:attr:`PipelineSession.returns_output`). The "stock" backend is xfuser's own choice on accelerators
and ``SDPA_FLASH`` on CPU (the compat layer's CPU flash kernel: it returns the LSE that ring needs).

The entry points (demo, serve, doctor) reach xfuser only through this module, the one outside
:mod:`fastusp_xdit.xdit` that imports it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

# model_index.json _class_name -> xfuser's wrapper class
FAMILIES = {
    "FluxPipeline": "xFuserFluxPipeline",
    "StableDiffusion3Pipeline": "xFuserStableDiffusion3Pipeline",
}
CPU_STOCK_BACKEND = "sdpa_flash"


def quiet_libraries() -> None:
    """Errors only from diffusers, transformers and (if imported) xfuser: no per-rank INFO lines or loading bars."""
    import logging
    import sys
    import threading
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    # even a disabled tqdm bar (diffusers' step bar) creates tqdm's global multiprocessing lock, which a
    # spawned rank leaves behind at exit ("leaked semaphore objects"); one process needs a thread lock only
    tqdm.set_lock(threading.RLock())

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    if "xfuser.logger" in sys.modules:  # xfuser 0.7.0: every module logger writes through _default_handler
        sys.modules["xfuser.logger"]._default_handler.setLevel(logging.ERROR)
    # xfuser 0.7.0 calls all_gather_into_tensor, deprecated in torch 2.13 (one warning per call site and rank)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)


def pipeline_family(model: str) -> str:
    """The diffusers pipeline class named by ``model/model_index.json``; ValueError if unsupported."""
    index = os.path.join(model, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{model!r} is not a diffusers checkpoint folder (no model_index.json): pass a local "
                         "path (download it first, e.g. `hf download black-forest-labs/FLUX.1-dev --local-dir DIR`)")
    with open(index) as f:
        name = json.load(f).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{model!r} holds a {name}; supported: {', '.join(FAMILIES)}")
    return name


def backend_names() -> list[str]:
    """Every ``--attention_backend`` name xfuser accepts once fastusp is active (lower case)."""
    from . import activate

    activate()
    from xfuser.core.distributed.attention_backend import AttentionBackendType

    return [name.lower() for name in AttentionBackendType.__members__]


@dataclass(frozen=True)
class PipelineSpec:
    """What to load: checkpoint folder, parallel degrees, backend (None: stock), dtype, text length."""

    model: str
    ulysses: int = 1
    ring: int = 1
    attention_backend: str | None = None
    dtype: str = "float32"
    max_sequence_length: int = 512  # FLUX T5 tokens (xfuser 0.7.0's SD3 ignores it and uses 256)


class PipelineSession:
    """xfuser's pipeline for ``spec`` on this rank's device (``cuda:current`` under NCCL, else CPU).

    ``quiet``: :func:`quiet_libraries` once xfuser is imported (entry points print their own progress).
    """

    def __init__(self, spec: PipelineSpec, quiet: bool = True):
        import torch

        from . import activate

        if quiet:
            quiet_libraries()  # before xfuser's import warns about optional packages
        activate()
        import xfuser
        from xfuser.core.distributed import get_runtime_state, init_distributed_environment

        if quiet:
            quiet_libraries()  # now xfuser's own logger exists

        self.spec = spec
        self.family = pipeline_family(spec.model)
        cuda = torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        backend = spec.attention_backend or (None if cuda else CPU_STOCK_BACKEND)
        init_distributed_environment()  # xfuser skips its world group when the process group already exists
        engine_config, _ = xfuser.xFuserArgs(model=spec.model, ulysses_degree=spec.ulysses, ring_degree=spec.ring,
                                             attention_backend=backend).create_config()
        cls = getattr(xfuser, FAMILIES[self.family])
        self.pipe = cls.from_pretrained(pretrained_model_name_or_path=spec.model, engine_config=engine_config,
                                        dtype=getattr(torch, spec.dtype)).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._state = get_runtime_state
        self.stock_backend = self._state().attention_backend.name.lower()
        self.returns_output = bool(self.pipe.is_dp_last_group())
        patch = 2 if self.family == "FluxPipeline" else self.pipe.transformer.config.patch_size
        self.patch_multiple = int(self.pipe.vae_scale_factor) * patch

    def set_backend(self, name: str | None) -> None:
        """Switch the attention backend for the next calls (None: the stock one)."""
        self._state().set_attention_backend(name or self.stock_backend)

    def generate(self, prompt: str, steps: int, seed: int, height: int, width: int, guidance: float,
                 on_step: Callable[[int], None] | None = None):
        """Run the pipeline on every rank; the (H, W, 3) float32 image in [0, 1] where
        :attr:`returns_output`, else None. ``on_step(i)`` runs after each denoising step (device synced)."""
        import torch

        kwargs = {}
        if self.family == "FluxPipeline":
            kwargs["max_sequence_length"] = self.spec.max_sequence_length
        if on_step is not None:
            def callback(pipe, i, t, tensors):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                on_step(i)
                return {}

            kwargs["callback_on_step_end"] = callback
        result = self.pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                           guidance_scale=guidance, output_type="np",
                           generator=torch.Generator(device=self.device).manual_seed(seed), **kwargs)
        return result.images[0] if result is not None else None
