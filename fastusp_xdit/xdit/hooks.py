"""Post-import hooks: run a function on a module right after it executes, or now if it already has.

xfuser reads backend lists, package flags and ``USP`` at import time (``from ... import USP`` binds the
object, not the name), so a patch must land the moment its module finishes executing, before any
other module copies the value. :func:`after_import` registers such a patch; :func:`substitute`
serves a replacement module instead of executing the real file (for a file that cannot import on
this machine). One :class:`importlib.abc.MetaPathFinder` at the front of ``sys.meta_path`` serves
both; it only wraps the loaders of the modules named here.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Callable

_lock = threading.RLock()
_after: dict[str, list[Callable[[types.ModuleType], None]]] = {}
_substitutes: dict[str, Callable[[str], types.ModuleType]] = {}


class _PatchingLoader(importlib.abc.Loader):
    """Executes the real loader (or builds a substitute), then runs the module's hooks."""

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
        if self._name not in _substitutes:
            self._inner.exec_module(module)
        for fn in _after.get(self._name, ()):
            fn(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _after and fullname not in _substitutes:
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
