"""INT8 row codec: CUDA (Triton) bytes == torch bytes, and encode/decode throughput against a copy.

    PYTHONPATH=. python benchmarks/int8_codec.py               # a CUDA GPU (sm >= 8.0) and triton
    PYTHONPATH=. python benchmarks/int8_codec.py --quick       # skip the block-size sweep
    PYTHONPATH=. python benchmarks/int8_codec.py --interpret   # no GPU: byte checks in Triton's interpreter
    PYTHONPATH=. python benchmarks/int8_codec.py --device cpu  # smoke test: torch path, tiny timings

The int8 twin of ``benchmarks/fp8_codec.py``, whose CUDA-graph timers and interpreter cast fix it
imports (that script needs triton to import, so ``--device cpu`` times with a plain wall clock).

1. Bytes. Random, outlier (a few channels x100), zero and -0, tiny, huge, exact-tie (.5 steps, the
   reciprocal-product trap) and non-finite rows, float32/bfloat16/float16, D = 128, 64, 72, 256,
   through contiguous, permuted (S, B, H, D), 5-dim head-split and sliced views, also into a slot at
   an odd byte offset; a sweep of every float16 value and every .5 step of [-127, 127] plus random
   float32 values, in rows of absmax 127 (so ``x * 127/a == x`` and the rounding sees them
   unscaled); every int8 code decoded with random, tiny, zero and NaN scales. CUDA (or the
   interpreter) must equal ``encode_torch``/``decode_torch`` on the CPU byte for byte (decoded NaN
   compared as NaN). ``--device cpu`` checks the public ops against the same reference (plumbing: views,
   ``out=``, ``torch.compile``).
2. Throughput (CUDA): the FLUX layer (1, 24, 4608, 128) bf16, encoded through its (4608, 1, 24, 128)
   permuted view, and 4x the sequence; GB/s counts bytes read + written; against ``x.clone()``, the
   e4m3 codec and ``torch.compile`` of the torch implementation. Goal: >= 85% of the copy's GB/s.

Writes ``$OUT/int8_codec-<cuda|interpret|cpu>.json`` (default ``benchmarks/results``); exits 1 if any
byte differs, 2 if it cannot run.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback

ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ARGS.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
ARGS.add_argument("--interpret", action="store_true", help="no GPU: byte checks in Triton's interpreter")
ARGS.add_argument("--quick", action="store_true", help="skip the block-size sweep")
ARGS.add_argument("--shape", default="1,4,512,128", help="--device cpu timing shape B,H,S,D (bf16)")
OPTS = ARGS.parse_args()
if OPTS.interpret:
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton.jit decorates the kernels

import torch  # noqa: E402

from fastusp_xdit.comm import fp8, int8  # noqa: E402
from fastusp_xdit.comm.int8 import decode_torch, encode_torch, int8_decode, int8_encode  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
L2_BYTES = 50 * 2**20


def _fp8_bench():
    """``benchmarks/fp8_codec.py`` as a module, for its timers (it parses argv and imports triton)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fp8_codec.py")
    argv = sys.argv
    sys.argv = [path] + (["--interpret"] if OPTS.interpret else [])
    try:
        spec = importlib.util.spec_from_file_location("_fp8_codec_bench", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


# ----------------------------------------------------------------------------------------- bytes
def _special_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B>=2, H>=6, S>=12, D>=16) float32 -> dtype with every special row kind planted."""
    d = x.shape[-1]
    x = x.clone()
    x[1, ..., [3, 9, d - 1]] *= 100  # outlier channels
    x[0, 0, 0] = 0.0
    x[0, 0, 1] = -0.0
    x[0, 2, 3] *= 1e-35 if dtype != torch.float16 else 1e-6  # below the amax floor / fp16 subnormal
    if dtype != torch.float16:
        x[0, 2, 4] *= 1e-41  # fp32/bf16 subnormal inputs
    x[0, 4, 6] = 0.0
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -3.5, 125.5, -126.5, 0.25, 0.75, 0.49999997, 2.5000002])
    x[0, 4, 6, : ties.numel()] = ties
    x[0, 4, 7] = 0.0
    x[0, 4, 7, :2] = torch.tensor([3 / 64, 0.0009227362461388111])  # 127/a must be a correct division
    x[0, 4, 8] = 0.0
    x[0, 4, 8, :5] = torch.tensor([254.0, 1.0, 3.0, 5.0, -7.0])  # ties through the scaling (127/a = 0.5)
    x[0, 5, 8, 3] = float("inf")
    x[0, 5, 9, 0] = -float("inf")
    x[0, 5, 10, 7] = float("nan")
    x = x.to(dtype)
    x[0, 3, 5] *= torch.finfo(dtype).max / 2 / x[0, 3, 5].abs().max()  # huge finite
    return x


def _views(x: torch.Tensor) -> dict:
    b, h, s, d = x.shape
    return {"BHSD": x, "SBHD permute": x.permute(2, 0, 1, 3),
            "5-dim head split": x.view(b, 2, h // 2, s, d).permute(1, 3, 0, 2, 4), "sliced heads": x[:, ::2]}


def _round_sweep() -> torch.Tensor:
    """float32 rows of absmax 127 holding every float16 value and .5 step in [-127, 127], random bits."""
    f16 = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    f16 = f16[torch.isfinite(f16) & (f16.abs() <= 127)]
    halves = torch.arange(-254, 255, dtype=torch.float32) / 2
    g = torch.Generator().manual_seed(1)
    bits = (torch.randint(0, 2**23, (2**18,), generator=g)
            | (torch.randint(127 - 20, 127 + 7, (2**18,), generator=g) << 23)
            | (torch.randint(0, 2, (2**18,), generator=g) << 31)).to(torch.int32).view(torch.float32)
    vals = torch.cat([f16, halves, bits.clamp(-127, 127)])
    rows = math.ceil(vals.numel() / 127)
    x = torch.zeros(rows * 127)
    x[: vals.numel()] = vals
    return torch.cat([torch.full((rows, 1), 127.0), x.view(rows, 127)], dim=1)


def _code_sweep() -> torch.Tensor:
    """Encoded rows (D = 128) holding every int8 code, with random, tiny, huge, zero and NaN scales."""
    g = torch.Generator().manual_seed(2)
    codes = torch.arange(256, dtype=torch.uint8).view(2, 128).repeat(64, 1)
    scales = torch.exp2(torch.empty(128).uniform_(-107, 120, generator=g))
    scales[:4] = torch.tensor([0.0, 2.0**-100 / 127, 3.4e38 / 127, float("nan")])
    return torch.cat([codes, scales.view(128, 1).view(torch.uint8)], dim=1)


def _compare(name: str, got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.cpu().contiguous(), want.contiguous()
    if got.dtype == torch.uint8:
        diff = got != want
    else:  # decoded values: bitwise, NaN == NaN
        bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
        diff = (got.isnan() != want.isnan()) | (~want.isnan() & (got.view(bits) != want.view(bits)))
    rec = {"case": name, "elements": want.numel(), "mismatches": int(diff.sum())}
    if rec["mismatches"]:
        first = diff.nonzero()[0].tolist()
        rec["first_mismatch"] = {"index": first, "got": float(got[tuple(first)]), "want": float(want[tuple(first)])}
    return rec


def check_bytes(device: torch.device, interpret: bool) -> list[dict]:
    """The device path under test against ``encode_torch``/``decode_torch`` on the CPU."""
    if interpret:
        from fastusp_xdit.comm import int8_triton

        enc, dec = int8_triton.encode, int8_triton.decode
    else:
        enc, dec = int8_encode, int8_decode
    results = []
    g = torch.Generator().manual_seed(0)
    small = device.type == "cpu"
    for dtype in DTYPES:
        for d in ((128, 72) if small else (128, 64, 72, 256)):
            x = _special_rows(torch.randn(2, 6, 24 if small else 96, d, generator=g), dtype)
            xd = x.to(device)
            for vname, v in _views(x).items():
                name = f"{dtype} D={d} {vname}"
                want = encode_torch(v)
                results.append(_compare(f"encode {name}", enc(_views(xd)[vname]), want))
                results.append(_compare(f"decode {name}", dec(want.to(device), dtype), decode_torch(want, dtype)))
                flipped = want.transpose(0, -2)
                results.append(_compare(f"decode strided {name}", dec(flipped.to(device), dtype),
                                        decode_torch(flipped, dtype)))
                if vname == "SBHD permute":  # out= a slot at an odd offset of a bigger buffer
                    slot = torch.zeros(3 + want.numel(), dtype=torch.uint8, device=device)[3:].view(want.shape)
                    results.append(_compare(f"encode into slot {name}", enc(_views(xd)[vname], slot), want))
    sweep = _round_sweep()
    for dtype in DTYPES:
        xs = sweep.to(dtype)
        results.append(_compare(f"encode rounding sweep {dtype}", enc(xs.to(device)), encode_torch(xs)))
    codes = _code_sweep()
    for dtype in DTYPES:
        results.append(_compare(f"decode code sweep {dtype}", dec(codes.to(device), dtype), decode_torch(codes, dtype)))
    if device.type == "cpu" and not interpret:  # the compiled public ops trace to the same bytes
        x = _special_rows(torch.randn(2, 6, 24, 128, generator=g), torch.bfloat16)
        fn = torch.compile(lambda t: int8_decode(int8_encode(t.permute(2, 0, 1, 3)), torch.bfloat16),
                           fullgraph=True)
        results.append(_compare("torch.compile(fullgraph) encode+decode", fn(x),
                                decode_torch(encode_torch(x.permute(2, 0, 1, 3)), torch.bfloat16)))
    return results


# ------------------------------------------------------------------------------------ throughput
def throughput_cuda(device: torch.device, sweep: bool) -> tuple[list[dict], list[dict]]:
    from fastusp_xdit.comm import int8_triton

    bench = _fp8_bench()
    rows, tuning = [], []
    enc_compiled = torch.compile(encode_torch, fullgraph=True, dynamic=False)
    dec_compiled = torch.compile(decode_torch, fullgraph=True, dynamic=False)
    bf16 = torch.bfloat16
    fp8_note = "triton" if fp8.triton_serves(device.index) else "torch (no sm 8.9)"
    for label, s in (("FLUX layer (1,24,4608,128)", 4608), ("4x sequence (1,24,18432,128)", 4 * 4608)):
        shape = (1, 24, s, 128)
        nbytes = math.prod(shape) * 2
        n_buf = max(2, math.ceil(3 * L2_BYTES / nbytes))
        xs = [torch.randn(shape, device=device, dtype=bf16) for _ in range(n_buf)]
        views = [x.permute(2, 0, 1, 3) for x in xs]  # (S, B, H, D): the Ulysses send order
        bufs = [int8_encode(v) for v in views]
        fbufs = [fp8.fp8_encode(v) for v in views]
        enc_bytes = dec_bytes = nbytes + bufs[0].numel()
        calls, reps = (20, 10) if s == 4608 else (10, 10)
        cases = [
            ("copy x.clone()", lambda x: x.clone(), xs, 2 * nbytes),
            ("int8 encode triton (permuted view in)", int8_encode, views, enc_bytes),
            ("int8 decode triton", lambda b: int8_decode(b, bf16), bufs, dec_bytes),
            ("int8 decode triton + inverse permute", lambda b: int8_decode(b.permute(1, 2, 0, 3), bf16), bufs,
             dec_bytes),
            (f"e4m3 encode {fp8_note} (permuted view in)", fp8.fp8_encode, views, enc_bytes),
            (f"e4m3 decode {fp8_note}", lambda b: fp8.fp8_decode(b, bf16), fbufs, dec_bytes),
            ("int8 encode torch.compile(encode_torch)", enc_compiled, views, enc_bytes),
            ("int8 decode torch.compile(decode_torch)", lambda b: dec_compiled(b, bf16), bufs, dec_bytes),
        ]
        copy_gbs = None
        for name, fn, inputs, moved in cases:
            try:
                sec, graphed = bench._time_graph(fn, inputs, calls, reps)
            except Exception as e:  # a comparison row that fails is recorded, not fatal
                rows.append({"shape": label, "op": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"{label:30s} {name:42s} failed: {type(e).__name__}", flush=True)
                continue
            gbs = moved / sec / 1e9
            copy_gbs = copy_gbs or gbs
            rec = {"shape": label, "op": name, "us": sec * 1e6, "GB_s": gbs, "of_copy": gbs / copy_gbs,
                   "bytes_moved": moved, "cuda_graph": graphed}
            if name.startswith("int8") and "triton" in name and "permute" not in name:
                rec["eager_us_per_call"] = bench._time_eager(fn, inputs, calls * reps) * 1e6
            rows.append(rec)
            print(f"{label:30s} {name:42s} {rec['us']:8.1f} us {gbs:7.0f} GB/s {rec['of_copy']:6.1%}", flush=True)
        if sweep:
            for kernel, fn_of, inputs, moved in (("encode", int8_triton.encode, views, enc_bytes),
                                                 ("decode", lambda b, **k: int8_triton.decode(b, bf16, **k), bufs,
                                                  dec_bytes)):
                for block_rows in (8, 16, 32, 64):
                    for warps in (2, 4, 8):
                        sec, _ = bench._time_graph(lambda t: fn_of(t, block_rows=block_rows, num_warps=warps),
                                                   inputs, calls, reps)
                        tuning.append({"shape": label, "kernel": kernel, "block_rows": block_rows,
                                       "num_warps": warps, "us": sec * 1e6, "GB_s": moved / sec / 1e9,
                                       "of_copy": moved / sec / 1e9 / copy_gbs})
                best = max((t for t in tuning if t["shape"] == label and t["kernel"] == kernel),
                           key=lambda t: t["GB_s"])
                print(f"{label:30s} sweep best {kernel}: block_rows={best['block_rows']} "
                      f"num_warps={best['num_warps']} {best['GB_s']:.0f} GB/s ({best['of_copy']:.1%} of copy)")
        del xs, views, bufs, fbufs
        torch.cuda.empty_cache()
    return rows, tuning


def throughput_cpu(shape: tuple, iters: int = 5) -> list[dict]:
    """Wall-clock smoke timings of the torch path (no claim about GPU speed)."""
    x = torch.randn(shape, dtype=torch.bfloat16)
    v = x.permute(2, 0, 1, 3)
    buf, fbuf = int8_encode(v), fp8.fp8_encode(v)
    nbytes = x.numel() * 2
    moved = nbytes + buf.numel()
    cases = [("copy x.clone()", lambda: x.clone(), 2 * nbytes),
             ("int8 encode (permuted view in)", lambda: int8_encode(v), moved),
             ("int8 decode", lambda: int8_decode(buf, torch.bfloat16), moved),
             ("e4m3 encode (permuted view in)", lambda: fp8.fp8_encode(v), moved),
             ("e4m3 decode", lambda: fp8.fp8_decode(fbuf, torch.bfloat16), moved)]
    rows, copy_gbs = [], None
    for name, fn, nb in cases:
        fn()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sec = (time.perf_counter() - t0) / iters
        gbs = nb / sec / 1e9
        copy_gbs = copy_gbs or gbs
        rows.append({"shape": str(shape), "op": name, "us": sec * 1e6, "GB_s": gbs, "of_copy": gbs / copy_gbs,
                     "bytes_moved": nb})
        print(f"{str(shape):20s} {name:32s} {sec * 1e6:9.1f} us {gbs:6.2f} GB/s {gbs / copy_gbs:6.1%}", flush=True)
    return rows


def main() -> int:
    versions = {"torch": torch.__version__, "python": platform.python_version(), "cuda": torch.version.cuda}
    if OPTS.interpret or OPTS.device == "cuda":
        try:
            import triton
        except Exception as e:  # noqa: BLE001 - any import failure means no kernels to check
            print(f"triton import failed: {e!r}; the INT8 kernels cannot run (try --device cpu)", file=sys.stderr)
            return 2
        versions["triton"] = triton.__version__
    if OPTS.interpret:
        _fp8_bench()._exact_interpreter_casts()  # torch's RNE casts for the interpreter's bf16 ones
        device, tag, device_name = torch.device("cpu"), "interpret", "cpu (Triton interpreter, torch RNE casts)"
    elif OPTS.device == "cpu":
        device, tag = torch.device("cpu"), "cpu"
        device_name = f"cpu ({platform.machine()}, {os.cpu_count()} cores), torch path"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or pass --interpret / --device cpu", file=sys.stderr)
            return 2
        device, tag = torch.device("cuda", torch.cuda.current_device()), "cuda"
        device_name = torch.cuda.get_device_name(device)
        if not int8.triton_serves(device.index):
            print(f"the Triton INT8 path is not active on {device_name} (needs sm >= 8.0 and triton)", file=sys.stderr)
            return 2
    t0 = time.time()
    checks = check_bytes(device, OPTS.interpret)
    bad = [c for c in checks if c["mismatches"]]
    for c in bad:
        print(f"MISMATCH {c}")
    print(f"byte checks: {len(checks) - len(bad)}/{len(checks)} cases equal "
          f"({sum(c['elements'] for c in checks)} elements, {time.time() - t0:.1f} s)", flush=True)
    rows, tuning, failure = [], [], None
    try:
        if tag == "cuda":
            rows, tuning = throughput_cuda(device, sweep=not OPTS.quick)
        elif tag == "cpu":
            rows = throughput_cpu(tuple(int(n) for n in OPTS.shape.split(",")))
    except Exception:  # noqa: BLE001 - keep the byte checks: write the JSON, then fail
        failure = traceback.format_exc()
        print(failure, file=sys.stderr)
    result = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": device_name,
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "default_config": {"block_rows": "4096 // next_pow2(D)", "num_warps": 4},
        "bytes_equal": not bad,
        "byte_checks": checks,
        "throughput": rows,
        "goal": "encode and decode >= 85% of the copy's GB/s (CUDA)",
        "sweep": tuning,
        "throughput_error": failure,
    }
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"int8_codec-{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 1 if bad or failure else 0


if __name__ == "__main__":
    sys.exit(main())
