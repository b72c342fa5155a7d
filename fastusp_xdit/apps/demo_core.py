"""``fastusp-xdit demo --core``: FastUSP attention alone on 2 CPU processes against a float64 reference.

Runs Ulysses-2 and Ring-2 (and world-1) at a FLUX-like shape scaled down for CPUs, in fp32 and bf16,
with joint text tokens; prints a table of milliseconds per call and relative error, and writes
``core_demo.json`` and a PNG chart ``core_demo.png``. (The main demo, through xDiT's pipeline, is
:mod:`fastusp_xdit.apps.demo_pipeline`.)
"""
from __future__ import annotations

import json
import os
import platform
import time

from . import doctor
from .launch import run_distributed
from ..usp.verify import run_cases


def demo_cases(heads: int, seq: int, head_dim: int, joint: int, iters: int) -> list:
    base = dict(batch=1, heads=heads, kv_heads=heads, seq_q=seq, seq_kv=seq, head_dim=head_dim,
                joint="front", joint_len=joint, iters=iters)
    return [dict(base, ulysses=u, ring=r, dtype=dt, seed=i)
            for i, (u, r, dt) in enumerate((u, r, dt) for dt in ("float32", "bfloat16") for u, r in ((2, 1), (1, 2)))]


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
    print(f"FastUSP demo: {len(cases)} configurations on 2 CPU processes (gloo), heads={heads} seq={seq} "
          f"head_dim={head_dim} joint={joint}", flush=True)
    t0 = time.perf_counter()
    per_rank = run_distributed(run_cases, 2, cases, timeout=timeout, threads=max(1, (os.cpu_count() or 2) // 2))
    single = [dict(c, ulysses=1, ring=1) for c in cases[::2]]
    per_rank_1 = run_distributed(run_cases, 1, single, timeout=timeout, threads=os.cpu_count() or 1)
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
