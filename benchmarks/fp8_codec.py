"""FP8 e4m3 codec on a GPU: CUDA (Triton) bytes == CPU (torch) bytes, and throughput against a copy.

    PYTHONPATH=. python benchmarks/fp8_codec.py            # needs a CUDA GPU (sm >= 8.9) and triton
    PYTHONPATH=. python benchmarks/fp8_codec.py --quick    # skip the block-size sweep
    PYTHONPATH=. python benchmarks/fp8_codec.py --interpret  # no GPU: byte checks only, Triton interpreter

1. Bytes. Random, outlier (4 channels x100), zero and -0, tiny (below the 2**-100 amax floor, fp32/bf16
   subnormal), huge, exact-tie and non-finite rows, float32/bfloat16/float16, D = 64, 72, 128, 256, read
   through contiguous, permuted, 5-dim head-split and sliced views, also into a slot (``out=``) at an
   odd byte offset; a sweep of ~0.3M float32 values (every float16 value <= 448, every e4m3 midpoint,
   random bits) in rows whose absmax is 448 so the e4m3 cast sees them unscaled; every e4m3 code decoded with random, tiny, huge and NaN scales.
   ``fp8_encode``/``fp8_decode`` on the GPU must equal ``encode_torch``/``decode_torch`` on the CPU
   byte for byte (decoded NaNs compared as NaN). ``--interpret`` runs the same checks through
   Triton's CPU interpreter, whose own float8/bfloat16 casts round half up and lose the exponent carry;
   they are replaced by torch's round-to-nearest-even casts (what ``cvt.rn`` does on the GPU), so that
   mode checks everything but the hardware casts.
2. Throughput, fixed iteration counts timed with CUDA events around CUDA-graph replays (so Python
   launch overhead does not count; eager per-call time is reported separately), inputs rotated over
   enough buffers to overflow L2, outputs kept distinct. GB/s count bytes read + written. Shapes:
   the FLUX layer (1, 24, 4608, 128) bf16 encoded through its (4608, 1, 24, 128) permuted view, and
   4x the sequence. Compared with ``x.clone()`` on the same device and with ``torch.compile`` of the
   torch implementation. Goal: >= 85% of the copy's GB/s.

Writes ``$OUT/fp8_codec.json`` (default ``benchmarks/results``); exits 1 if any byte differs, 2 if it
cannot run (no triton, no GPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--interpret", action="store_true", help="no GPU: byte checks in Triton's interpreter")
ARGS.add_argument("--quick", action="store_true", help="skip the block-size sweep")
OPTS = ARGS.parse_args()
if OPTS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton.jit decorates the kernels

import torch  # noqa: E402

try:
    import triton  # noqa: E402
except Exception as e:  # noqa: BLE001 - any import failure means no kernels to check
    print(f"triton import failed: {e!r}; the FP8 CUDA kernels cannot run", file=sys.stderr)
    sys.exit(2)

from fastusp_xdit.comm import fp8  # noqa: E402
from fastusp_xdit.comm.fp8 import decode_torch, encode_torch, fp8_decode, fp8_encode  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
L2_BYTES = 50 * 2**20  # H100; H200 has the same


def _exact_interpreter_casts() -> None:
    """Replace the interpreter's float casts between fp32/bf16/fp16/e4m3 by torch's RNE casts."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    stock = interpreter._convert_float
    types = {tl.float32: (torch.float32, np.int32, torch.int32),
             tl.bfloat16: (torch.bfloat16, np.int16, torch.int16),
             tl.float16: (torch.float16, np.int16, torch.int16),
             tl.float8e4nv: (torch.float8_e4m3fn, np.int8, torch.int8)}

    def convert(data, src, dst, rounding):
        if src not in types or dst not in types or rounding not in (None, interpreter._ir.ROUNDING_MODE.RTNE):
            return stock(data, src, dst, rounding)
        (t_src, np_src, _), (t_dst, _, int_dst) = types[src], types[dst]
        t = torch.from_numpy(np.ascontiguousarray(data).view(np_src).copy()).view(t_src)
        out = t.to(t_dst).view(int_dst).numpy()
        return out.view(getattr(np, f"uint{dst.primitive_bitwidth}")).reshape(data.shape)

    interpreter._convert_float = convert


def _device_codec(device: torch.device):
    """encode/decode under test: the public API on CUDA, the Triton kernels directly in the interpreter."""
    if device.type == "cuda":
        return fp8_encode, fp8_decode
    from fastusp_xdit.comm import fp8_triton

    return fp8_triton.encode, fp8_triton.decode


# ----------------------------------------------------------------------------------------- bytes
def _special_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B>=1, H>=6, S>=12, D>=8) float32 -> dtype with every special row kind planted."""
    d = x.shape[-1]
    x = x.clone()
    x[1 % x.shape[0], ..., [3, 17 % d, 40 % d, d - 1]] *= 100  # outlier channels
    x[0, 0, 0] = 0.0
    x[0, 0, 1] = -0.0
    x[0, 2, 3] *= 1e-35 if dtype != torch.float16 else 1e-6  # below the amax floor / fp16 subnormal
    if dtype != torch.float16:
        x[0, 2, 4] *= 1e-41  # fp32/bf16 subnormal inputs
    x[0, 4, 6] = 0.0
    ties = torch.tensor([448.0, 21.0, -23.0, 0.5 + 1 / 32, 2.0**-10, 3 * 2.0**-10, -(2.0**-10), 0.0])
    x[0, 4, 6, : ties.numel()] = ties
    x[0, 4, 7] = 0.0
    x[0, 4, 7, :2] = torch.tensor([3.9375, 189 / 1024])  # 448/3.9375 must be a correctly rounded division
    x[0, 5, 8, 3] = float("inf")
    x[0, 5, 9, 0] = -float("inf")
    x[0, 5, 10, 7] = float("nan")
    x = x.to(dtype)
    x[0, 3, 5] *= torch.finfo(dtype).max / 2 / x[0, 3, 5].abs().max()  # huge finite
    return x


def _views(x: torch.Tensor) -> dict:
    b, h, s, d = x.shape
    return {
        "BHSD": x,
        "SBHD permute": x.permute(2, 0, 1, 3),
        "5-dim head split": x.view(b, 2, h // 2, s, d).permute(1, 3, 0, 2, 4),
        "sliced heads": x[:, ::2],
    }


def _cvt_sweep() -> torch.Tensor:
    """float32 rows of absmax 448 (so x * 448/amax == x exactly) holding values the e4m3 cast must round."""
    f16 = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    f16 = f16[torch.isfinite(f16) & (f16.abs() <= 448)]
    grid = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (grid[1:] + grid[:-1]) / 2
    g = torch.Generator().manual_seed(1)
    bits = (torch.randint(0, 2**23, (2**18,), generator=g)
            | (torch.randint(127 - 20, 127 + 9, (2**18,), generator=g) << 23)
            | (torch.randint(0, 2, (2**18,), generator=g) << 31)).to(torch.int32).view(torch.float32)
    vals = torch.cat([f16, mids, -mids, bits.clamp(-448, 448)])
    rows = math.ceil(vals.numel() / 127)
    x = torch.zeros(rows * 127)
    x[: vals.numel()] = vals
    return torch.cat([torch.full((rows, 1), 448.0), x.view(rows, 127)], dim=1)


def _code_sweep() -> torch.Tensor:
    """Encoded rows (D = 128) holding every e4m3 code, with random, tiny, huge, zero and NaN scales."""
    g = torch.Generator().manual_seed(2)
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128).repeat(64, 1)
    # The encoder's smallest nonzero scale is 2**-100 / 448 > 2**-109: products stay normal float32.
    scales = torch.exp2(torch.empty(128).uniform_(-108, 118, generator=g))
    scales[:4] = torch.tensor([0.0, 2.0**-100 / 448, 3.4e38 / 448, float("nan")])
    scale_bytes = scales.view(128, 1).view(torch.uint8)
    return torch.cat([codes, scale_bytes], dim=1)


def _compare(name: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    got = got.cpu()
    if got.dtype == torch.uint8:
        diff = got != want
    else:  # decoded values: bitwise, NaN == NaN
        nan_g, nan_w = got.isnan(), want.isnan()
        bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
        diff = (nan_g != nan_w) | (~nan_w & (got.view(bits) != want.view(bits)))
    n = int(diff.sum())
    rec = {"case": name, "elements": want.numel(), "mismatches": n}
    if n:
        first = diff.nonzero()[0].tolist()
        rec["first_mismatch"] = {"index": first, "got": float(got[tuple(first)]), "want": float(want[tuple(first)])}
    return rec


def check_bytes(device: torch.device) -> list[dict]:
    enc, dec = _device_codec(device)
    results = []
    g = torch.Generator().manual_seed(0)
    for dtype in DTYPES:
        for d in (128, 64, 72, 256):
            x = _special_rows(torch.randn(2, 6, 24 if device.type == "cpu" else 96, d, generator=g), dtype)
            xd = x.to(device)
            for vname, v in _views(x).items():
                name = f"{dtype} D={d} {vname}"
                want = encode_torch(v)
                results.append(_compare(f"encode {name}", enc(_views(xd)[vname]), want))
                want_y = decode_torch(want, dtype)
                results.append(_compare(f"decode {name}", dec(want.to(device), dtype), want_y))
                flipped = want.transpose(0, -2)
                results.append(_compare(f"decode strided {name}", dec(flipped.to(device), dtype),
                                        decode_torch(flipped, dtype)))
                if vname == "SBHD permute":  # out= a slot at an odd offset of a bigger buffer
                    slot = torch.zeros(3 + want.numel(), dtype=torch.uint8, device=device)[3:].view(want.shape)
                    results.append(_compare(f"encode into slot {name}", enc(_views(xd)[vname], slot), want))
    sweep = _cvt_sweep()
    for dtype in DTYPES:
        xs = sweep.to(dtype)
        results.append(_compare(f"encode cast sweep {dtype}", enc(xs.to(device)), encode_torch(xs)))
    codes = _code_sweep()
    for dtype in DTYPES:
        results.append(_compare(f"decode code sweep {dtype}", dec(codes.to(device), dtype), decode_torch(codes, dtype)))
    return results


# ------------------------------------------------------------------------------------ throughput
def _time_graph(fn, inputs: list, calls: int, reps: int) -> tuple[float, bool]:
    """Seconds per call of ``fn`` over ``inputs`` in rotation: CUDA-graph replays, else an eager loop."""
    for x in inputs:
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for x in inputs:
                fn(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [fn(inputs[i % len(inputs)]) for i in range(calls)]  # distinct outputs: no L2 reuse
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        del outs, graph
        return start.elapsed_time(end) / 1e3 / (reps * calls), True
    except Exception as e:  # noqa: BLE001 - fall back to eager timing, reported as such
        print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)")
        torch.cuda.synchronize()
        return _time_eager(fn, inputs, calls * reps), False


def _time_eager(fn, inputs: list, iters: int) -> float:
    for x in inputs:
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(inputs[i % len(inputs)])
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def throughput(device: torch.device, sweep: bool) -> tuple[list[dict], list[dict]]:
    from fastusp_xdit.comm import fp8_triton

    rows, tuning = [], []
    enc_compiled = torch.compile(encode_torch, fullgraph=True, dynamic=False)
    dec_compiled = torch.compile(decode_torch, fullgraph=True, dynamic=False)
    bf16 = torch.bfloat16
    for label, s in (("FLUX layer (1,24,4608,128)", 4608), ("4x sequence (1,24,18432,128)", 4 * 4608)):
        shape = (1, 24, s, 128)
        nbytes = math.prod(shape) * 2
        n_buf = max(2, math.ceil(3 * L2_BYTES / nbytes))
        xs = [torch.randn(shape, device=device, dtype=bf16) for _ in range(n_buf)]
        views = [x.permute(2, 0, 1, 3) for x in xs]  # (S, B, H, D): the Ulysses send order
        bufs = [fp8_encode(v) for v in views]
        enc_bytes = nbytes + bufs[0].numel()
        dec_bytes = bufs[0].numel() + nbytes
        calls, reps = (20, 10) if s == 4608 else (10, 10)
        cases = [
            ("copy x.clone()", lambda x: x.clone(), xs, 2 * nbytes),
            ("encode triton (permuted view in)", fp8_encode, views, enc_bytes),
            ("decode triton", lambda b: fp8_decode(b, bf16), bufs, dec_bytes),
            ("decode triton + inverse permute", lambda b: fp8_decode(b.permute(1, 2, 0, 3), bf16), bufs, dec_bytes),
            ("encode torch.compile(encode_torch)", enc_compiled, views, enc_bytes),
            ("decode torch.compile(decode_torch)", lambda b: dec_compiled(b, bf16), bufs, dec_bytes),
        ]
        copy_gbs = None
        for name, fn, inputs, moved in cases:
            try:
                sec, graphed = _time_graph(fn, inputs, calls, reps)
            except Exception as e:  # a comparison row that fails is recorded, not fatal
                rows.append({"shape": label, "op": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"{label:30s} {name:38s} failed: {type(e).__name__}", flush=True)
                continue
            gbs = moved / sec / 1e9
            copy_gbs = copy_gbs or gbs
            rec = {"shape": label, "op": name, "us": sec * 1e6, "GB_s": gbs, "of_copy": gbs / copy_gbs,
                   "bytes_moved": moved, "cuda_graph": graphed}
            if "triton" in name and "permute" not in name:
                rec["eager_us_per_call"] = _time_eager(fn, inputs, calls * reps) * 1e6
            rows.append(rec)
            eager = f"  eager {rec['eager_us_per_call']:7.1f} us/call" if "eager_us_per_call" in rec else ""
            print(f"{label:30s} {name:38s} {rec['us']:8.1f} us {gbs:7.0f} GB/s {rec['of_copy']:6.1%}{eager}",
                  flush=True)
        if sweep:
            for kernel, fn_of, inputs, moved in (("encode", fp8_triton.encode, views, enc_bytes),
                                                 ("decode", lambda b, **k: fp8_triton.decode(b, bf16, **k), bufs,
                                                  dec_bytes)):
                for block_rows in (8, 16, 32, 64):
                    for warps in (2, 4, 8):
                        sec, _ = _time_graph(lambda t: fn_of(t, block_rows=block_rows, num_warps=warps),
                                             inputs, calls, reps)
                        tuning.append({"shape": label, "kernel": kernel, "block_rows": block_rows,
                                       "num_warps": warps, "us": sec * 1e6, "GB_s": moved / sec / 1e9,
                                       "of_copy": moved / sec / 1e9 / copy_gbs})
                best = max((t for t in tuning if t["shape"] == label and t["kernel"] == kernel),
                           key=lambda t: t["GB_s"])
                print(f"{label:30s} sweep best {kernel}: block_rows={best['block_rows']} "
                      f"num_warps={best['num_warps']} {best['GB_s']:.0f} GB/s ({best['of_copy']:.1%} of copy)",
                      flush=True)
        del xs, views, bufs
        torch.cuda.empty_cache()
    return rows, tuning


def main() -> int:
    if OPTS.interpret:
        _exact_interpreter_casts()
        device = torch.device("cpu")
        device_name = "cpu (Triton interpreter, torch RNE casts)"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or pass --interpret for the byte checks", file=sys.stderr)
            return 2
        device = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(device)
        if not fp8.triton_serves(device.index):
            print(f"the Triton FP8 path is not active on {device_name} (needs sm >= 8.9 and triton)",
                  file=sys.stderr)
            return 2
    t0 = time.time()
    checks = check_bytes(device)
    bad = [c for c in checks if c["mismatches"]]
    for c in bad:
        print(f"MISMATCH {c}")
    print(f"byte checks: {len(checks) - len(bad)}/{len(checks)} cases equal "
          f"({sum(c['elements'] for c in checks)} elements, {time.time() - t0:.1f} s)", flush=True)
    rows, tuning, failure = [], [], None
    if not OPTS.interpret:
        try:
            rows, tuning = throughput(device, sweep=not OPTS.quick)
        except Exception:  # noqa: BLE001 - keep the byte checks: write the JSON, then fail
            failure = traceback.format_exc()
            print(failure, file=sys.stderr)
    result = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "default_config": {"block_rows": "4096 // next_pow2(D)", "num_warps": 4},
        "bytes_equal": not bad,
        "byte_checks": checks,
        "throughput": rows,
        "goal": "encode and decode >= 85% of the copy's GB/s",
        "sweep": tuning,
        "throughput_error": failure,
    }
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fp8_codec.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 1 if bad or failure else 0


if __name__ == "__main__":
    sys.exit(main())
