"""One attention layer under ``fastusp_xdit.usp_attention`` on N processes, for every (ulysses, ring).

Per factorization of N (ulysses <= heads) and head-group count (``--head-groups``, Ulysses > 1 only:
``usp_attention(head_groups=G)`` pipelining): eager and ``torch.compile(fullgraph=True)`` time, error
against single-device attention over the whole sequence, and peak memory per rank. Pure-ring
configurations also run an all-gather ring (one all-gather of every K/V block, then per-block
attention + LSE merge: the rotater stock xfuser uses), defined only here, to compare memory with
FastUSP's O(2 x block) ring. If xfuser imports (GPU only), its stock ``USP`` runs the same
configurations (eager, ``combine_qkv_a2a``, compiled). Finally, lone-call timings of the all-to-all
and of the ring shift over the whole world at several buffer sizes give the ``a2a`` / ``p2p`` links
of ``fastusp_xdit.apps.plan``'s profile.

Every rank runs the same fixed iteration counts (never triton's do_bench, which picks counts per
rank and hangs NCCL), timed with CUDA events after a barrier; a layer's time is the slowest rank's.
Processes come from ``fastusp_xdit.apps.launch.run_distributed`` (no torchrun): NCCL on GPUs, gloo with
``--device cpu``. Writes ``$OUT/dist_layer-<device>-w<N>.json`` (default ``benchmarks/results``).

    python benchmarks/dist_layer.py --world 2                 # GPUs, FLUX layer (1, 24, 4608, 128) bf16
    python benchmarks/dist_layer.py --device cpu --world 2    # tiny shapes, for CI
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as ft_c

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmark this checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fastusp_xdit import layout, usp_attention  # noqa: E402
from fastusp_xdit.comm import all_to_all, ring_shift  # noqa: E402
from fastusp_xdit.usp.groups import usp_groups  # noqa: E402
from fastusp_xdit.apps.launch import run_distributed  # noqa: E402
from fastusp_xdit.ops import attention_with_lse, merge_into  # noqa: E402
from fastusp_xdit.apps.plan import fit_link  # noqa: E402
from micro import header, peak_bytes, timed, write_json  # noqa: E402


def allgather_ring(q, k, v, *, ring_group, **_):
    """Reference ring (comparison only): all-gather every K/V block, then attend block by block."""
    local = torch.stack((k, v))
    blocks = [torch.empty_like(local) for _ in range(ring_group.size())]
    dist.all_gather(blocks, local, group=ring_group)
    acc = lse = None
    for blk in blocks:
        out, out_lse = attention_with_lse(q, blk[0], blk[1])
        if acc is None:
            acc, lse = out.float(), out_lse
        else:
            acc, lse = merge_into(acc, lse, out, out_lse)
    return acc.to(q.dtype)


def _rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _measure(call, want, cfg) -> dict:
    """Error, ms and peak memory of one variant on this rank (a failure is recorded, not raised)."""
    dev = cfg["device"]
    try:
        err = _rel_err(call(), want)
        ms = timed(call, cfg["iters"], cfg["warmup"], dev, barrier=dist.barrier)
        return {"ms": ms, "rel_err": err, "peak_bytes": peak_bytes(call, dev)}
    except Exception as e:  # noqa: BLE001 - compile and kernel failures are results; a hang is bounded by the timeout
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _bench_fastusp(cfg, q, k, v, ref) -> list:
    s = q.shape[2]
    compiled = torch.compile(usp_attention, fullgraph=True) if cfg["compile"] else None
    rows = []
    for u, r in cfg["configs"]:
        ug, rg = usp_groups(u, r, cfg["device"])
        sp = (rg.rank() if rg is not None else 0) * u + (ug.rank() if ug is not None else 0)
        args = [layout.shard(t, 2, sp, u, r) for t in (q, k, v)]
        want = layout.shard(ref, 2, sp, u, r)
        kw = dict(ulysses_group=ug, ring_group=rg, seq_len_q=s, seq_len_kv=s)
        variants = [("fastusp", mode, fn, fp8, hg) for fp8 in dict.fromkeys(("none", cfg["fp8"]))
                    for hg in (cfg["head_groups"] if u > 1 else [1])
                    for mode, fn in (("eager", usp_attention), ("compiled", compiled)) if fn is not None]
        if u == 1 and r > 1:
            variants.append(("allgather_ring_reference", "eager", allgather_ring, "none", 1))
        for impl, mode, fn, fp8, hg in variants:
            extra = {"head_groups": hg} if fp8 == "none" else {"head_groups": hg, "fp8": fp8}
            rows.append({"ulysses": u, "ring": r, "impl": impl, "mode": mode, "fp8": fp8, "head_groups": hg,
                         **_measure(lambda: fn(*args, **kw, **extra), want, cfg)})
    return rows


def _bench_xfuser(cfg, q, k, v, ref) -> dict:
    """Stock xfuser 0.7.0 ``USP`` in the same configurations (yunchang groups built by xfuser)."""
    if cfg["device"] != "cuda":
        return {"skipped": "xfuser's USP needs CUDA (its import fails on CPU: DESIGN.md 1.6)"}
    try:
        from xfuser.config import xFuserArgs
        from xfuser.core.distributed import parallel_state as ps
        from xfuser.core.distributed import runtime_state as rs
        from xfuser.model_executor.layers.usp import USP
    except Exception as e:  # noqa: BLE001 - any import failure means: not available here
        return {"skipped": f"xfuser not importable: {type(e).__name__}: {e}"}
    import xfuser

    rank, world, s = dist.get_rank(), dist.get_world_size(), q.shape[2]
    ps.init_distributed_environment(world_size=world, rank=rank)  # reuses our process group
    rows = []
    for u, r in cfg["configs"]:
        ps.initialize_model_parallel(sequence_parallel_degree=u * r, ulysses_degree=u, ring_degree=r)
        try:
            engine, _ = xFuserArgs(model="fastusp-benchmark", ulysses_degree=u, ring_degree=r,
                                   attention_backend="cudnn").create_config()
            rs._RUNTIME = rs.RuntimeState(engine)  # xfuser.core.distributed.runtime_state._RUNTIME, 0.7.0
            sp = ps.get_sequence_parallel_rank()
            args = [t.narrow(2, sp * (s // world), s // world) for t in (q, k, v)]
            want = ref.narrow(2, sp * (s // world), s // world)
            compiled = torch.compile(USP, fullgraph=True)
            for mode, call in (("eager", lambda: USP(*args)),
                               ("eager_combine_qkv_a2a", lambda: USP(*args, combine_qkv_a2a=True)),
                               ("compiled", lambda: compiled(*args, combine_qkv_a2a=True))):
                rows.append({"ulysses": u, "ring": r, "impl": "xfuser_usp", "mode": mode, "fp8": "none",
                             **_measure(call, want, cfg)})
        finally:
            rs._RUNTIME = None
            ps.destroy_model_parallel()
    return {"version": getattr(xfuser, "__version__", "unknown"), "rows": rows}


def _lone_call_ms(op, cfg) -> float:
    """Median over ``link_iters`` calls, each timed alone between barriers."""
    times = []
    for _ in range(cfg["link_iters"]):
        times.append(timed(op, 1, 0, cfg["device"], barrier=dist.barrier))
    return statistics.median(times)


def _bench_links(cfg) -> list:
    world, group = dist.get_world_size(), dist.group.WORLD
    device = "cuda" if cfg["device"] == "cuda" else "cpu"
    rows = []
    for size in cfg["link_sizes"]:
        n = max(world, size // 2 // world * world)  # bf16 elements, an equal split per peer
        x = torch.ones(n, dtype=torch.bfloat16, device=device)
        splits = [n // world] * world
        a2a = _lone_call_ms(lambda: ft_c.wait_tensor(all_to_all(x, splits, splits, group)), cfg)
        p2p = _lone_call_ms(lambda: ft_c.wait_tensor(ring_shift(x, n, group)), cfg)
        rows.append({"buffer_bytes": 2 * n, "a2a_ms": a2a, "p2p_ms": p2p})
    return rows


def worker(cfg) -> dict:
    """Runs on every rank; the same work and iteration counts everywhere."""
    rank = dist.get_rank()
    torch._dynamo.config.recompile_limit = 64  # one compiled usp_attention serves every configuration
    device = torch.device("cuda", rank) if cfg["device"] == "cuda" else torch.device("cpu")
    g = torch.Generator().manual_seed(cfg["seed"])
    q, k, v = (torch.randn(*cfg["shape"], generator=g).to(device, getattr(torch, cfg["dtype"])) for _ in range(3))
    ref = attention_with_lse(q, k, v)[0]
    single_ms = timed(lambda: attention_with_lse(q, k, v), cfg["iters"], cfg["warmup"], cfg["device"])
    return {"rank": rank, "single_ms": single_ms, "fastusp": _bench_fastusp(cfg, q, k, v, ref),
            "xfuser": _bench_xfuser(cfg, q, k, v, ref) if cfg["xfuser"] else {"skipped": "--no-xfuser"},
            "links": _bench_links(cfg)}


def _combine(per_rank: list) -> list:
    """Rows of all ranks -> one row per variant: slowest rank's ms, every rank's ms and peak memory."""
    out = []
    for rows in zip(*per_rank):
        row = {k: v for k, v in rows[0].items() if k not in ("ms", "peak_bytes", "rel_err", "error")}
        errors = [r["error"] for r in rows if "error" in r]
        if errors:
            row["error"] = errors[0]
        else:
            row.update(ms=max(r["ms"] for r in rows), ms_per_rank=[r["ms"] for r in rows],
                       rel_err=max(r["rel_err"] for r in rows), peak_bytes_per_rank=[r["peak_bytes"] for r in rows])
        out.append(row)
    return out


def _links_profile(per_rank: list, world: int) -> tuple:
    rows = []
    for pts in zip(*(r["links"] for r in per_rank)):
        rows.append({"buffer_bytes": pts[0]["buffer_bytes"], "a2a_ms": max(p["a2a_ms"] for p in pts),
                     "p2p_ms": max(p["p2p_ms"] for p in pts)})
    profile = {}
    if world > 1 and len(rows) > 1:
        b = [r["buffer_bytes"] for r in rows]
        profile["a2a"] = fit_link([(x, x * (world - 1) / world, r["a2a_ms"] * 1e-3) for x, r in zip(b, rows)])
        profile["p2p"] = fit_link([(x, x, r["p2p_ms"] * 1e-3) for x, r in zip(b, rows)])
        profile = {k: {"latency_s": v.latency_s, "points": [list(p) for p in v.points]} for k, v in profile.items()}
    return rows, profile


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--world", type=int, help="processes (default: every visible GPU; 2 on CPU)")
    ap.add_argument("--shape", help="global B,H,S,D (default 1,24,4608,128 on CUDA, 1,4,64,16 on CPU)")
    ap.add_argument("--dtype", help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--configs", help="ulysses x ring pairs, e.g. 2x1,1x2 (default: every factorization)")
    ap.add_argument("--iters", type=int, help="timed calls (default 50 CUDA, 3 CPU)")
    ap.add_argument("--warmup", type=int, help="untimed calls first (default 10 CUDA, 1 CPU)")
    ap.add_argument("--link-sizes", help="buffer bytes for the link sweep (default 1 MB..64 MB CUDA, 4-64 kB CPU)")
    ap.add_argument("--link-iters", type=int, help="lone calls per size (default 20 CUDA, 3 CPU)")
    ap.add_argument("--fp8", default="qvo,k,ring_kv",
                    help="FP8 spec timed besides bf16 (usp_attention's fp8=; 'none' to skip)")
    ap.add_argument("--head-groups", default="1,2,4", help="usp_attention head_groups counts timed at Ulysses > 1")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-xfuser", action="store_true", help="skip stock xfuser USP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="hard deadline for all ranks, seconds")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible: pass --device cpu")
    args.world = args.world or (torch.cuda.device_count() if cuda else 2)
    if cuda and args.world > torch.cuda.device_count():
        ap.error(f"--world {args.world} exceeds the {torch.cuda.device_count()} visible GPUs")
    args.shape = [int(x) for x in (args.shape or ("1,24,4608,128" if cuda else "1,4,64,16")).split(",")]
    if len(args.shape) != 4:
        ap.error("--shape takes four integers B,H,S,D")
    heads = args.shape[1]
    if args.configs:
        args.configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    else:
        args.configs = [(u, args.world // u) for u in range(1, min(heads, args.world) + 1) if args.world % u == 0]
    for u, r in args.configs:
        if u * r != args.world or u > heads:
            ap.error(f"config {u}x{r}: ulysses x ring must equal --world {args.world} with ulysses <= {heads} heads")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.iters = args.iters or (50 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    default_sizes = [2 ** i * 10 ** 6 for i in range(7)] if cuda else [4096, 16384, 65536]
    args.link_sizes = [int(float(x)) for x in args.link_sizes.split(",")] if args.link_sizes else default_sizes
    args.link_iters = args.link_iters or (20 if cuda else 3)
    args.head_groups = [int(x) for x in args.head_groups.split(",")]
    if any(g < 1 for g in args.head_groups):
        ap.error("--head-groups takes integers >= 1, e.g. 1,2,4")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    cfg = {"device": args.device, "shape": args.shape, "dtype": args.dtype, "configs": args.configs,
           "iters": args.iters, "warmup": args.warmup, "compile": not args.no_compile, "fp8": args.fp8,
           "xfuser": not args.no_xfuser, "head_groups": args.head_groups,
           "link_sizes": args.link_sizes, "link_iters": args.link_iters, "seed": args.seed}
    per_rank = run_distributed(worker, args.world, cfg, timeout=args.timeout,
                               backend="nccl" if args.device == "cuda" else "gloo")
    single = max(r["single_ms"] for r in per_rank)
    xf = per_rank[0]["xfuser"]
    if "rows" in xf:
        xf = {**xf, "rows": _combine([r["xfuser"]["rows"] for r in per_rank])}
    links, profile = _links_profile(per_rank, args.world)
    result = {**header(args.device), "world": args.world,
              "config": {k: cfg[k] for k in ("shape", "dtype", "iters", "warmup", "seed", "link_iters")},
              "single_device_ms": single, "ideal_ms": single / args.world,
              "fastusp": _combine([r["fastusp"] for r in per_rank]), "xfuser": xf, "links": links,
              "profile": profile}
    path = write_json(result, f"dist_layer-{args.device}-w{args.world}.json")
    print(f"one device, whole sequence: {single:.4g} ms; "
          f"ideal per rank at {args.world}: {single / args.world:.4g} ms")
    for row in result["fastusp"] + xf.get("rows", []):
        name = (f"{row['impl']:<24} u{row['ulysses']} r{row['ring']} g{row.get('head_groups', 1)} {row['mode']:<22} "
                f"fp8 {row['fp8']:<13}")
        if "error" in row:
            print(f"{name} failed: {row['error']}")
        else:
            peaks = [p for p in row["peak_bytes_per_rank"] if p is not None]
            peak = f"{max(peaks) / 2 ** 20:.1f} MiB" if peaks else "n/a"
            print(f"{name} {row['ms']:.4g} ms ({row['ms'] / result['ideal_ms']:.2f}x ideal) "
                  f"err {row['rel_err']:.1e} peak {peak}")
    if "skipped" in xf:
        print(f"xfuser: skipped ({xf['skipped']})")
    for row in links:
        print(f"link {row['buffer_bytes'] / 1e6:8.3f} MB: all-to-all {row['a2a_ms']:.4g} ms, "
              f"ring shift {row['p2p_ms']:.4g} ms")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
