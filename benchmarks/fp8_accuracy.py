"""FP8 communication accuracy: which tensors in e4m3 cost how much, recorded.

Part 1 (2 gloo processes): ``usp_attention`` with each FP8 spec against the same run with bf16
communication (Frobenius-norm relative error, the metric of ``tests/test_usp_fp8.py``), ulysses 2 and
ring 2, random and outlier-heavy inputs. Part 2 (one process): attention with exactly one subset of
Q, K, V, O round-tripped through the codec, against bf16 -- each e4m3 tensor's own share.

    python benchmarks/fp8_accuracy.py        # writes $OUT/fp8_accuracy-cpu.json (default benchmarks/results)
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time

import torch

from fastusp_xdit.comm.fp8 import fp8_decode, fp8_encode
from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.usp.verify import reference_attention, run_cases

SPECS = ("qvo", "qvo,k", "qvo,k,ring_kv")


def distributed_rows() -> list:
    base = dict(batch=1, heads=8, kv_heads=8, seq_q=256, seq_kv=256, head_dim=64, dtype="bfloat16", seed=3,
                joint="front", joint_len=16)
    cases = [dict(base, ulysses=u, ring=r, fp8=spec, outliers=out)
             for u, r in ((2, 1), (1, 2)) for spec in SPECS for out in (None, 100.0)]
    per_rank = run_distributed(run_cases, 2, cases, timeout=300)
    return [{"ulysses": c["ulysses"], "ring": c["ring"], "fp8": c["fp8"], "outliers": c["outliers"],
             "fro_err_vs_bf16_comm": max(r[i]["fp8_vs_raw"] for r in per_rank)} for i, c in enumerate(cases)]


def subset_rows(seed: int = 0) -> list:
    def rt(x):
        return fp8_decode(fp8_encode(x), x.dtype)

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, 1024, 128, generator=g).bfloat16() for _ in range(3))
    raw = reference_attention(q, k, v).bfloat16().double()
    rows = []
    for subset in ("q", "k", "v", "o", "vo", "qv", "qvo"):
        out = reference_attention(rt(q) if "q" in subset else q, rt(k) if "k" in subset else k,
                                  rt(v) if "v" in subset else v).bfloat16()
        out = rt(out) if "o" in subset else out
        rows.append({"fp8_tensors": subset, "fro_err_vs_bf16": ((out.double() - raw).norm() / raw.norm()).item()})
    return rows


def main() -> dict:
    record = {"command": "python benchmarks/fp8_accuracy.py " + " ".join(sys.argv[1:]),
              "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), gloo",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "distributed": distributed_rows(), "single_tensor_subsets": subset_rows()}
    for r in record["distributed"]:
        print(f"ulysses {r['ulysses']} ring {r['ring']} {r['fp8']:14s} outliers={r['outliers']}: "
              f"{r['fro_err_vs_bf16_comm']:.4f}")
    for r in record["single_tensor_subsets"]:
        print(f"e4m3 {r['fp8_tensors']:4s}: {r['fro_err_vs_bf16']:.4f}")
    out_dir = os.environ.get("OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    with open(os.path.join(out_dir, "fp8_accuracy-cpu.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
