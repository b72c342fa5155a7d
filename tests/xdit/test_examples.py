"""The xDiT-style examples in ``examples/`` run end to end under torchrun on tiny random pipelines (gloo, CPU).

FLUX.1 runs the way the README tells users to: ``torchrun -m fastusp_xdit.apps.run examples/flux_example.py``.
The slow cases run the other examples as plain scripts (each calls ``activate()`` itself): SD3 with CFG
parallel x Ulysses 2 on 4 processes, PixArt-Sigma and Qwen-Image with Ulysses 2. torchrun runs in its own
process group with a deadline; on timeout the whole group is killed.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, target: list[str], args: list[str], cwd: Path) -> Path:
    """Run ``torchrun --nproc_per_node=N TARGET ARGS`` in ``cwd``; return the one image it saved."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTUSP_XDIT_AUTOLOAD": "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", *target, *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{target} did not finish within {TIMEOUT} s:\n{out[-4000:]}")
    assert proc.returncode == 0, f"{target} exited {proc.returncode}:\n{out[-6000:]}"
    images = sorted((cwd / "results").glob("*.png"))
    assert len(images) == 1, (images, out[-3000:])
    return images[0]


def _check_image(path: Path, size: int, parallel: str) -> None:
    from PIL import Image

    assert parallel in path.name and path.name.endswith("_fastusp_0.png"), path.name
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (size, size, 3) and pixels.std() > 0, (pixels.shape, pixels.std())


def _common_args(model: str, size: int, *extra: str) -> list[str]:
    return ["--model", model, "--attention_backend", "fastusp", "--height", str(size), "--width", str(size),
            "--num_inference_steps", "2", "--max_sequence_length", "8", "--prompt", "a tiny red cat", *extra]


def test_flux_example_under_torchrun_with_run_module(tmp_path):
    from fastusp_xdit.xdit.tiny import build_tiny_flux

    model = build_tiny_flux(tmp_path / "tiny_flux")
    image = _torchrun(2, ["-m", "fastusp_xdit.apps.run", str(REPO / "examples" / "flux_example.py")],
                      _common_args(model, 16, "--ulysses_degree", "2"), tmp_path)
    _check_image(image, 16, "ulysses2_ring1")


@pytest.mark.slow
def test_sd3_example_as_plain_script_with_cfg_parallel(tmp_path):
    from fastusp_xdit.xdit.tiny import build_tiny_sd3

    model = build_tiny_sd3(tmp_path / "tiny_sd3")
    image = _torchrun(4, [str(REPO / "examples" / "sd3_example.py")],
                      _common_args(model, 8, "--ulysses_degree", "2", "--use_cfg_parallel"), tmp_path)
    _check_image(image, 8, "cfg2_ulysses2_ring1")


def _build_tiny_pixart_sigma(path: Path) -> str:
    """Tiny random PixArt-Sigma (1 block, 4 heads x 8, patch 1, VAE scale factor 1), saved to ``path``."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    from fastusp_xdit.xdit.tiny import _t5_encoder, _t5_tokenizer, _vae

    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = _t5_tokenizer()
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=1, patch_size=1, attention_head_dim=8, num_attention_heads=4,
            caption_channels=32, in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6)
        PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=_t5_encoder(tokenizer), vae=_vae(latent_channels=4),
                            transformer=transformer, scheduler=DPMSolverMultistepScheduler()).save_pretrained(path)
    return str(path)


@pytest.mark.slow
def test_pixartsigma_example_as_plain_script(tmp_path):
    model = _build_tiny_pixart_sigma(tmp_path / "tiny_pixart")
    image = _torchrun(2, [str(REPO / "examples" / "pixartsigma_example.py")],
                      _common_args(model, 8, "--ulysses_degree", "2", "--no_use_resolution_binning"), tmp_path)
    _check_image(image, 8, "ulysses2_ring1")


@pytest.mark.slow
def test_qwenimage_example_as_plain_script(tmp_path):
    from fastusp_xdit.xdit.tiny import build_tiny_qwen_image

    model = build_tiny_qwen_image(tmp_path / "tiny_qwen")
    image = _torchrun(2, [str(REPO / "examples" / "qwenimage_example.py")],
                      _common_args(model, 32, "--ulysses_degree", "2", "--guidance_scale", "2.0",
                                   "--negative_prompt", " "), tmp_path)
    _check_image(image, 32, "ulysses2_ring1")
