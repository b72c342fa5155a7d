"""``fastusp-xdit demo``: the main job. FastUSP inside xDiT's own FLUX pipeline, against stock xfuser.

Without ``--model`` it builds a tiny random-weight FLUX.1 pipeline offline (:mod:`..xdit.tiny`) into a
temporary folder, so it needs no weights, no network and no GPU. It then runs, on the same prompt and
seed:

* one process (plain diffusers attention: xfuser's non-parallel path), the reference;
* ``ulysses x ring`` processes (default Ulysses 2) with xfuser's stock backend, plain ``fastusp`` and
  every fastusp variant that sends 8-bit data (:data:`..xdit.variants.VARIANTS` with a ``wire``), all
  in one pipeline loaded once per process (the backend is switched between calls).

Before anything starts, :func:`check` reads the checkpoint's JSON files and refuses, in one message
naming the valid choices, degrees the model's heads or this machine cannot take, sizes the model
cannot split (:func:`.sizes.size_rule`, the rule ``serve`` uses too) and a missing checkpoint. When
ranks fail anyway, one summary and the first traceback are shown, every traceback goes to
``demo_failure.log`` in ``--out``.

Processes are joined by gloo on CPU, by NCCL when there are enough GPUs (one per process). It prints
the max absolute difference of each image against the 1-process image and against the stock backend
(images lie in [0, 1], so that is also the relative one), seconds per denoising step (on CPU a sign
of life, not a speed measurement), and writes every image as a PNG, ``differences.png`` (each image
over its amplified difference from the 1-process image) and ``demo.json`` (command, device, versions,
date, table) into ``--out``. The comparison uses the float images before 8-bit rounding. ``--model
PATH`` runs a local FLUX.1 or SD3 checkpoint the same way.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import textwrap
import threading
import time

import numpy as np

from .launch import WorkerError, run_distributed
from .sizes import DEFAULT_MAX_SIZE, TINY_FLUX, TINY_NAME, degree_problem, read_geometry, size_rule, valid_degrees
from ..xdit import variants
from ..xdit.pipeline import PipelineSpec, quiet_libraries

TINY_DEFAULTS = dict(steps=4, size=64, dtype="float32", max_sequence_length=32)
MODEL_DEFAULTS = dict(steps=28, size=1024, dtype="bfloat16", max_sequence_length=512)
FAILURE_LOG = "demo_failure.log"
TIMING_NOTE = ("s/step*: processes sharing this machine's CPU cores, not a speed measurement: the figures swing "
               "between runs and processes and only show that each run worked (benchmarks/ measures speed, on GPUs)")


_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "died with exit code")


class ConfigError(ValueError):
    """A configuration refused before any process starts; the message names the valid choices."""


class DemoFailed(RuntimeError):
    """Ranks failed: the message is the summary (first traceback included; the rest in the log file)."""


def eight_bit_idle(ulysses: int) -> dict:
    """{variant: note} for the 8-bit variants that quantize nothing at this Ulysses degree: their wire acts on
    the Ulysses all-to-alls only (unless it names the ring's K/V), and at ulysses 1 none runs."""
    return {v.name: f"ulysses 1: no all-to-all ran, nothing sent in 8 bits (= {variants.plain()})"
            for v in variants.VARIANTS.values() if v.wire != "none" and ulysses == 1 and "ring_kv" not in v.wire}


def demo_backends() -> tuple[str, ...]:
    """The plain fastusp variant, then each one that sends 8-bit data (from the registry)."""
    return (variants.plain(), *variants.eight_bit())


def machine() -> dict:
    """CPU cores this process may use and GPUs torch sees."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"cores": cores, "gpus": torch.cuda.device_count()}


def check(model: str | None, ulysses: int, ring: int, steps: int, height: int | None, width: int | None,
          host: dict | None = None) -> dict:
    """The checked settings (``geometry``, ``height``, ``width``, ``pg``, ``model_name``); ConfigError otherwise.

    Reads JSON files only (and asks torch how many GPUs there are): no process, no model.
    """
    if model is None:
        geometry, name = TINY_FLUX, TINY_NAME
    else:
        try:
            geometry, name = read_geometry(model), model
        except ValueError as e:
            raise ConfigError(f"--model: {e}") from None
    host = machine() if host is None else host
    world = ulysses * ring
    problems = []
    if world < 2:
        problems.append(f"ulysses {ulysses} x ring {ring} is 1 process: the demo compares a parallel run with a "
                        "1-process one, so use at least 2")
    heads = degree_problem(geometry, ulysses, name)
    if heads:
        problems.append(heads)
    slots = max(host["cores"], host["gpus"])
    if world > slots:
        gpus = f"{host['gpus']} GPU(s)" if host["gpus"] else "no GPU"
        problems.append(f"ulysses {ulysses} x ring {ring} = {world} processes, but this machine has {host['cores']} "
                        f"CPU core(s) and {gpus}: at most {slots} processes (one per core or GPU)")
    if problems:
        fits = valid_degrees(geometry, slots)
        choices = (", ".join(f"--ulysses {u} --ring {r}" for u, r in fits[:8]) + (" ..." if len(fits) > 8 else "")
                   if fits else f"none: the demo needs 2 processes, this machine runs {slots}")
        raise ConfigError("\n".join([f"ulysses {ulysses} x ring {ring} does not fit:", *("  " + p for p in problems),
                                     f"valid here ({geometry.heads} heads, up to {slots} processes): {choices}"]))
    if steps < 2:
        raise ConfigError(f"--steps {steps}: use at least 2 (seconds per step are timed from step 2 on)")
    max_size = DEFAULT_MAX_SIZE["tiny" if model is None else "model"]
    rule = size_rule(geometry, ulysses, ring, max_size)
    default_h, default_w = rule.fit((MODEL_DEFAULTS if model else TINY_DEFAULTS)["size"])
    height, width = height or default_h, width or default_w
    bad = [p for p in (rule.problem("height", height), rule.problem("width", width)) if p]
    if bad:
        where = "the tiny model" if model is None else "--model"
        raise ConfigError("\n".join([f"{name} at ulysses {ulysses} x ring {ring}:", *("  " + p for p in bad),
                                     f"(the demo's largest size for {where}: {max_size})"]))
    return dict(geometry=geometry, model_name=name, height=height, width=width,
                pg="nccl" if host["gpus"] >= world else "gloo", host=host)


def _job(spec: PipelineSpec, names: tuple, call: dict, progress) -> list | None:
    """Worker: load the pipeline, run each backend of ``names`` (None: stock); the last rank returns the results."""
    import torch.distributed as dist

    from ..xdit.pipeline import PipelineSession

    rank0, world = dist.get_rank() == 0, dist.get_world_size()
    session = PipelineSession(spec)
    out = []
    for backend in names:
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


def _max_abs(image: np.ndarray, ref: np.ndarray) -> float:
    """max |image - ref| in float64 (images lie in [0, 1]: the relative difference too)."""
    return float(np.abs(image.astype(np.float64) - ref.astype(np.float64)).max())


def _save_png(image: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)).save(path)


def _table(rows: list, cpu: bool) -> str:
    step = "s/step*" if cpu else "s/step"
    head = f"{'configuration':<38}{'world':>6}{step:>9}{'max|d| vs 1 proc':>18}{'max|d| vs stock':>17}  note"
    lines = [head]
    for r in rows:
        cells = [f"{r[k]:.2e}" if r.get(k) is not None else "-" for k in ("max_abs_vs_1proc", "max_abs_vs_stock")]
        lines.append(f"{r['config']:<38}{r['world']:>6}{r['sec_per_step']:>9.4f}{cells[0]:>18}{cells[1]:>17}  "
                     f"{r.get('note', '')}".rstrip())
    lines.insert(1, "-" * min(max(map(len, lines)), 120))
    if cpu:
        lines += textwrap.wrap(TIMING_NOTE, 100)
    return "\n".join(lines)


def run(model: str | None = None, ulysses: int = 2, ring: int = 1, steps: int | None = None,
        height: int | None = None, width: int | None = None, prompt: str = "a tiny red cat on a piano, 4k",
        seed: int = 42, guidance: float = 3.5, dtype: str | None = None, out_dir: str = "fastusp_demo",
        timeout: float = 900.0, command: str = "fastusp-xdit demo") -> dict:
    """Check, run the demo and write its files; returns the JSON record (``rows`` holds the table).

    ConfigError before any process starts; DemoFailed when ranks fail (details in ``out_dir/demo_failure.log``).
    """
    defaults = MODEL_DEFAULTS if model else TINY_DEFAULTS
    steps = defaults["steps"] if steps is None else steps
    checked = check(model, ulysses, ring, steps, height, width)
    from . import doctor

    world, pg, height, width = ulysses * ring, checked["pg"], checked["height"], checked["width"]
    dtype = dtype or defaults["dtype"]
    cores = checked["host"]["cores"]
    call = dict(prompt=prompt, steps=steps, seed=seed, height=height, width=width, guidance=guidance)
    shown_backends = demo_backends()
    os.makedirs(out_dir, exist_ok=True)
    stale = os.path.join(out_dir, FAILURE_LOG)
    if os.path.exists(stale):
        os.remove(stale)
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
              f"{_label(ulysses, ring)} on {world} processes ({pg}: stock, {', '.join(shown_backends)}) vs 1 process",
              flush=True)
        progress = mp.get_context("spawn").Queue()
        shown = threading.Thread(target=_show_progress, args=(progress,), daemon=True)
        shown.start()
        results = []
        try:
            for n, run_backends in ((1, (None,)), (world, (None, *shown_backends))):
                spec = PipelineSpec(model, ulysses=ulysses if n > 1 else 1, ring=ring if n > 1 else 1,
                                    dtype=dtype, max_sequence_length=defaults["max_sequence_length"])
                what = "the 1-process reference" if n == 1 else f"the {n}-process run ({_label(ulysses, ring)})"
                try:
                    # every process gets cores / world threads in both runs (the 1-process run oversubscribed
                    # with cores threads crawled on a busy 2-core machine)
                    per_rank = run_distributed(_job, n, spec, run_backends, call, progress, timeout=timeout,
                                               backend=pg, threads=max(1, cores // world))
                except (WorkerError, TimeoutError) as e:
                    raise DemoFailed(failure_summary(e, what, n, out_dir)) from None
                results += per_rank[-1]
        finally:
            progress.put(None)
            shown.join(timeout=5)
    rows = _rows(results, out_dir, eight_bit_idle(ulysses))
    figure = _differences(results, os.path.join(out_dir, "differences.png"))
    cpu = pg == "gloo"
    record = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": doctor.device_summary(),
              "versions": doctor.versions(), "model": model_name, "process_group": pg,
              "settings": dict(call, dtype=dtype, ulysses=ulysses, ring=ring, world=world),
              "rows": rows, "timing_note": TIMING_NOTE if cpu else None, "differences_png": figure,
              "wall_s": round(time.perf_counter() - t0, 2)}
    with open(os.path.join(out_dir, "demo.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(_table(rows, cpu))
    extra = f", {figure}" if figure else ""
    print(f"wrote {len(rows)} PNG images{extra} and demo.json to {out_dir}/ ({record['wall_s']:.0f} s)")
    return record


def failure_summary(error: Exception, what: str, world: int, out_dir: str) -> str:
    """One summary line, the first traceback, and where every traceback went (``out_dir/demo_failure.log``)."""
    log = os.path.join(out_dir, FAILURE_LOG)
    with open(log, "w") as f:
        f.write(f"{what} failed:\n\n{error}\n")
    errors = getattr(error, "errors", None)
    if not errors:  # a timeout: no traceback to show
        return f"{what} failed: {error}\n(written to {log})"
    # the first report is most likely the cause; skip ones that only say a peer went away
    first_rank, first = next(((r, t) for r, t in errors.items() if not any(s in t for s in _PEER_SIGNS)),
                             next(iter(errors.items())))
    lasts = {text.strip().splitlines()[-1] for text in errors.values()}
    alike = f"the same error on {'every' if len(errors) == world else 'each failing'} rank" if len(lasts) == 1 else \
        f"{len(lasts)} different errors"
    ranks = ", ".join(map(str, sorted(errors)))
    return (f"{what} failed on rank(s) {ranks} of {world} ({alike}): {first.strip().splitlines()[-1]}\n"
            f"first traceback (rank {first_rank}):\n{first.rstrip()}\n"
            f"every rank's traceback: {log}")


def _label(ulysses: int, ring: int) -> str:
    return " x ".join(f"{name} {d}" for name, d in (("ulysses", ulysses), ("ring", ring)) if d > 1)


def _rows(results: list, out_dir: str, notes: dict) -> list:
    """Table rows (1-process first), comparing each image with the 1-process and stock ones; saves PNGs."""
    single = results[0]["image"]
    stock = next(r["image"] for r in results if r["stock"] and r["world"] > 1)
    rows = []
    for r in results:
        _save_png(r["image"], os.path.join(out_dir, r["png"]))
        row = {k: v for k, v in r.items() if k != "image"}
        if r["world"] > 1:
            row["max_abs_vs_1proc"] = _max_abs(r["image"], single)
            row["max_abs_vs_stock"] = None if r["stock"] else _max_abs(r["image"], stock)
            row["note"] = "xfuser's own backend" if r["stock"] else notes.get(r["backend"], "")
        else:
            row["note"] = "the reference"
        rows.append(row)
    return rows


def difference_map(image: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, float]:
    """(H, W, 3) uint8 'hot' map of max-over-channels |image - ref|, scaled so its largest value is white; the gain."""
    d = np.abs(image.astype(np.float64) - ref.astype(np.float64)).max(axis=-1)
    peak = float(d.max())
    gain = 1.0 / peak if peak > 0 else 0.0
    x = d * gain
    hot = np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], axis=-1)
    return (hot * 255).round().astype(np.uint8), gain


def _differences(results: list, path: str, tile: int = 256) -> str | None:
    """Each image over its amplified difference from the 1-process image, side by side; the file name."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    ref = results[0]["image"]
    label_h, gap = 34, 8
    sheet = Image.new("RGB", (len(results) * (tile + gap) + gap, 2 * (tile + label_h) + gap), "white")
    draw = ImageDraw.Draw(sheet)

    def put(array: np.ndarray, x: int, y: int) -> None:
        img = Image.fromarray(array)
        scale = tile / max(img.size)
        size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
        sheet.paste(img.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS), (x, y))

    for i, r in enumerate(results):
        x = gap + i * (tile + gap)
        name = "1 process" if r["world"] == 1 else r["backend"] + (" (stock)" if r["stock"] else "")
        draw.text((x, 4), name, fill="black")
        put((np.clip(r["image"], 0, 1) * 255).round().astype(np.uint8), x, label_h)
        y = label_h + tile + gap
        if i == 0:
            draw.text((x, y + 4), "|d| vs 1 process, amplified:", fill="black")
            draw.text((x, y + 18), "brightest = that image's max |d|", fill="black")
            continue
        heat, gain = difference_map(r["image"], ref)
        text = f"max |d| {1 / gain:.1e} (x{gain:.1e})" if gain else "identical to 1 process"
        draw.text((x, y + 4), text, fill="black")
        put(heat, x, y + label_h)
    sheet.save(path)
    return os.path.basename(path)
