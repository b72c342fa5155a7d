"""The one import mechanism of fastusp: run code around a module's execution.

xfuser reads backend lists, package flags and ``USP`` at import time (``from ... import USP`` binds the
object, not the name), so a patch must land the moment its module finishes executing, before any
other module copies the value. Three registrations share one meta-path finder at the front of
``sys.meta_path``, which wraps only the loaders of the modules named here:

* :func:`after_import` -- ``fn(module)`` right after the module executes (or now, if it already has);
* :func:`substitute` -- serve a replacement module instead of executing the real file (a file that
  cannot import on this machine);
* :func:`arm_autoload` -- ``fastusp_xdit.xdit.activate()`` right *before* the top-level ``xfuser``
  package first executes. ``fastusp_xdit_autoload.pth`` arms it at every interpreter start (through
  :mod:`fastusp_xdit._autoload`), so torchrun workers and Ray actors get fastusp without any code
  change; ``activate()`` then registers its patches here before any xfuser module has run (on a
  CPU-only machine ``import xfuser`` dies without them), exactly as if it had been called on the line
  above ``import xfuser``. One-shot: it disarms itself when it fires.

Standard library only, and no ``importlib.abc`` (~40 ms): it is imported at every interpreter start.
"""
from __future__ import annotations

import importlib.machinery
import sys
import threading
import types
from typing import Callable

AUTOLOAD_TRIGGER = "xfuser"

_lock = threading.RLock()
_before: dict[str, list[Callable[[], None]]] = {}
_after: dict[str, list[Callable[[types.ModuleType], None]]] = {}
_substitutes: dict[str, Callable[[str], types.ModuleType]] = {}


class _PatchingLoader:
    """Runs the module's before-hooks, executes the real loader (or builds a substitute), then its after-hooks."""

    def __init__(self, inner, name: str):
        self._inner = inner
        self._name = name

    def __getattr__(self, attr):  # get_source, get_resource_reader, ... of the real loader
        return getattr(self._inner, attr)

    def create_module(self, spec):
        if self._name in _substitutes:
            return _substitutes[self._name](self._name)
        return self._inner.create_module(spec) if self._inner is not None else None

    def exec_module(self, module):
        with _lock:
            before = _before.pop(self._name, [])
        for fn in before:
            fn()
        if self._name not in _substitutes:
            self._inner.exec_module(module)
        for fn in _after.get(self._name, ()):
            fn(module)


class _Finder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _after and fullname not in _substitutes and fullname not in _before:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        if spec is None:
            if fullname not in _substitutes:
                return None
            spec = importlib.machinery.ModuleSpec(fullname, None)
        spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec


_FINDER = _Finder()


def _install_finder():
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def after_import(name: str, fn: Callable[[types.ModuleType], None]) -> None:
    """Run ``fn(module)`` once ``name`` has executed: now if it is already imported, else on import."""
    with _lock:
        hooks = _after.setdefault(name, [])
        if fn in hooks:
            return
        hooks.append(fn)
        _install_finder()
        module = sys.modules.get(name)
    if module is not None:
        fn(module)


def substitute(name: str, factory: Callable[[str], types.ModuleType]) -> None:
    """Serve ``factory(name)`` instead of executing the module file (raises if it is already imported)."""
    with _lock:
        if name in sys.modules and not getattr(sys.modules[name], "__fastusp_substitute__", False):
            raise RuntimeError(f"{name} was imported before fastusp_xdit.xdit.activate(); call activate() first")
        _substitutes[name] = factory
        _install_finder()


def _activate() -> None:
    from . import activate

    activate()


def arm_autoload() -> None:
    """Run ``activate()`` right before this process first imports xfuser (idempotent; once xfuser is
    imported, call ``activate()`` directly)."""
    with _lock:
        if AUTOLOAD_TRIGGER in sys.modules or autoload_armed():
            return
        _before.setdefault(AUTOLOAD_TRIGGER, []).append(_activate)
        _install_finder()


def disarm_autoload() -> None:
    """Withdraw :func:`arm_autoload` (no-op if not armed)."""
    with _lock:
        hooks = _before.get(AUTOLOAD_TRIGGER, [])
        if _activate in hooks:
            hooks.remove(_activate)
        if not hooks:
            _before.pop(AUTOLOAD_TRIGGER, None)


def autoload_armed() -> bool:
    """Whether ``activate()`` waits for this process's first ``import xfuser``."""
    return _activate in _before.get(AUTOLOAD_TRIGGER, ())
