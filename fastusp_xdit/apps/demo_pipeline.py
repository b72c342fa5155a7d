"""``fastusp-xdit demo``: the main job. FastUSP inside xDiT's own FLUX pipeline, against stock xfuser.

Without ``--model`` it builds a tiny random-weight FLUX.1 pipeline offline (:mod:`.xdit.tiny`) into a
temporary folder, so it needs no weights, no network and no GPU. It then runs, on the same prompt and
seed:

* one process (plain diffusers attention: xfuser's non-parallel path), the reference;
* ``ulysses x ring`` processes (default Ulysses 2) with xfuser's stock backend, ``fastusp`` and
  ``fastusp_fp8``, all three in one pipeline loaded once per process (the backend is switched
  between calls).

Processes are joined by gloo on CPU, by NCCL when there are enough GPUs (one per process). It prints
seconds per denoising step and the max absolute / relative difference of each image against the
1-process image (and against the stock backend), and writes every image as a PNG plus ``demo.json``
(command, device, versions, date, table) into ``--out``. The comparison uses the float images before
8-bit rounding. ``--model PATH`` runs a local FLUX.1 or SD3 checkpoint the same way.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import threading
import time

import numpy as np

from .launch import run_distributed
from ..xdit.pipeline import PipelineSpec, quiet_libraries

FASTUSP_BACKENDS = ("fastusp", "fastusp_fp8")
TINY_DEFAULTS = dict(steps=4, size=64, dtype="float32", max_sequence_length=32)
MODEL_DEFAULTS = dict(steps=28, size=1024, dtype="bfloat16", max_sequence_length=512)


def _job(spec: PipelineSpec, backends: tuple, call: dict, progress) -> list | None:
    """Worker: load the pipeline, run each backend (None: stock); the last rank returns the results."""
    import torch.distributed as dist

    from ..xdit.pipeline import PipelineSession

    rank0, world = dist.get_rank() == 0, dist.get_world_size()
    session = PipelineSession(spec)
    out = []
    for backend in backends:
        session.set_backend(backend)
        name = backend or session.stock_backend
        if world == 1:  # xfuser runs plain diffusers when nothing is parallel
            name = "diffusers"
            config, png = "1 process (diffusers attention)", "1proc.png"
        else:
            config = f"{_label(spec.ulysses, spec.ring)}: {name}" + ("" if backend else " (stock)")
            png = f"u{spec.ulysses}r{spec.ring}_{name}.png"
        stamps = []

        def on_step(i):
            stamps.append(time.perf_counter())
            if rank0:
                progress.put((config, i + 1, call["steps"]))

        start = time.perf_counter()
        image = session.generate(on_step=on_step, **call)
        if session.returns_output:
            # steps 2..n: the first step also carries text encoding and one-time set-up
            out.append(dict(config=config, world=world, backend=name, stock=backend is None, png=png, image=image,
                            sec_per_step=(stamps[-1] - stamps[0]) / (len(stamps) - 1),
                            total_s=time.perf_counter() - start))
    return out if session.returns_output else None


def _show_progress(events) -> None:
    """Parent side: one tqdm bar per configuration, fed by rank 0's per-step events (None ends)."""
    from tqdm import tqdm

    bars = {}
    for config, done, total in iter(events.get, None):
        if config not in bars:
            bars[config] = tqdm(total=total, desc=config, unit="step", dynamic_ncols=True)
        bars[config].update(done - bars[config].n)
        if done == total:
            bars[config].close()
    for bar in bars.values():
        bar.close()


def _diff(image: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """max |image - ref| and that over max |ref|, in float64."""
    d = float(np.abs(image.astype(np.float64) - ref.astype(np.float64)).max())
    return d, d / float(np.abs(ref.astype(np.float64)).max())


def _save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)).save(path)


def _table(rows: list) -> str:
    head = (f"{'configuration':<38}{'world':>6}{'s/step':>9}{'max|d| vs 1 proc':>18}{'rel vs 1 proc':>15}"
            f"{'rel vs stock':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [f"{r[k]:.2e}" if r.get(k) is not None else "-" for k in ("max_abs_vs_1proc", "rel_vs_1proc",
                                                                            "rel_vs_stock")]
        lines.append(f"{r['config']:<38}{r['world']:>6}{r['sec_per_step']:>9.4f}{cells[0]:>18}{cells[1]:>15}"
                     f"{cells[2]:>14}")
    return "\n".join(lines)


def run(model: str | None = None, ulysses: int = 2, ring: int = 1, steps: int | None = None,
        height: int | None = None, width: int | None = None, prompt: str = "a tiny red cat on a piano, 4k",
        seed: int = 42, guidance: float = 3.5, dtype: str | None = None, out_dir: str = "fastusp_demo",
        timeout: float = 900.0, command: str = "fastusp-xdit demo") -> dict:
    """Run the demo and write its files; returns the JSON record (``rows`` holds the table)."""
    import torch

    from . import doctor

    world = ulysses * ring
    if ulysses < 1 or ring < 1 or world < 2:
        raise ValueError(f"ulysses {ulysses} x ring {ring}: the demo compares a parallel run with a 1-process "
                         "one, so use at least 2 processes (e.g. --ulysses 2)")
    defaults = MODEL_DEFAULTS if model else TINY_DEFAULTS
    steps = defaults["steps"] if steps is None else steps
    if steps < 2:
        raise ValueError(f"--steps {steps}: use at least 2 (seconds per step are timed from step 2 on)")
    height, width = height or defaults["size"], width or defaults["size"]
    dtype = dtype or defaults["dtype"]
    gpus = torch.cuda.device_count()
    pg = "nccl" if gpus >= world else "gloo"
    cores = os.cpu_count() or 1
    call = dict(prompt=prompt, steps=steps, seed=seed, height=height, width=width, guidance=guidance)
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="fastusp_demo_") as tmp:
        if model is None:
            from ..xdit.tiny import build_tiny_flux

            print("building the tiny random-weight FLUX.1 pipeline (offline) ...", flush=True)
            model = build_tiny_flux(os.path.join(tmp, "tiny-flux"))
            model_name = "tiny random-weight FLUX.1 (fastusp_xdit.xdit.tiny, built offline)"
        else:
            model_name = model
        print(f"{model_name}: {height}x{width}, {steps} steps, {dtype}, seed {seed}; "
              f"{_label(ulysses, ring)} on {world} processes ({pg}) vs 1 process", flush=True)
        progress = mp.get_context("spawn").Queue()
        shown = threading.Thread(target=_show_progress, args=(progress,), daemon=True)
        shown.start()
        results = []
        try:
            for n, backends in ((1, (None,)), (world, (None, *FASTUSP_BACKENDS))):
                spec = PipelineSpec(model, ulysses=ulysses if n > 1 else 1, ring=ring if n > 1 else 1,
                                    dtype=dtype, max_sequence_length=defaults["max_sequence_length"])
                # every process gets cores / world threads in both runs (the 1-process run oversubscribed
                # with cores threads crawled on a busy 2-core machine)
                per_rank = run_distributed(_job, n, spec, backends, call, progress, timeout=timeout,
                                           backend=pg, threads=max(1, cores // world))
                results += per_rank[-1]
        finally:
            progress.put(None)
            shown.join(timeout=5)
    rows = _rows(results, out_dir)
    record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": doctor.device_summary(),
              "versions": doctor.versions(), "model": model_name, "process_group": pg,
              "settings": dict(call, dtype=dtype, ulysses=ulysses, ring=ring, world=world),
              "rows": rows, "wall_s": round(time.perf_counter() - t0, 2)}
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(_table(rows))
    print(f"wrote {len(rows)} PNG images and demo.json to {out_dir}/ ({record['wall_s']:.0f} s)")
    return record


def _label(ulysses: int, ring: int) -> str:
    return " x ".join(f"{name} {d}" for name, d in (("ulysses", ulysses), ("ring", ring)) if d > 1)


def _rows(results: list, out_dir: str) -> list:
    """Table rows (1-process first), comparing each image with the 1-process and stock ones; saves PNGs."""
    single = results[0]["image"]
    stock = next(r["image"] for r in results if r["stock"] and r["world"] > 1)
    rows = []
    for r in results:
        _save_png(r["image"], os.path.join(out_dir, r["png"]))
        row = {k: v for k, v in r.items() if k != "image"}
        if r["world"] > 1:
            row["max_abs_vs_1proc"], row["rel_vs_1proc"] = _diff(r["image"], single)
            row["rel_vs_stock"] = None if r["stock"] else _diff(r["image"], stock)[1]
        rows.append(row)
    return rows
