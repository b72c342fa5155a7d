"""Run :func:`fastusp_xdit.xdit.activate` in place of a process's first ``import xfuser``.

Installed at interpreter start by ``fastusp_xdit_autoload.pth`` (through :mod:`fastusp_xdit._autoload`),
so torchrun workers and Ray actors -- fresh interpreters that never run the launcher's imports -- get
fastusp without any code change. Installing imports only the standard library.

Trigger: the *start* of the top-level ``xfuser`` package's execution. Every ``import xfuser.<anything>``,
``python -m xfuser.runner`` and xDiT's example scripts pass through it before any xfuser module runs.
A trigger at the end of ``xfuser.model_executor.layers.usp`` would be too late:

* ``activate()`` must precede xfuser's first module on a CPU-only machine, where ``import xfuser``
  dies (``triton`` import in ``sparge_attention/block_mask.py``, ``CUDA_VERSION`` lookup) long before
  ``usp`` runs, and its ``has_long_ctx_attn`` fix must land before other modules copy the flag;
* ``usp`` executes in the middle of xfuser's package import, while the modules that imported it are
  half-initialised.

Firing first makes the hook path identical to calling ``activate()`` on the line above
``import xfuser``: one code path. The finder is one-shot: it removes itself, lets ``activate()`` run
(which may import xfuser itself or, as now, install post-import patches), then imports xfuser
normally; the import statement that fired it receives that fully imported package.
"""
from __future__ import annotations

import importlib
import sys

TRIGGER = "xfuser"


class _ActivateThenImport:
    """Loader for the first ``xfuser`` import: discards the empty module, activates, imports for real.

    The import system returns whatever ``sys.modules[TRIGGER]`` holds once ``exec_module`` returns,
    so the caller gets the package imported here.
    """

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        uninstall()
        sys.modules.pop(module.__name__, None)
        from fastusp_xdit.xdit import activate

        activate()
        importlib.import_module(module.__name__)


class XfuserImportTrigger:
    """Meta-path finder that gives the ``xfuser`` package's real spec an activating loader.

    (Plain classes, not ``importlib.abc`` subclasses: that module costs ~40 ms at every interpreter start.)
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                spec.loader = _ActivateThenImport()
                return spec
        return None


def install() -> None:
    """Arrange for ``activate()`` to run right before this process first imports xfuser (idempotent).

    Call it before ``import xfuser``; once xfuser is imported, call ``activate()`` directly.
    """
    if not installed():
        sys.meta_path.insert(0, XfuserImportTrigger())


def uninstall() -> None:
    """Remove the trigger from ``sys.meta_path`` (no-op if absent)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, XfuserImportTrigger)]


def installed() -> bool:
    """Whether the trigger is waiting for xfuser's first import in this process."""
    return any(isinstance(f, XfuserImportTrigger) for f in sys.meta_path)
