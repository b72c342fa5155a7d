"""``fastusp-xdit-runner``: xfuser's ``xdit`` CLI with fastusp active in every worker.

Takes exactly ``xdit``'s arguments, e.g.
``fastusp-xdit-runner --model black-forest-labs/FLUX.1-dev --ulysses_degree 2 --attention_backend fastusp
--prompt "..."``. Like ``xdit`` (``xfuser/cli.py`` in xfuser 0.7.0) it takes out torchrun's options
(``--nproc_per_node``, ``--nnodes``, ``--node_rank``, ``--master_addr``, ``--master_port``), infers the
process count from the parallel degrees when ``--nproc_per_node`` is absent, and runs torchrun; each
worker runs ``python -m fastusp_xdit.apps.run -m xfuser.runner ARGS``, i.e. ``activate()`` and then xfuser's
runner main. Option handling and the process-count rule are xfuser's own functions, so both CLIs
agree. torchrun runs in this process (as the ``torchrun`` command does), so signals reach its agent,
which stops the workers.
"""
from __future__ import annotations

import sys

WORKER = ["-m", "fastusp_xdit.apps.run", "-m", "xfuser.runner"]


def torchrun_argv(args: list[str]) -> list[str]:
    """torchrun's argument list for ``xdit ARGS`` run through fastusp."""
    from fastusp_xdit.xdit import activate

    activate()  # xfuser.cli sits in the xfuser package, which imports on CPU-only machines only when active
    from xfuser.cli import extract_torchrun_args, get_nproc_from_args

    options, runner_args = extract_torchrun_args(list(args))
    if options["--nproc_per_node"] is None:
        options["--nproc_per_node"] = str(get_nproc_from_args(runner_args))
    return [f"{name}={value}" for name, value in options.items()] + WORKER + runner_args


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: ``fastusp-xdit-runner [torchrun options] [xdit runner arguments]``."""
    args = torchrun_argv(sys.argv[1:] if argv is None else argv)
    from torch.distributed.run import main as torchrun

    torchrun(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
