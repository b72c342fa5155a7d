"""``fastusp-xdit`` command line.

``demo`` (the README's main job: FastUSP in xDiT's FLUX pipeline vs stock xfuser; ``--core`` for the
attention-only demo), ``serve`` (xDiT's HTTP service), ``doctor`` (what this machine has), ``xdit`` and
``run`` (fastusp in xDiT's own entry points).
"""
from __future__ import annotations

import argparse
import shlex
import sys


def _xdit(args: list[str]) -> int:
    from ..xdit.runner_cli import main as runner_main

    return runner_main(args)


def _run(args: list[str]) -> int:
    from .run import main as run_main

    run_main(args)
    return 0


def _serve(args: list[str]) -> int:
    from .serve import main as serve_main

    return serve_main(args)


def _doctor(args: list[str]) -> int:
    from .doctor import main as doctor_main

    return doctor_main(args)


# Subcommands whose own parsers take every remaining argument.
_PASSTHROUGH = {"xdit": _xdit, "run": _run, "serve": _serve, "doctor": _doctor}
# --core options (attention-only demo) and pipeline-demo options: each refused in the other mode.
_CORE = ("heads", "seq", "head_dim", "joint", "iters")
_PIPELINE = ("model", "ulysses", "ring", "steps", "height", "width", "prompt", "seed", "guidance", "dtype")


def _demo_parser(sub) -> argparse.ArgumentParser:
    demo = sub.add_parser("demo", help="FastUSP vs stock xfuser in xDiT's FLUX pipeline (tiny random weights "
                                       "on CPU by default); --core: the attention alone vs float64")
    demo.add_argument("--out", default="fastusp_demo", help="output folder (PNG images and demo.json)")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per multi-process run")
    pipe = demo.add_argument_group("pipeline demo (default)")
    pipe.add_argument("--model", help="local FLUX.1 / SD3 diffusers checkpoint (default: tiny random FLUX.1)")
    pipe.add_argument("--ulysses", type=int, help="Ulysses degree (default 2); must divide the model's heads, and "
                                                  "ulysses x ring fit the machine (one process per core or GPU)")
    pipe.add_argument("--ring", type=int, help="ring degree (default 1)")
    pipe.add_argument("--steps", type=int, help="denoising steps (default 4 tiny, 28 --model)")
    pipe.add_argument("--height", type=int, help="pixels (default 64 tiny, 1024 --model, or the nearest size the "
                                                 "model and degrees allow; up to 128 tiny, 2048 --model)")
    pipe.add_argument("--width", type=int, help="pixels (default as --height)")
    pipe.add_argument("--prompt")
    pipe.add_argument("--seed", type=int)
    pipe.add_argument("--guidance", type=float, help="guidance scale (default 3.5)")
    pipe.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                      help="default float32 tiny, bfloat16 --model")
    core = demo.add_argument_group("attention-only demo (--core)")
    core.add_argument("--core", action="store_true", help="FastUSP attention alone on 2 CPU processes vs float64")
    core.add_argument("--heads", type=int, help="default 8")
    core.add_argument("--seq", type=int, help="global sequence length (image tokens), default 2048")
    core.add_argument("--head-dim", type=int, help="default 64")
    core.add_argument("--joint", type=int, help="joint (text) tokens, default 128")
    core.add_argument("--iters", type=int, help="timed calls per configuration, default 5")
    return demo


def _demo(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> int:
    wrong = [n for n in (_PIPELINE if args.core else _CORE) if getattr(args, n) is not None]
    if wrong:
        parser.error(f"{', '.join('--' + n.replace('_', '-') for n in wrong)} "
                     + ("belong to the pipeline demo: drop --core" if args.core else "need --core"))
    for name in ("heads", "seq", "head_dim", "iters", "ulysses", "ring", "steps", "height", "width"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.core:
        from . import demo_core

        core = dict(heads=8, seq=2048, head_dim=64, joint=128, iters=5)
        core.update({k: getattr(args, k) for k in _CORE if getattr(args, k) is not None})
        demo_core.main(**core, out_dir=args.out, timeout=args.timeout)
        return 0
    from . import demo_pipeline

    given = {k: getattr(args, k) for k in _PIPELINE if getattr(args, k) is not None}
    given.setdefault("ulysses", 2 if args.ring is None else 1)
    given.setdefault("ring", 1)
    try:
        demo_pipeline.run(**given, out_dir=args.out, timeout=args.timeout,
                          command=shlex.join(["fastusp-xdit", *argv]))
    except demo_pipeline.ConfigError as e:  # nothing started: one message naming the valid choices
        print(f"fastusp-xdit demo: error: {e}", file=sys.stderr)
        return 2
    except demo_pipeline.DemoFailed as e:
        print(f"fastusp-xdit demo: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="fastusp-xdit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = _demo_parser(sub)
    sub.add_parser("serve", add_help=False, help="xDiT's HTTP service (POST /generate, GET /health) on N "
                                                 "processes it starts; `serve --help` for its options")
    sub.add_parser("doctor", add_help=False, help="versions, GPUs and links, FP8, import hook, what each "
                                                  "backend would do here (--json)")
    sub.add_parser("xdit", add_help=False,
                   help="xfuser's `xdit` runner CLI (same arguments) with fastusp active in every worker")
    sub.add_parser("run", add_help=False, help="run SCRIPT [ARGS...] or -m MODULE [ARGS...] with fastusp active")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo(demo, args, argv)
    return 0
