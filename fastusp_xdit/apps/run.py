"""Run a Python script or module with fastusp active: ``python -m fastusp_xdit.apps.run SCRIPT [ARGS...]``.

``python -m fastusp_xdit.apps.run -m MODULE [ARGS...]`` runs a module instead (``-m xfuser.runner`` is what
``fastusp-xdit-runner`` starts in each worker). The target runs as ``__main__`` with ``sys.argv`` as if
Python had started it directly (a script's folder goes first on ``sys.path``), so any xDiT example or
user script accepts ``--attention_backend fastusp`` unchanged. Works as a torchrun target, where each worker is a
fresh interpreter::

    torchrun --nproc_per_node=2 -m fastusp_xdit.apps.run examples/flux_example.py --model PATH \\
        --attention_backend fastusp --ulysses_degree 2

Needs no ``.pth`` file and ignores ``FASTUSP_XDIT_AUTOLOAD`` (asking for it is explicit).
"""
from __future__ import annotations

import os
import runpy
import sys

USAGE = "usage: python -m fastusp_xdit.apps.run SCRIPT [ARGS...]\n       python -m fastusp_xdit.apps.run -m MODULE [ARGS...]"


def main(argv: list[str] | None = None) -> None:
    """Activate fastusp in this process, then run the script or module named by ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\nRuns an xDiT script or module as Python would, with fastusp active (it then accepts "
              "fastusp's --attention_backend names); also a torchrun target:\n"
              "  torchrun --nproc_per_node=2 -m fastusp_xdit.apps.run SCRIPT ARGS")
        raise SystemExit(0)
    if not argv or argv == ["-m"]:
        raise SystemExit(USAGE)
    if argv[0] != "-m" and not os.path.isfile(argv[0]):
        raise SystemExit(f"fastusp_xdit.apps.run: can't open file {argv[0]!r}\n{USAGE}")

    from fastusp_xdit.xdit import activate

    activate()
    if argv[0] == "-m":
        sys.argv = argv[1:]  # run_module puts the module's file in sys.argv[0]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
