"""Steps shared by the xDiT-style examples here: xDiT's flags, device choice, timing, saving, teardown.

Each example parses exactly the flags of xDiT's own examples (``xFuserArgs.add_cli_args`` on a
``FlexibleArgumentParser``) and follows their order: ``create_config`` (which starts xfuser's
distributed environment), load the pipeline, ``prepare_run`` warm-up, one timed generation, images
from the last data-parallel group saved as ``./results/<model>_result_<parallel info>_<index>.png``.

On a machine without CUDA the examples run on CPU in float32 (gloo, via the compat layer that
``activate()`` installs) and skip xfuser's ``prepare_run`` warm-up, which builds a CUDA generator.
"""
from __future__ import annotations

import os
import time

import torch
from xfuser import xFuserArgs
from xfuser.config import FlexibleArgumentParser
from xfuser.core.distributed import (
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_runtime_state,
    get_world_group,
)


def parse_xdit_args():
    """xDiT's example flags -> ``(args, engine_args, engine_config, input_config)``; starts distributed."""
    parser = FlexibleArgumentParser(description="xFuser Arguments")
    args = xFuserArgs.add_cli_args(parser).parse_args()
    engine_args = xFuserArgs.from_cli_args(args)
    engine_config, input_config = engine_args.create_config()
    return args, engine_args, engine_config, input_config


def device() -> torch.device:
    """This rank's GPU (``cuda:<local rank>``), or the CPU when there is none."""
    if torch.cuda.is_available():
        return torch.device("cuda", get_world_group().local_rank)
    return torch.device("cpu")


def dtype(gpu_dtype: torch.dtype) -> torch.dtype:
    """The model's usual GPU dtype, or float32 on CPU (half-precision CPU kernels are slow or missing)."""
    return gpu_dtype if torch.cuda.is_available() else torch.float32


def place(pipe, args, text_encoder: str, offload: bool = False):
    """xDiT's ``--use_fp8_t5_encoder`` (FP8 weights for ``pipe.<text_encoder>``), then move to ``device()``
    (or, with ``offload``, diffusers' sequential CPU offload onto it)."""
    if args.use_fp8_t5_encoder:
        from optimum.quanto import freeze, qfloat8, quantize

        quantize(getattr(pipe, text_encoder), weights=qfloat8)
        freeze(getattr(pipe, text_encoder))
    if offload:
        pipe.enable_sequential_cpu_offload(gpu_id=device().index)
        return pipe
    return pipe.to(device())


def prepare(pipe, input_config, **kwargs) -> None:
    """xfuser's ``prepare_run`` warm-up on GPU; skipped on CPU (it builds ``torch.Generator("cuda")``)."""
    if torch.cuda.is_available():
        pipe.prepare_run(input_config, **kwargs)


def generate(pipe, input_config, **model_kwargs):
    """One timed pipeline call on the run's size, prompt, steps, output type and seed, plus the
    model's own ``model_kwargs``; returns ``(output, seconds, peak GPU bytes or 0)``."""
    dev = device()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.time()
    output = pipe(height=input_config.height, width=input_config.width, prompt=input_config.prompt,
                  num_inference_steps=input_config.num_inference_steps, output_type=input_config.output_type,
                  generator=torch.Generator(device=dev).manual_seed(input_config.seed), **model_kwargs)
    elapsed = time.time() - start
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    return output, elapsed, peak


def save_and_finish(output, name: str, engine_args, engine_config, input_config, elapsed: float, peak: int,
                    is_last_group: bool) -> None:
    """Save the images of the last data-parallel group, print the timing on the last rank, tear down."""
    parallel_info = (
        f"dp{engine_args.data_parallel_degree}_cfg{engine_config.parallel_config.cfg_degree}_"
        f"ulysses{engine_args.ulysses_degree}_ring{engine_args.ring_degree}_"
        f"tp{engine_args.tensor_parallel_degree}_"
        f"pp{engine_args.pipefusion_parallel_degree}_patch{engine_args.num_pipeline_patch}"
    )
    backend = get_runtime_state().attention_backend.name.lower()
    if input_config.output_type == "pil" and is_last_group:
        dp_rank, dp_size = get_data_parallel_rank(), get_data_parallel_world_size()
        per_group = (input_config.batch_size + dp_size - 1) // dp_size
        os.makedirs("results", exist_ok=True)
        for i, image in enumerate(output.images):
            path = f"./results/{name}_result_{parallel_info}_{backend}_{dp_rank * per_group + i}.png"
            image.save(path)
            print(f"image {i} saved to {path}")
    world = get_world_group()
    if world.rank == world.world_size - 1:
        print(f"{name}: attention backend {backend}, epoch time: {elapsed:.2f} sec, peak memory: {peak / 1e9:.2f} GB")
    get_runtime_state().destroy_distributed_env()
