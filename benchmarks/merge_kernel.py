"""LSE merge on a GPU: the Triton ``fastusp::lse_merge`` against torch's merge, alone and in a ring emulation.

    PYTHONPATH=. python benchmarks/merge_kernel.py      # CUDA GPU, FLUX shape (1, 24, 4608, 128) bf16

1. merge alone, on token-major outputs and (B, H, S) LSEs as ``usp._ring`` holds them: the torch
   formulas of the pre-kernel ``merge_into`` (fp32 accumulator, eager and ``torch.compile``) against
   the kernel's four uses: running step fp32 acc + bf16 block -> fp32, first merge bf16 + bf16 -> fp32
   (no fp32 copy of block 0), last merge fp32 + bf16 -> bf16 (no cast pass), bf16 acc step
   bf16 + bf16 -> bf16; ms and GB/s (bytes read + written), eager and as a CUDA graph of 10 calls
   (GPU time without launch overhead), max error against ``merge_torch``;
2. launch shapes (block_rows, num_warps) of the kernel, CUDA-graph timed;
3. one-GPU ring emulation, R = 2, 4, 8: attention per key block (``attention_with_lse``, cuDNN) +
   merges, against one cuDNN call over all keys (goal <= 1.05x): ``torch`` (the pre-kernel recipe),
   ``kernel_acc_fp32`` (what the proposed ``usp._ring`` does) and ``kernel_acc_bf16`` (accumulator in
   the input dtype: fewer bytes, one rounding per step), each eager, ``torch.compile(fullgraph=True)``
   and CUDA-graphed; max abs error against the single call and against a float32 reference.

Fixed iteration counts after a warm-up, CUDA events. Writes ``$OUT/merge_kernel.json`` (default
``benchmarks/results``) and prints a table.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmark this checkout
from micro import GOAL, header, peak_bytes, timed, write_json  # noqa: E402

from fastusp_xdit.ops import attention_with_lse  # noqa: E402
from fastusp_xdit.ops.merge import lse_merge, merge_torch  # noqa: E402

GRAPH_REPS = 10


def torch_merge_into(acc, lse, out, out_lse):
    """The pre-kernel ``merge_into``: torch formulas, ``acc``/``lse`` already fp32."""
    acc = acc - torch.sigmoid((out_lse - lse).unsqueeze(-1)) * (acc - out.to(acc.dtype))
    return acc, lse - torch.nn.functional.logsigmoid(lse - out_lse)


def graphed(fn, reps: int = GRAPH_REPS):
    """``fn`` called ``reps`` times, captured in one CUDA graph; returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph.replay


def time_modes(fn, args, modes=("eager", "graph")) -> dict:
    """ms per call of ``fn`` eager and CUDA-graphed (``GRAPH_REPS`` calls per replay)."""
    res = {}
    if "eager" in modes:
        res["eager_ms"] = timed(fn, args.iters, args.warmup, "cuda")
    if "graph" in modes:
        res["graph_ms"] = timed(graphed(fn), args.iters, args.warmup, "cuda") / GRAPH_REPS
    return res


def _max_err(x, ref) -> float:
    return (x.double() - ref.double()).abs().max().item()


def bench_merge(args) -> list:
    b, h, s, d = args.shape
    dt = args.dtype
    g = torch.Generator(device="cuda").manual_seed(0)

    def tm(dtype):  # token-major (B, H, S, D) view
        return torch.randn(s, b, h, d, device="cuda", generator=g).to(dtype).permute(1, 2, 0, 3)

    la, lb = (torch.randn(b, h, s, device="cuda", generator=g) * 3 for _ in range(2))
    acc32, blk, blk0 = tm(torch.float32), tm(dt), tm(dt)
    compiled = torch.compile(torch_merge_into, fullgraph=True)
    cases = [("torch eager, fp32 acc + block -> fp32", lambda: torch_merge_into(acc32, la, blk, lb), acc32, blk, None),
             ("torch compiled, fp32 acc + block -> fp32", lambda: compiled(acc32, la, blk, lb), acc32, blk, None)]
    for name, a, dtype in (("kernel step, fp32 acc + block -> fp32", acc32, torch.float32),
                           ("kernel first, block0 + block -> fp32", blk0, torch.float32),
                           ("kernel last, fp32 acc + block -> out dtype", acc32, dt),
                           ("kernel step, acc + block in out dtype", blk0, dt)):
        cases.append((name, (lambda a=a, dtype=dtype: lse_merge(a, la, blk, lb, dtype)), a, blk, dtype))
    rows = []
    for name, fn, a, bb, dtype in cases:
        out, lse = fn()
        moved = a.numel() * (a.element_size() + bb.element_size() + out.element_size()) + 3 * la.numel() * 4
        ref, ref_lse = merge_torch(a, la, bb, lb, out.dtype)
        row = {"variant": name, "bytes": moved, **time_modes(fn, args),
               "max_abs_err_vs_merge_torch": _max_err(out, ref), "lse_max_abs_err": _max_err(lse, ref_lse),
               "out_token_major": out.permute(2, 0, 1, 3).is_contiguous()}
        row.update({m.replace("_ms", "_gbps"): moved / row[m] / 1e6 for m in ("eager_ms", "graph_ms")})
        rows.append(row)
    return rows


def bench_launch_shapes(args) -> list:
    from fastusp_xdit.ops import merge_triton

    b, h, s, d = args.shape
    a = torch.randn(s, b, h, d, device="cuda", dtype=args.dtype).permute(1, 2, 0, 3)
    bb = torch.randn_like(a)
    la, lb = (torch.randn(b, h, s, device="cuda") for _ in range(2))
    rows = []
    for block_rows in (8, 16, 32, 64):
        for warps in (2, 4, 8):
            fn = lambda: merge_triton.merge(a, la, bb, lb, args.dtype, block_rows, warps)  # noqa: E731
            rows.append({"block_rows": block_rows, "num_warps": warps, **time_modes(fn, args, ("graph",))})
    return rows


def ring(q, k, v, blocks: int, recipe: str):
    """Attention of ``q`` over K/V in ``blocks`` pieces merged by LSE (what one ring rank does)."""
    parts = zip(k.chunk(blocks, dim=2), v.chunk(blocks, dim=2))
    kb, vb = next(parts)
    acc, lse = attention_with_lse(q, kb, vb, backend="cudnn")
    if recipe == "torch":
        acc = acc.float()
    for i, (kb, vb) in enumerate(parts, start=2):
        out, out_lse = attention_with_lse(q, kb, vb, backend="cudnn")
        if recipe == "torch":
            acc, lse = torch_merge_into(acc, lse, out, out_lse)
        else:
            acc_dtype = torch.float32 if recipe == "kernel_acc_fp32" and i < blocks else q.dtype
            acc, lse = lse_merge(acc, lse, out, out_lse, acc_dtype)
    return acc.to(q.dtype)


def bench_ring(args) -> tuple:
    torch._dynamo.config.recompile_limit = 64  # one compiled lambda per (R, recipe): same code object
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.shape, device="cuda", dtype=args.dtype) for _ in range(3))
    ref32 = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    single_fn = lambda: attention_with_lse(q, k, v, backend="cudnn")  # noqa: E731
    single_out = single_fn()[0]
    single = {"backend": "cudnn", **time_modes(single_fn, args), "peak_bytes": peak_bytes(single_fn, "cuda"),
              "max_abs_err_vs_fp32": _max_err(single_out, ref32)}
    rows = []
    for r in args.rings:
        for recipe in ("torch", "kernel_acc_fp32", "kernel_acc_bf16"):
            eager = lambda r=r, recipe=recipe: ring(q, k, v, r, recipe)  # noqa: E731
            for mode, fn in (("eager", eager), ("compiled", torch.compile(eager, fullgraph=True)), ("graph", eager)):
                row = {"blocks": r, "recipe": recipe, "mode": mode}
                try:
                    out = fn()
                    ms = time_modes(fn, args, ("graph",) if mode == "graph" else ("eager",))
                    ms = ms.get("graph_ms", ms.get("eager_ms"))
                except RuntimeError as e:  # a kernel, compiler or capture failure is a result too
                    rows.append({**row, "error": str(e).splitlines()[0]})
                    continue
                base = single["graph_ms" if mode == "graph" else "eager_ms"]
                rows.append({**row, "ms": ms, "ratio": ms / base, "goal_met": ms / base <= GOAL,
                             "max_abs_err_vs_single": _max_err(out, single_out),
                             "max_abs_err_vs_fp32": _max_err(out, ref32), "peak_bytes": peak_bytes(fn, "cuda")})
    return single, rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1,24,4608,128", help="B,H,S,D")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--iters", type=int, default=50, help="timed calls")
    ap.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    ap.add_argument("--rings", default="2,4,8", help="ring block counts R")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the kernel is Triton; tests/test_merge_kernels.py checks it on CPU)")
    args.shape = tuple(int(x) for x in args.shape.split(","))
    args.dtype = getattr(torch, args.dtype)
    args.rings = [int(x) for x in args.rings.split(",")]
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    merges = bench_merge(args)
    shapes = bench_launch_shapes(args)
    single, rows = bench_ring(args)
    result = {**header("cuda"),
              "config": {"shape": list(args.shape), "dtype": str(args.dtype).replace("torch.", ""),
                         "iters": args.iters, "warmup": args.warmup, "graph_reps": GRAPH_REPS},
              "merge": merges, "launch_shapes": shapes,
              "ring_emulation": {"goal_ratio": GOAL, "single": single, "rows": rows}}
    path = write_json(result, "merge_kernel.json")
    print(f"{'merge variant':<44} {'eager ms':>9} {'graph ms':>9} {'graph GB/s':>10} {'err':>9}")
    for r in merges:
        print(f"{r['variant']:<44} {r['eager_ms']:>9.4f} {r['graph_ms']:>9.4f} {r['graph_gbps']:>10.0f} "
              f"{r['max_abs_err_vs_merge_torch']:>9.2g}")
    best = min(shapes, key=lambda r: r["graph_ms"])
    print(f"launch shapes: best block_rows={best['block_rows']} num_warps={best['num_warps']} "
          f"{best['graph_ms']:.4f} ms (default 32 rows x 4 warps for D=128)")
    print(f"single cudnn call: eager {single['eager_ms']:.4f} ms, graph {single['graph_ms']:.4f} ms, "
          f"err vs fp32 {single['max_abs_err_vs_fp32']:.3g}")
    print(f"{'R':>2} {'recipe':<16} {'mode':<9} {'ms':>8} {'ratio':>6} {'err vs single':>13} {'err vs fp32':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['blocks']:>2} {r['recipe']:<16} {r['mode']:<9} failed: {r['error']}")
            continue
        print(f"{r['blocks']:>2} {r['recipe']:<16} {r['mode']:<9} {r['ms']:>8.4f} {r['ratio']:>6.3f} "
              f"{r['max_abs_err_vs_single']:>13.3g} {r['max_abs_err_vs_fp32']:>11.3g}")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
