"""fastusp and stock xfuser vs one process at dividing and non-dividing shapes, per model family (CPU, gloo, fp32).

For each parallel configuration, each family's tiny transformer (``fastusp_xdit.xdit.tiny_models``) runs
through xfuser 0.7.0's own wrapper with ``fastusp`` and with stock ``sdpa_flash``; the error is
max|out - ref| / max|ref| against the plain diffusers model in one process. Stock xfuser breaks the
process group on ``torch.chunk``-uneven shards, so every (case, stock) pair known to do that runs in its
own job and is recorded as the error it raised.

    python benchmarks/shapes.py [--out benchmarks/results/shapes-cpu.json]
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "xdit"))

from fastusp_xdit.apps.launch import run_distributed  # noqa: E402
from shapes_job import shapes_job  # noqa: E402

CASES = [("wan", "even"), ("wan", "odd"), ("flux2", "even"), ("flux2", "odd"), ("flux2", "odd_text"),
         ("flux2", "odd_both"), ("qwen", "even"), ("qwen", "odd"), ("hunyuan_video", "even"), ("hunyuan_video", "odd"),
         ("hunyuan_video", "odd_text"), ("flux1_runner", "even"), ("flux1_runner", "odd_text"), ("flux1_runner", "odd"),
         ("flux1_runner", "odd_both"), ("latte", "even"), ("latte", "odd"), ("lumina2", "even"), ("lumina2", "odd"),
         ("z_image", "even"), ("z_image", "odd")]
# stock xfuser drops the gloo connection (NCCL: hangs) on these: one job each
STOCK_BREAKS = {("flux2", "odd_text"), ("flux2", "odd_both"), ("hunyuan_video", "odd"),
                ("hunyuan_video", "odd_text")}
CONFIGS = ((2, 1), (1, 2), (1, 3))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "shapes-cpu.json"))
    args = parser.parse_args()
    from fastusp_xdit.xdit.tiny_models import family

    rows = []
    for ulysses, ring in CONFIGS:
        t0 = time.time()
        n = ulysses * ring
        cases = [c for c in CASES if ring == 1 or family(c[0]).ring_ok]  # Lumina2: xfuser refuses ring
        fast = run_distributed(shapes_job, n, cases, ulysses, ring, ("fastusp",), False, timeout=300)[0]
        safe = [c for c in cases if c not in STOCK_BREAKS]
        stock = run_distributed(shapes_job, n, safe, ulysses, ring, ("sdpa_flash",), False, timeout=300)[0]
        for case in STOCK_BREAKS:
            try:
                stock.update(run_distributed(shapes_job, n, [case], ulysses, ring, ("sdpa_flash",), False,
                                             timeout=60, collective_timeout=15)[0])
            except Exception as e:  # noqa: BLE001
                stock[case] = {"sdpa_flash": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"}
        for case in cases:
            rows.append(dict(family=case[0], shape=case[1], layout=family(case[0]).shapes[case[1]], ulysses=ulysses,
                             ring=ring, fastusp=fast[case]["fastusp"], stock=stock[case]["sdpa_flash"]))
        print(f"ulysses {ulysses} ring {ring}: {time.time() - t0:.0f} s", file=sys.stderr)
    for r in rows:
        print(f"{r['family']:14s} {r['shape']:9s} U{r['ulysses']} R{r['ring']}  fastusp {r['fastusp']!s:28.28s} "
              f"stock {r['stock']!s:.60s}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(what="max rel. error vs the 1-process diffusers model (fp32, tiny random weights, gloo)",
                       command="python benchmarks/shapes.py", device=f"CPU ({platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores), gloo", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       versions={p: importlib.metadata.version(p) for p in ("torch", "xfuser", "yunchang", "diffusers")},
                       stock_backend="sdpa_flash", rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
