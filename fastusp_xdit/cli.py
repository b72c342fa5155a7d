"""``fastusp-xdit`` command line: ``demo`` (the README's main job), ``xdit`` and ``run`` (fastusp in xDiT)."""
from __future__ import annotations

import argparse
import sys


def _xdit(args: list[str]) -> int:
    from .xdit.runner_cli import main as runner_main

    return runner_main(args)


def _run(args: list[str]) -> int:
    from .run import main as run_main

    run_main(args)
    return 0


# Subcommands whose own parsers take every remaining argument.
_PASSTHROUGH = {"xdit": _xdit, "run": _run}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="fastusp-xdit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("xdit", add_help=False,
                   help="xfuser's `xdit` runner CLI (same arguments) with fastusp active in every worker")
    sub.add_parser("run", add_help=False, help="run SCRIPT [ARGS...] or -m MODULE [ARGS...] with fastusp active")
    demo = sub.add_parser("demo", help="FastUSP attention on 2 CPU processes vs a float64 reference")
    demo.add_argument("--heads", type=int, default=8)
    demo.add_argument("--seq", type=int, default=2048, help="global sequence length (image tokens)")
    demo.add_argument("--head-dim", type=int, default=64)
    demo.add_argument("--joint", type=int, default=128, help="joint (text) tokens")
    demo.add_argument("--iters", type=int, default=5, help="timed calls per configuration")
    demo.add_argument("--out", default="fastusp_demo", help="output folder for demo.json / demo.png")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo as demo_mod

        for name in ("heads", "seq", "head_dim", "iters"):
            if getattr(args, name) <= 0:
                parser.error(f"--{name.replace('_', '-')} must be positive")
        demo_mod.main(args.heads, args.seq, args.head_dim, args.joint, args.iters, args.out)
    return 0
