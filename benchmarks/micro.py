"""Single-device microbenchmarks of FastUSP's local kernels, and a one-device ring emulation.

1. attention with LSE (``fastusp_xdit.ops.attention_with_lse``) per available backend, TFLOP/s,
   with torch's plain SDPA (no LSE) as the reference;
2. LSE merge (``fastusp_xdit.ops.merge_into``) and a plain copy, GB/s, eager and compiled;
3. ring emulation: K/V split in R blocks (R = 2, 4, 8), attention per block + LSE merge, eager and
   ``torch.compile(fullgraph=True)``, time relative to one attention call over all keys (goal:
   <= 1.05x) and peak memory; and the R block attention calls alone (no merge), which splits the
   overhead into attention on shorter key blocks and merging;
4. head groups: the heads of one Ulysses rank (H/2, as at Ulysses 2) attended in G calls of H/(2G)
   heads against one call, the compute side of ``usp_attention(head_groups=G)``.

Fixed iteration counts after a warm-up, CUDA events on GPU (never triton's do_bench). Writes
``$OUT/micro-<device>.json`` (default ``benchmarks/results``) with a ``profile`` section in
``fastusp_xdit.apps.plan``'s schema (attn_tflops, copy_gbps, ring_step_overhead, head_group_ratios), and a PNG of the
ring-emulation overhead against R.

    python benchmarks/micro.py                  # CUDA, FLUX shape (1, 24, 4608, 128) bf16
    python benchmarks/micro.py --device cpu     # tiny shapes, for CI
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmark this checkout
from fastusp_xdit import __version__  # noqa: E402
from fastusp_xdit.ops import attention_with_lse, merge_into, select_backend  # noqa: E402

GOAL = 1.05  # ring emulation: at most 5% slower than one attention call


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "fastusp_xdit": __version__}
    if torch.cuda.is_available():
        v.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                 gpu=torch.cuda.get_device_name(0))
    return v


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()


def out_path(name: str) -> str:
    """Where a result file goes: ``$OUT`` or ``benchmarks/results``."""
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    return os.path.join(out_dir, name)


def write_json(result: dict, name: str) -> str:
    path = out_path(name)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    return path


def checkout() -> str | None:
    """Git commit of the fastusp_xdit actually imported (``+dirty`` when its files have local changes);
    None outside git."""
    import fastusp_xdit

    where = os.path.dirname(os.path.abspath(fastusp_xdit.__file__))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def header(device: str) -> dict:
    return {"command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv),
            "device": device_name(device), "versions": versions(), "checkout": checkout(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def timed(fn, iters: int, warmup: int, device: str, barrier=None) -> float:
    """Milliseconds per call over ``iters`` calls after ``warmup`` calls (``barrier`` before timing)."""
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    if barrier is not None:
        barrier()
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def peak_bytes(fn, device: str):
    """Peak memory allocated by one call above what was allocated before it (None off CUDA)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def ring_emulation(q, k, v, blocks: int, backend: str):
    """Attention of ``q`` over K/V streamed in ``blocks`` pieces, merged by LSE (what one ring rank does)."""
    ks, vs = k.chunk(blocks, dim=2), v.chunk(blocks, dim=2)
    acc, lse = attention_with_lse(q, ks[0], vs[0], backend=backend)
    acc = acc.float()
    for kb, vb in zip(ks[1:], vs[1:]):
        out, out_lse = attention_with_lse(q, kb, vb, backend=backend)
        acc, lse = merge_into(acc, lse, out, out_lse)
    return acc.to(q.dtype)


def _compiled(fn):
    return torch.compile(fn, fullgraph=True)


def bench_attention(q, k, v, args) -> list:
    flops = 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    backends = ["cudnn", "flash", "efficient"] if args.device == "cuda" else ["cpu"]
    rows = []
    for b in backends:
        try:
            ms = timed(lambda: attention_with_lse(q, k, v, backend=b), args.iters, args.warmup, args.device)
            rows.append({"backend": b, "ms": ms, "tflops": flops / ms / 1e9})
        except RuntimeError as e:  # a kernel that does not support this GPU / shape / dtype
            rows.append({"backend": b, "error": str(e).splitlines()[0]})
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = timed(lambda: sdpa(q, k, v), args.iters, args.warmup, args.device)
    rows.append({"backend": "torch_sdpa (no LSE, reference)", "ms": ms, "tflops": flops / ms / 1e9})
    return rows


def bench_memory_ops(q, args) -> dict:
    """LSE merge and a plain copy, GB/s (bytes read + written)."""
    b, h, s, d = q.shape
    acc, out = q.float(), q.clone()
    lse, out_lse = torch.randn(b, h, s, device=q.device), torch.randn(b, h, s, device=q.device)
    merge_bytes = acc.numel() * (2 * acc.element_size() + out.element_size()) + 3 * lse.numel() * 4
    rows = {}
    for mode, fn in (("eager", merge_into), ("compiled", _compiled(merge_into))):
        ms = timed(lambda: fn(acc, lse, out, out_lse), args.iters, args.warmup, args.device)
        rows[f"merge_{mode}"] = {"ms": ms, "gbps": merge_bytes / ms / 1e6}
    ms = timed(lambda: q.clone(), args.iters, args.warmup, args.device)
    rows["copy"] = {"ms": ms, "gbps": 2 * q.numel() * q.element_size() / ms / 1e6}
    return rows


def bench_ring(q, k, v, args) -> tuple:
    backend = select_backend(q, k)
    ref_out = attention_with_lse(q, k, v, backend=backend)[0]
    single_ms = timed(lambda: attention_with_lse(q, k, v, backend=backend), args.iters, args.warmup, args.device)
    single = {"backend": backend, "ms": single_ms,
              "peak_bytes": peak_bytes(lambda: attention_with_lse(q, k, v, backend=backend), args.device)}
    rows = []
    for r in args.rings:
        eager = lambda: ring_emulation(q, k, v, r, backend)  # noqa: E731
        variants = [("eager", eager)] + ([] if args.no_compile else [("compiled", _compiled(eager))])
        for mode, fn in variants:
            try:
                err = (fn().float() - ref_out.float()).abs().max().item()
                ms = timed(fn, args.iters, args.warmup, args.device)
            except RuntimeError as e:  # a kernel or compiler failure is a result too
                rows.append({"blocks": r, "mode": mode, "error": str(e).splitlines()[0]})
                continue
            rows.append({"blocks": r, "mode": mode, "ms": ms, "ratio": ms / single_ms,
                         "goal_met": ms / single_ms <= GOAL, "max_abs_err_vs_single": err,
                         "peak_bytes": peak_bytes(fn, args.device)})
        ks, vs = k.chunk(r, dim=2), v.chunk(r, dim=2)
        ms = timed(lambda: [attention_with_lse(q, kb, vb, backend=backend) for kb, vb in zip(ks, vs)],
                   args.iters, args.warmup, args.device)
        rows.append({"blocks": r, "mode": "attention only", "ms": ms, "ratio": ms / single_ms})
    return single, rows


def bench_head_groups(q, k, v, args) -> list:
    """One Ulysses-2 rank's heads in G attention calls vs one call (the compute of head groups)."""
    backend = select_backend(q, k)
    q, k, v = (t[:, :max(1, t.shape[1] // 2)] for t in (q, k, v))
    rows = []
    for g in [1] + [g for g in args.head_groups if 1 < g <= q.shape[1]]:
        parts = [t.tensor_split(g, dim=1) for t in (q, k, v)]
        ms = timed(lambda: [attention_with_lse(*p, backend=backend) for p in zip(*parts)], args.iters,
                   args.warmup, args.device)
        rows.append({"groups": g, "heads": q.shape[1], "ms": ms, "ratio": ms / rows[0]["ms"] if rows else 1.0})
    return rows


def ring_step_overhead(rows: list):
    """Least-squares slope of (ratio - 1) over (R - 1), through the origin, compiled rows if any ran."""
    ok = [r for r in rows if "ratio" in r and r["mode"] != "attention only"]
    mode = "compiled" if any(r["mode"] == "compiled" for r in ok) else "eager"
    pts = [(r["blocks"] - 1, r["ratio"] - 1) for r in ok if r["mode"] == mode]
    if not pts:
        return None
    return max(0.0, sum(x * y for x, y in pts) / sum(x * x for x, _ in pts))


def plot(rows: list, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for mode in sorted({r["mode"] for r in rows}):
        pts = [(r["blocks"], r["ratio"]) for r in rows if r["mode"] == mode and "ratio" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode)
    ax.axhline(GOAL, color="gray", linestyle="--", label=f"goal {GOAL}x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ring blocks R")
    ax.set_ylabel("time / one attention call")
    ax.set_title("one-device ring emulation overhead")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", help="B,H,S,D (default 1,24,4608,128 on CUDA, 1,2,256,32 on CPU)")
    ap.add_argument("--dtype", help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--iters", type=int, help="timed calls (default 50 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default 10 CUDA, 1 CPU)")
    ap.add_argument("--rings", default="2,4,8", help="ring block counts R")
    ap.add_argument("--head-groups", default="2,3,4,6", help="head group counts G (of one Ulysses-2 rank's heads)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible: pass --device cpu")
    args.shape = tuple(int(x) for x in (args.shape or ("1,24,4608,128" if cuda else "1,2,256,32")).split(","))
    if len(args.shape) != 4:
        ap.error("--shape takes four integers B,H,S,D")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.iters = args.iters or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.rings = [int(x) for x in args.rings.split(",")]
    args.head_groups = [int(x) for x in args.head_groups.split(",")]
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.shape, device=args.device, dtype=args.dtype) for _ in range(3))
    attention = bench_attention(q, k, v, args)
    memory_ops = bench_memory_ops(q, args)
    single, ring = bench_ring(q, k, v, args)
    groups = bench_head_groups(q, k, v, args)
    tflops = next(r["tflops"] for r in attention if r.get("backend") == single["backend"])
    result = {**header(args.device),
              "config": {"shape": list(args.shape), "dtype": str(args.dtype).replace("torch.", ""),
                         "iters": args.iters, "warmup": args.warmup},
              "attention": attention, "memory_ops": memory_ops,
              "ring_emulation": {"goal_ratio": GOAL, "single": single, "rows": ring}, "head_groups": groups,
              "profile": {"attn_tflops": tflops, "copy_gbps": memory_ops["copy"]["gbps"]}}
    overhead = ring_step_overhead(ring)
    if overhead is not None:
        result["profile"]["ring_step_overhead"] = overhead
    result["profile"]["head_group_ratios"] = [[r["groups"], r["ratio"]] for r in groups if r["groups"] > 1]
    png = out_path(f"micro-{args.device}-ring.png")
    result["plot"] = os.path.basename(png) if plot(ring, png) else None
    path = write_json(result, f"micro-{args.device}.json")
    for r in attention:
        print(f"attention {r['backend']:<32} " + (f"{r['ms']:.4g} ms {r['tflops']:.4g} TFLOP/s" if "ms" in r
                                                   else f"unavailable: {r['error']}"))
    for name, r in memory_ops.items():
        print(f"{name:<42} {r['ms']:.4g} ms {r['gbps']:.4g} GB/s")
    for r in ring:
        print(f"ring emulation R={r['blocks']} {r['mode']:<8} " + (
            f"{r['ms']:.4g} ms = {r['ratio']:.2f}x one {single['backend']} call (goal {GOAL}x)" if "ms" in r
            else f"failed: {r['error']}"))
    for r in groups:
        print(f"head groups G={r['groups']} of {r['heads']} heads {r['ms']:.4g} ms = {r['ratio']:.2f}x one call")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
