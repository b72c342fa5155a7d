"""One denoising step of the FLUX.1 transformer through xfuser 0.7.0: stock attention vs fastusp.

The model is xfuser's own ``xFuserFlux1Transformer2DWrapper`` (what xfuser's runner loads for
FLUX.1-dev: it shards the image and text tokens over the sequence-parallel group, every attention
layer calls xfuser's ``USP``, and the output is all-gathered), built from the FLUX.1-dev config with
random weights (no hub), identical on every rank. The xfuser runtime is set up the way xfuser's runner
does it: ``init_distributed_environment`` -> ``xFuserArgs(...).create_config()`` -> model ->
``initialize_runtime_state`` (which runs ``initialize_model_parallel``) -> ``set_input_parameters``.
Each variant is ``BACKEND:MODE``:

* BACKEND ``stock`` is the backend xfuser selects itself on this device (CUDNN on H100/H200 without
  flash-attn 3/4; ``--stock NAME`` overrides), ``fastusp`` and its variants are ours, any other
  name is passed to xfuser as ``--attention_backend`` would be;
* MODE ``eager``, ``compile`` (``torch.compile``, default mode) or ``reduce-overhead`` (CUDA graphs,
  the mode xfuser's runner uses for FLUX.1; CUDA only). Compiled variants start from
  ``torch._dynamo.reset()`` and use the runner's inductor compute/communication reordering.

Per variant: ms per step (fixed warm-up and timed iterations after a barrier, CUDA events; the
slowest rank's time), the first call's seconds (compilation), max |out - ref|, max |out - ref| /
max |ref| and the Frobenius ||out - ref|| / ||ref|| against stock eager (bf16 communication), peak GPU memory, and (eager) how many attention calls went through
``fastusp_xdit.usp_attention`` in one step (57 layers for fastusp, 0 for stock). A failing variant
records its error and the others still run; rank 0 rewrites the JSON after every variant, so a
hang killed by ``--timeout`` keeps the finished rows. The summary gives fastusp's time against
stock per mode in % (issue 6: <= 1% at world 1).

Writes ``$OUT/step-<device>-w<N>.json`` (default ``benchmarks/results``) and prints a table.

    python benchmarks/step.py                                  # 1 GPU, 1024x1024, FLUX.1-dev size, bf16
    python benchmarks/step.py --world 2 --sizes 1024,2048      # ulysses 2 over NCCL
    python benchmarks/step.py --device cpu --world 2           # tiny FLUX on gloo, fp32, for CI
    python benchmarks/step.py --world 2 --one-gpu --variants stock:eager,fastusp_int8:eager
                                       # 2 ranks on one GPU over gloo: numerics of the CUDA path only
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from importlib import metadata

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmark this checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fastusp_xdit.apps.launch import run_distributed  # noqa: E402
from fastusp_xdit.xdit.variants import VARIANTS  # noqa: E402
from micro import header, out_path, timed, write_json  # noqa: E402

# diffusers' FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev (transformer/config.json)
FLUX1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                 num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                 guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# CPU: same structure, a few small layers (4 heads so Ulysses 2 and 4 divide them)
TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8))
PIXELS_PER_TOKEN = 16  # FLUX.1: VAE scale factor 8, latents packed 2x2 into one token
MODES = ("eager", "compile", "reduce-overhead")
FASTUSP = tuple(VARIANTS)  # every fastusp variant
GOAL_PCT = 1.0  # issue 6: fastusp at most 1% slower than stock at world 1


class FluxTransformerOnly:
    """Stand-in pipeline for ``initialize_runtime_state``: the transformer and FLUX.1's VAE scale factor.

    xfuser 0.7.0 ``DiTRuntimeState._check_pipeline_class_name`` doubles ``vae_scale_factor`` for
    pipeline classes named ``Flux*`` (2x2 latent packing), hence the class name.
    """

    vae_scale_factor = 8

    def __init__(self, transformer):
        self.transformer = transformer


def build_model(config: dict, dtype: torch.dtype, device: torch.device, seed: int, one_gpu: bool = False):
    """xfuser's FLUX.1 transformer with random weights, built on ``device`` in ``dtype``, same on every rank."""
    from xfuser.model_executor.models.transformers.transformer_flux import xFuserFlux1Transformer2DWrapper

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 directly: fp32 FLUX.1-dev would need 48 GB
    try:
        with torch.device(device):
            model = xFuserFlux1Transformer2DWrapper(**config)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    if dist.get_world_size() > 1 and not one_gpu:  # one GPU: the seeded build is already identical
        for p in model.parameters():
            dist.broadcast(p, 0)
    return model


def step_inputs(config: dict, size: int, text_len: int, dtype, device, seed: int) -> dict:
    """Keyword arguments of one transformer call at ``size`` x ``size`` pixels, as FluxPipeline builds them."""
    g = torch.Generator().manual_seed(seed)
    side = size // PIXELS_PER_TOKEN
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(hidden_states=rand(1, side * side, config["in_channels"]),
                encoder_hidden_states=rand(1, text_len, config["joint_attention_dim"]),
                pooled_projections=rand(1, config["pooled_projection_dim"]),
                timestep=torch.tensor([0.5], device=device, dtype=dtype),
                guidance=torch.tensor([3.5], device=device, dtype=torch.float32),
                img_ids=img_ids.reshape(-1, 3).to(device, dtype),
                txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
                return_dict=False)


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:500]


def _count_fastusp_calls(step) -> int:
    """Run ``step`` once and count the calls that reached fastusp via the adapter (``usp_attention``,
    or ``usp_attention_staged`` for the FLUX overlap mode)."""
    import fastusp_xdit.xdit.usp_adapter as adapter

    names, calls = ("usp_attention", "usp_attention_staged"), []
    real = {name: getattr(adapter, name) for name in names}

    def spy(name):
        def call(*args, **kwargs):
            calls.append(name)
            return real[name](*args, **kwargs)
        return call

    for name in names:  # the adapter looks these globals up at call time
        setattr(adapter, name, spy(name))
    try:
        step()
    finally:
        for name in names:
            setattr(adapter, name, real[name])
    return len(calls)


def _enable_compute_comm_overlap():
    """What xfuser 0.7.0 ``xFuserModel._enable_compute_comm_overlap`` sets before compiling (SPMD runs)."""
    torch._inductor.config.reorder_for_compute_comm_overlap = True
    torch._inductor.config.reorder_for_compute_comm_overlap_passes = [
        "reorder_compute_for_overlap", "sink_waits", "raise_comms"]


def run_variant(model, inputs, backend, mode, ref, cfg) -> dict:
    """One variant on this rank; any failure becomes ``{"error": ...}``."""
    from xfuser.core.distributed import get_runtime_state

    cuda = cfg["device"] == "cuda"
    row: dict = {}
    fn = None
    try:
        get_runtime_state().set_attention_backend(cfg["stock"] if backend == "stock" else backend)
        row["attention_backend"] = get_runtime_state().attention_backend.name
        if mode == "eager":
            fn = model
        else:
            torch._dynamo.reset()
            fn = torch.compile(model, mode=None if mode == "compile" else mode)

        def step():
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            return fn(**inputs)[0]

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = step().clone()  # clone: a CUDA graph's output buffer is overwritten by the next replay
        if cuda:
            torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0
        row["finite"] = bool(torch.isfinite(out).all())
        if ref is not None:
            delta = out.double() - ref.double()
            diff = delta.abs().max().item()
            row.update(max_abs_diff=diff, rel_diff=diff / ref.double().abs().max().item(),
                       fro_diff=(delta.norm() / ref.double().norm()).item())
        row["fastusp_calls"] = _count_fastusp_calls(step) if mode == "eager" else None
        row["ms"] = timed(step, cfg["iters"], cfg["warmup"], cfg["device"], barrier=dist.barrier)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    except Exception as e:  # noqa: BLE001 - a failed compile or kernel is a result; hangs are bounded by --timeout
        row["error"] = _error(e)
    finally:
        del fn
        if mode != "eager":
            torch._dynamo.reset()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def _merge(rows: list, where: dict) -> dict:
    """One variant's rows of every rank -> one row: slowest rank's ms, worst error, first failure."""
    merged = dict(where)
    failed = [(rank, r["error"]) for rank, r in enumerate(rows) if "error" in r]
    if failed:
        merged["error"] = f"rank {failed[0][0]}: {failed[0][1]}"
        merged["attention_backend"] = rows[0].get("attention_backend")
        return merged
    merged.update(attention_backend=rows[0]["attention_backend"], ms=max(r["ms"] for r in rows),
                  ms_per_rank=[r["ms"] for r in rows], first_call_s=max(r["first_call_s"] for r in rows),
                  finite=all(r["finite"] for r in rows), fastusp_calls=rows[0]["fastusp_calls"])
    if "rel_diff" in rows[0]:
        merged.update({k: max(r[k] for r in rows) for k in ("max_abs_diff", "rel_diff", "fro_diff")})
    peaks = [r["peak_gib"] for r in rows if r["peak_gib"] is not None]
    merged["peak_gib"] = max(peaks) if peaks else None
    return merged


def summarize(rows: list, world: int) -> list:
    """fastusp's ms against stock's ms, per size, mode and fastusp variant, in % (positive: slower)."""
    ok = {(r["size"], r["backend"], r["mode"]): r["ms"] for r in rows if "ms" in r}
    out = []
    for (size, backend, mode), ms in ok.items():
        stock = ok.get((size, "stock", mode))
        if backend in FASTUSP and stock:
            pct = (ms / stock - 1) * 100
            out.append({"size": size, "backend": backend, "mode": mode, "ms": ms, "stock_ms": stock,
                        "overhead_pct": pct, "goal_pct": GOAL_PCT if world == 1 else None,
                        "meets_goal": pct <= GOAL_PCT if world == 1 else None})
    return out


def _result(cfg, stock: str, rows: list, complete: bool) -> dict:
    return {**cfg["header"], "world": cfg["world"], "ulysses": cfg["ulysses"], "ring": cfg["ring"],
            "config": {k: cfg[k] for k in ("model", "dtype", "text_len", "iters", "warmup", "seed", "variants")},
            "stock_backend": stock, "rows": rows, "overhead": summarize(rows, cfg["world"]),
            "complete": complete}


def worker(cfg) -> list:
    """Every rank: xfuser runtime, model, then each size and variant in the same order."""
    from fastusp_xdit.xdit import activate, hooks

    if cfg["one_gpu"]:  # xfuser's own groups over gloo too (NCCL refuses two ranks on one GPU)
        hooks.after_import("xfuser.envs", lambda envs: setattr(envs, "get_torch_distributed_backend", lambda: "gloo"))
    activate()  # before any xfuser import (required on CPU)
    from xfuser import xFuserArgs
    from xfuser.core.distributed import get_runtime_state, init_distributed_environment
    from xfuser.core.distributed.runtime_state import initialize_runtime_state

    rank = dist.get_rank()
    cuda = cfg["device"] == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = getattr(torch, cfg["dtype"])
    if any(m != "eager" for _, m in cfg["variants"]):
        _enable_compute_comm_overlap()

    init_distributed_environment()  # xfuser's world group (the process group already exists)
    engine_config, _ = xFuserArgs(model="FLUX.1-dev-random", ulysses_degree=cfg["ulysses"], ring_degree=cfg["ring"],
                                  attention_backend=cfg["stock_arg"], height=cfg["sizes"][0],
                                  width=cfg["sizes"][0]).create_config()
    config = FLUX1_DEV if cfg["model"] == "flux1-dev" else TINY
    model = build_model(config, dtype, device, cfg["seed"], cfg["one_gpu"])
    initialize_runtime_state(FluxTransformerOnly(model), engine_config)
    state = get_runtime_state()
    cfg["stock"] = state.attention_backend  # the runner's choice (or --stock)

    rows = []
    for size in cfg["sizes"]:
        state.set_input_parameters(height=size, width=size, batch_size=1, num_inference_steps=1,
                                   max_condition_sequence_length=cfg["text_len"], split_text_embed_in_sp=True)
        inputs = step_inputs(config, size, cfg["text_len"], dtype, device, cfg["seed"] + size)
        where = {"size": size, "tokens": (size // PIXELS_PER_TOKEN) ** 2 + cfg["text_len"]}
        try:
            state.set_attention_backend(cfg["stock"])
            ref = model(**inputs)[0].clone()
        except Exception as e:  # noqa: BLE001 - the rows still get timings, without errors against stock
            ref, where["reference_error"] = None, _error(e)
        for backend, mode in cfg["variants"]:
            mine = run_variant(model, inputs, backend, mode, ref, cfg)
            where.update(backend=backend, mode=mode)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
            rows.append(_merge(gathered, where))
            if rank == 0:  # keep finished rows even if a later variant hangs until --timeout
                write_json(_result(cfg, cfg["stock"].name, rows, complete=False), cfg["filename"])
    return (cfg["stock"].name, rows) if rank == 0 else None


def _versions() -> dict:
    out = {}
    for dist_name in ("xfuser", "diffusers", "yunchang", "transformers"):
        try:
            out[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            out[dist_name] = None
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--world", type=int, default=1, help="processes = GPUs (NCCL) or gloo ranks (default 1)")
    ap.add_argument("--ring", type=int, default=1, help="ring degree; ulysses = world / ring (default 1)")
    ap.add_argument("--model", choices=("flux1-dev", "tiny"), help="flux1-dev on CUDA, tiny on CPU by default")
    ap.add_argument("--sizes", help="square image sizes in pixels (default 1024 CUDA, 128 CPU; e.g. 1024,2048)")
    ap.add_argument("--text-len", type=int, help="T5 text tokens (default 512 CUDA, 16 CPU)")
    ap.add_argument("--variants", help="comma list of BACKEND:MODE, MODE in eager|compile|reduce-overhead "
                                       "(default: stock and fastusp eager + reduce-overhead on CUDA, eager + compile "
                                       "on CPU; fastusp_fp8:eager too when ulysses > 1)")
    ap.add_argument("--stock", help="xfuser backend name used as 'stock' (default: xfuser's own choice; with "
                                    "--ring > 1 on CPU pass sdpa_flash, as xfuser refuses SDPA for ring)")
    ap.add_argument("--dtype", help="bfloat16 on CUDA, float32 on CPU by default")
    ap.add_argument("--iters", type=int, help="timed steps per variant (default 10 CUDA, 2 CPU)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 3 CUDA, 1 CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1200.0, help="hard deadline for all ranks, seconds")
    ap.add_argument("--one-gpu", action="store_true",
                    help="all --world ranks on cuda:0 over gloo (numerics only: timings are meaningless)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible: pass --device cpu")
    if args.one_gpu and not cuda:
        ap.error("--one-gpu needs --device cuda")
    if cuda and not args.one_gpu and args.world > torch.cuda.device_count():
        ap.error(f"--world {args.world} exceeds the {torch.cuda.device_count()} visible GPUs")
    if args.world < 1 or args.ring < 1 or args.world % args.ring:
        ap.error(f"--ring {args.ring} must divide --world {args.world}")
    args.ulysses = args.world // args.ring
    args.model = args.model or ("flux1-dev" if cuda else "tiny")
    heads = (FLUX1_DEV if args.model == "flux1-dev" else TINY)["num_attention_heads"]
    if heads % args.ulysses:
        ap.error(f"ulysses degree {args.ulysses} must divide the {heads} heads: change --world or --ring")
    args.sizes = [int(s) for s in (args.sizes or ("1024" if cuda else "128")).split(",")]
    args.text_len = args.text_len or (512 if cuda else 16)
    sp = args.world
    for s in args.sizes:
        if s % PIXELS_PER_TOKEN or (s // PIXELS_PER_TOKEN) % sp:
            ap.error(f"size {s}: needs a multiple of {PIXELS_PER_TOKEN * sp} pixels ({PIXELS_PER_TOKEN} per token, "
                     f"token rows divisible by the {sp} ranks)")
    if args.text_len % sp:
        ap.error(f"--text-len {args.text_len} must be a multiple of {sp} (xfuser shards text with the image only then)")
    if args.variants:
        args.variants = [tuple(v.split(":", 1)) if ":" in v else (v, "") for v in args.variants.split(",")]
    else:
        compiled = "reduce-overhead" if cuda else "compile"
        args.variants = [(b, m) for m in ("eager", compiled) for b in ("stock", "fastusp")]
        if args.ulysses > 1:
            args.variants.append(("fastusp_fp8", "eager"))
    for backend, mode in args.variants:
        if mode not in MODES or not backend:
            ap.error(f"variant {backend}:{mode}: write BACKEND:MODE with MODE one of {', '.join(MODES)}")
        if mode == "reduce-overhead" and not cuda:
            ap.error("reduce-overhead (CUDA graphs) needs --device cuda: use compile on CPU")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.iters = args.iters or (10 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return args


def _print_table(result: dict):
    print(f"{result['device']}, world {result['world']} (ulysses {result['ulysses']} x ring {result['ring']}), "
          f"stock = {result['stock_backend']}, {result['config']['model']} {result['config']['dtype']}")
    print(f"{'size':>5} {'tokens':>6}  {'backend':<12} {'mode':<15} {'attn':<12} {'ms/step':>9} {'1st call s':>10} "
          f"{'max|diff|':>9} {'rel diff':>9} {'fastusp calls':>13}")
    for r in result["rows"]:
        lead = f"{r['size']:>5} {r['tokens']:>6}  {r['backend']:<12} {r['mode']:<15} {str(r['attention_backend']):<12}"
        if "error" in r:
            print(f"{lead} FAILED {r['error']}")
            continue
        diff = (f"{r['max_abs_diff']:>9.2e} {r['rel_diff']:>9.2e}" if "rel_diff" in r else f"{'n/a':>9} {'n/a':>9}")
        calls = "" if r["fastusp_calls"] is None else r["fastusp_calls"]
        flag = "" if r["finite"] else "  NON-FINITE OUTPUT"
        print(f"{lead} {r['ms']:>9.4g} {r['first_call_s']:>10.3g} {diff} {calls:>13}{flag}")
    for o in result["overhead"]:
        goal = f" (goal <= {o['goal_pct']:g}%: {'met' if o['meets_goal'] else 'NOT met'})" if o["goal_pct"] else ""
        print(f"{o['backend']} vs stock, {o['mode']}, {o['size']}px: {o['ms']:.4g} vs {o['stock_ms']:.4g} ms "
              f"= {o['overhead_pct']:+.2f}%{goal}")


def main(argv=None) -> str:
    args = parse_args(argv)
    head = header(args.device)
    head["versions"].update(_versions())
    filename = f"step-{args.device}-w{args.world}{'-one-gpu' if args.one_gpu else ''}.json"
    cfg = {"device": args.device, "world": args.world, "ulysses": args.ulysses, "ring": args.ring,
           "model": args.model, "sizes": args.sizes, "text_len": args.text_len, "variants": args.variants,
           "stock_arg": args.stock, "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup,
           "seed": args.seed, "header": head, "filename": filename, "one_gpu": args.one_gpu}
    start = time.time()
    try:
        stock, rows = run_distributed(worker, args.world, cfg, timeout=args.timeout,
                                      backend="nccl" if args.device == "cuda" and not args.one_gpu else "gloo",
                                      one_gpu=args.one_gpu,
                                      collective_timeout=min(600.0, args.timeout / 2))[0]
    except Exception:
        if os.path.exists(out_path(filename)) and os.path.getmtime(out_path(filename)) >= start:
            print(f"failed; the rows finished before are in {out_path(filename)} (\"complete\": false)")
        raise
    result = _result(cfg, stock, rows, complete=True)
    path = write_json(result, filename)
    _print_table(result)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
