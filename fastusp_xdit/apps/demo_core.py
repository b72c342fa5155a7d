"""``fastusp-xdit demo --core``: FastUSP attention alone on 2 CPU processes against a float64 reference.

Runs Ulysses-2 and Ring-2 (and world-1) at a FLUX-like shape scaled down for CPUs, in fp32 and bf16,
with joint text tokens; prints a table of milliseconds per call and relative error, and writes
``core_demo.json`` and a PNG chart ``core_demo.png``. (The main demo, through xDiT's pipeline, is
:mod:`fastusp_xdit.apps.demo_pipeline`.)
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import threading
import time

from . import doctor
from .launch import run_distributed
from ..usp.verify import run_cases


def demo_cases(heads: int, seq: int, head_dim: int, joint: int, iters: int) -> list:
    base = dict(batch=1, heads=heads, kv_heads=heads, seq_q=seq, seq_kv=seq, head_dim=head_dim,
                joint="front", joint_len=joint, iters=iters)
    return [dict(base, ulysses=u, ring=r, dtype=dt, seed=i)
            for i, (u, r, dt) in enumerate((u, r, dt) for dt in ("float32", "bfloat16") for u, r in ((2, 1), (1, 2)))]


def run_cases_reporting(cases: list, progress) -> list:
    """Worker: :func:`run_cases` one case at a time, rank 0 telling the parent after each (progress)."""
    import torch.distributed as dist

    out = []
    for i, case in enumerate(cases):
        out += run_cases([case])
        if dist.get_rank() == 0:
            progress.put((i + 1, len(cases), case))
    return out


def _show(progress, world: int, t0: float) -> None:
    for done, total, case in iter(progress.get, None):
        cfg = f"ulysses {case['ulysses']}" if case["ulysses"] > 1 else (f"ring {case['ring']}" if case["ring"] > 1
                                                                        else "single")
        print(f"  [{done}/{total} on {world} process{'es' if world > 1 else ''}] {cfg} {case['dtype']} done "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def _run_reporting(world: int, cases: list, timeout: float, threads: int, t0: float) -> list:
    progress = mp.get_context("spawn").Queue()
    shown = threading.Thread(target=_show, args=(progress, world, t0), daemon=True)
    shown.start()
    try:
        return run_distributed(run_cases_reporting, world, cases, progress, timeout=timeout, threads=threads)
    finally:
        progress.put(None)
        shown.join(timeout=5)


def _table(rows: list) -> str:
    head = f"{'config':<14}{'dtype':<10}{'world':>6}{'ms/call':>10}{'rel err':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['config']:<14}{r['dtype']:<10}{r['world']:>6}{r['ms']:>10.2f}{r['err']:>11.2e}")
    return "\n".join(lines)


def _plot(rows: list, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(9, 3.5))
    labels = [f"{r['config']}\n{r['dtype']}" for r in rows]
    ax_t.bar(labels, [r["ms"] for r in rows], color="tab:blue")
    ax_t.set_ylabel("ms per attention call")
    ax_e.bar(labels, [r["err"] for r in rows], color="tab:orange")
    ax_e.set_yscale("log")
    ax_e.set_ylabel("max rel. error vs float64")
    for ax in (ax_t, ax_e):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("FastUSP on CPU (gloo), world 2 vs world 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(heads: int = 8, seq: int = 2048, head_dim: int = 64, joint: int = 128, iters: int = 5,
         out_dir: str = "fastusp_demo", timeout: float = 600.0) -> list:
    """Run the demo; returns the table rows and writes ``out_dir/core_demo.{json,png}``."""
    os.makedirs(out_dir, exist_ok=True)
    cases = demo_cases(heads, seq, head_dim, joint, iters)
    single = [dict(c, ulysses=1, ring=1) for c in cases[::2]]
    print(f"FastUSP demo: {len(cases)} configurations on 2 CPU processes (gloo) and {len(single)} on 1 process "
          f"({len(cases) + len(single)} rows), heads={heads} seq={seq} head_dim={head_dim} joint={joint}; "
          "starting the processes ...", flush=True)
    t0 = time.perf_counter()
    per_rank = _run_reporting(2, cases, timeout, max(1, (os.cpu_count() or 2) // 2), t0)
    per_rank_1 = _run_reporting(1, single, timeout, os.cpu_count() or 1, t0)
    rows = []
    for res1 in per_rank_1[0]:
        rows.append(dict(config="single", dtype=res1["case"]["dtype"], world=1, ms=res1["ms"], err=res1["err"]))
    for i, case in enumerate(cases):
        cfg = f"ulysses {case['ulysses']}" if case["ulysses"] > 1 else f"ring {case['ring']}"
        rows.append(dict(config=cfg, dtype=case["dtype"], world=2, ms=max(r[i]["ms"] for r in per_rank),
                         err=max(r[i]["err"] for r in per_rank)))
    print(_table(rows))
    record = {"command": "fastusp-xdit demo --core", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "versions": doctor.versions(),
              "shape": dict(heads=heads, seq=seq, head_dim=head_dim, joint=joint), "rows": rows,
              "wall_s": time.perf_counter() - t0}
    with open(os.path.join(out_dir, "core_demo.json"), "w") as f:
        json.dump(record, f, indent=1)
    png = os.path.join(out_dir, "core_demo.png")
    chart = f" and {png}" if _plot(rows, png) else " (install matplotlib for a chart)"
    print(f"wrote {out_dir}/core_demo.json{chart}")
    return rows
