"""Run a callback once a module is imported, without importing it: now if it is loaded, else right after it loads.

The runtime registers with torch's compiler (dynamo) this way: importing dynamo costs a second, and only a process
that compiles needs it. A finder first in `sys.meta_path` waits for the module's name; it lets the import system's
own finders find the module, and runs the callbacks once the module's code has run, before the import returns.
"""

from __future__ import annotations

import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Callable, Sequence

__all__ = ["when_imported"]

_waiting: dict[str, list[Callable[[ModuleType], None]]] = {}


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call `callback(module)` once module `name` is imported: now if it is, else just after its code runs.

    A callback that fails is reported as a RuntimeWarning (it never fails the import it follows).
    """
    module = sys.modules.get(name)
    if module is not None:
        _call(callback, module)
        return
    _waiting.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _call(callback: Callable[[ModuleType], None], module: ModuleType) -> None:
    try:
        callback(module)
    except Exception as exc:  # noqa: BLE001 - someone else's import must not fail for it
        warnings.warn(f"attn-tune: {getattr(callback, '__qualname__', callback)} after importing {module.__name__} "
                      f"failed: {exc!r}", RuntimeWarning, stacklevel=2)


class _Finder:
    """Finds nothing itself: for a waited-for name it asks the other finders, then wraps the loader they give."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _waiting:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


class _Loader:
    """The module's own loader, then the callbacks waiting for it; the module keeps its own loader."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        callbacks = _waiting.pop(module.__name__, [])
        if not _waiting and _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        for callback in callbacks:
            _call(callback, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


_FINDER = _Finder()
