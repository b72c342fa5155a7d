"""8-bit communication accuracy, e4m3 and int8 side by side, recorded.

Part 1 (2 and 4 gloo processes): ``usp_attention`` with each wire spec against the same run with bf16
communication (Frobenius-norm relative error, the metric of ``tests/test_usp_fp8.py`` and
``tests/test_usp_int8.py``), ulysses 2, ring 2, ulysses 4 and 2x2, random and outlier-heavy inputs
(a few V channels 100x larger, a few K channels offset by 100). Part 2 (one process): attention with
one subset of Q, K, V, O round-tripped through each codec (as the codec sends that tensor), against
bf16. Part 3: the tiny FLUX.1 pipeline (xfuser's own, CPU, bf16, 2 and 4 processes): each 8-bit
variant's image against the ``fastusp`` image (bf16 communication), PSNR and max difference.

    python benchmarks/wire_accuracy.py     # ~3 min on 2 cores; writes $OUT/wire_accuracy-cpu.json
                                           # (default benchmarks/results)
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from fastusp_xdit.apps.launch import run_distributed
from fastusp_xdit.comm.codecs import WireSpec
from fastusp_xdit.usp.verify import reference_attention, run_cases
from fastusp_xdit.xdit.variants import VARIANTS, eight_bit, plain

SPECS = ("qvo", "qvo,k", "qvo,k,ring_kv", "qvo=int8", "qvo=int8,k=int8", "qvo=int8,k=int8,ring_kv=int8")
EIGHT_BIT, PLAIN = eight_bit(), plain()


def distributed_rows() -> list:
    base = dict(batch=1, heads=8, kv_heads=8, seq_q=256, seq_kv=256, head_dim=64, dtype="bfloat16", seed=3,
                joint="front", joint_len=16)
    rows = []
    for world, factorizations in ((2, ((2, 1), (1, 2))), (4, ((4, 1), (2, 2)))):
        cases = [dict(base, ulysses=u, ring=r, fp8=spec, outliers=out)
                 for u, r in factorizations for spec in SPECS for out in (None, 100.0)]
        per_rank = run_distributed(run_cases, world, cases, timeout=600)
        rows += [{"ulysses": c["ulysses"], "ring": c["ring"], "wire": c["fp8"], "outliers": c["outliers"],
                  "fro_err_vs_bf16_comm": max(r[i]["fp8_vs_raw"] for r in per_rank)} for i, c in enumerate(cases)]
    return rows


def subset_rows(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, 1024, 128, generator=g).bfloat16() for _ in range(3))
    raw = reference_attention(q, k, v).bfloat16().double()
    rows = []
    for codec in ("e4m3", "int8"):
        wire = WireSpec(q=codec, k=codec, v=codec, o=codec)

        def rt(x, tensor):  # token-major round trip, as the all-to-all sends it
            c = wire.codec(tensor)
            x_tm = x.permute(2, 0, 1, 3)
            slot = torch.empty(c.nbytes(x_tm.shape, x.dtype), dtype=torch.uint8)
            c.encode(x_tm, slot)
            return c.decode(slot, x_tm.shape, x.dtype).permute(1, 2, 0, 3)

        for subset in ("q", "k", "v", "o", "qvo", "qkvo"):
            out = reference_attention(rt(q, "q") if "q" in subset else q, rt(k, "k") if "k" in subset else k,
                                      rt(v, "v") if "v" in subset else v).bfloat16()
            out = rt(out, "o") if "o" in subset else out
            rows.append({"codec": codec, "tensors": subset,
                         "fro_err_vs_bf16": ((out.double() - raw).norm() / raw.norm()).item()})
    return rows


def pipeline_job(spec, backends: tuple, call: dict):
    from fastusp_xdit.xdit.pipeline import PipelineSession

    session = PipelineSession(spec)
    images = {}
    for name in backends:
        session.set_backend(name)
        images[name] = session.generate(**call)
    return images if session.returns_output else None


def pipeline_rows() -> list:
    from fastusp_xdit.xdit.pipeline import PipelineSpec
    from fastusp_xdit.xdit.tiny import build_tiny_flux

    call = dict(prompt="a tiny red cat", steps=4, seed=42, height=64, width=64, guidance=3.5)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_flux(os.path.join(tmp, "flux"))
        for u, r in ((2, 1), (2, 2)):
            spec = PipelineSpec(model=model, ulysses=u, ring=r, dtype="bfloat16", max_sequence_length=32)
            images = next(x for x in run_distributed(pipeline_job, u * r, spec, (PLAIN, *EIGHT_BIT), call,
                                                     timeout=900) if x is not None)
            ref = images[PLAIN].astype(np.float64)
            for name in EIGHT_BIT:
                diff = images[name].astype(np.float64) - ref
                mse = float((diff ** 2).mean())
                rows.append({"ulysses": u, "ring": r, "variant": name, "wire": VARIANTS[name].wire,
                             "psnr_db": 10 * math.log10(1.0 / mse) if mse else math.inf,
                             "max_abs_diff_255": float(np.abs(diff).max() * 255)})
    return rows


def main() -> dict:
    record = {"command": "python benchmarks/wire_accuracy.py " + " ".join(sys.argv[1:]),
              "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores), gloo",
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "distributed": distributed_rows(), "single_tensor_subsets": subset_rows(), "pipeline": pipeline_rows()}
    for r in record["distributed"]:
        print(f"ulysses {r['ulysses']} ring {r['ring']} {r['wire']:28s} outliers={r['outliers']}: "
              f"{r['fro_err_vs_bf16_comm']:.4f}")
    for r in record["single_tensor_subsets"]:
        print(f"{r['codec']} {r['tensors']:5s}: {r['fro_err_vs_bf16']:.4f}")
    for r in record["pipeline"]:
        print(f"tiny FLUX ulysses {r['ulysses']} ring {r['ring']} {r['variant']}: PSNR {r['psnr_db']:.1f} dB, "
              f"max {r['max_abs_diff_255']:.1f}/255")
    out_dir = os.environ.get("OUT", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    with open(os.path.join(out_dir, "wire_accuracy-cpu.json"), "w") as f:
        json.dump(record, f, indent=1)
    return record


if __name__ == "__main__":
    main()
