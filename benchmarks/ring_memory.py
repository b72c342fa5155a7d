"""Peak memory of the pipelined ring vs an all-gather ring, measured on CPU processes (gloo).

Large tensors are mmap-backed on Linux (glibc returns them to the OS when freed), so each rank's peak
resident set during one call, minus its resident set just before, is the peak of live tensors the
call created. Each variant runs in fresh processes. Usage::

    python benchmarks/ring_memory.py [--ring 4] [--seq-per-rank 16384] [--heads 8] [--head-dim 128]

Writes ``$OUT/ring_memory-cpu.json`` (default ``benchmarks/results``) with command, device, versions, date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_layer import allgather_ring  # noqa: E402

from fastusp_xdit import usp_attention  # noqa: E402
from fastusp_xdit.usp.groups import usp_groups  # noqa: E402
from fastusp_xdit.apps.launch import run_distributed  # noqa: E402

MB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def job(variant: str, ring: int, seq_per_rank: int, heads: int, head_dim: int) -> dict:
    _, rg = usp_groups(1, ring)
    g = torch.Generator().manual_seed(rg.rank())
    q, k, v = (torch.randn(1, heads, seq_per_rank, head_dim, generator=g) for _ in range(3))
    torch.distributed.barrier()
    before = _rss()
    if variant == "fastusp":
        out = usp_attention(q, k, v, ring_group=rg)
    else:
        out = allgather_ring(q, k, v, ring_group=rg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    return {"peak_extra_mb": (peak - before) / MB, "kv_block_mb": 2 * k.numel() * k.element_size() / MB,
            "q_mb": q.numel() * q.element_size() / MB}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ring", type=int, default=4)
    ap.add_argument("--seq-per-rank", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args(argv)
    rows = []
    for variant in ("fastusp", "allgather"):
        per_rank = run_distributed(job, args.ring, variant, args.ring, args.seq_per_rank, args.heads, args.head_dim,
                                   timeout=600)
        rows.append({"variant": variant, "max_peak_extra_mb": max(r["peak_extra_mb"] for r in per_rank),
                     "kv_block_mb": per_rank[0]["kv_block_mb"], "q_mb": per_rank[0]["q_mb"], "per_rank": per_rank})
        r = rows[-1]
        print(f"{variant:10s} ring {args.ring}: peak extra {r['max_peak_extra_mb']:8.0f} MB "
              f"= {r['max_peak_extra_mb'] / r['kv_block_mb']:.2f} K/V blocks (block {r['kv_block_mb']:.0f} MB)")
    record = {"command": "python benchmarks/ring_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), gloo", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "config": vars(args), "rows": rows}
    out_dir = os.environ.get("OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    with open(os.path.join(out_dir, "ring_memory-cpu.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
