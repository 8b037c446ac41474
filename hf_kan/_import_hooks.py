"""Run a function once some module has been imported, without importing that module ourselves.

``import hf_kan`` must register hf-kan's additions with Transformers (Auto classes, attention implementation) and
PEFT (the MoH method), but importing those libraries costs seconds, and many uses of hf-kan (the CLI's ``--help``,
``import hf_kan.ops.rational``) need neither. So each registration is tied to the registry it goes into:
:func:`when_imported` runs a callback as soon as one of its trigger modules is in ``sys.modules``: immediately if
it already is, otherwise right after the import that brings it in.

"Right after" means once no watched import is still in progress, not inside the trigger's own import: when
``transformers.models.auto.configuration_auto`` finishes loading, the module importing it (``modeling_utils``,
``image_processing_utils``, ...) may still be half-initialised, and a callback importing hf-kan's modeling code would
then fail. So the finder below wraps the loader of every *watched* module (the triggers, plus the packages given as
``wait_for``, e.g. all of ``transformers``), counts watched imports in progress per thread, and runs the pending
callbacks when that count drops to zero, i.e. when the outermost watched import returns. Every other import passes
by after a few string comparisons. The wrapper only adds a frame to tracebacks raised *during* an import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)

_local = threading.local()  # per thread: .depth (watched imports in progress), .running, .finding
_lock = threading.Lock()
_pending: list[tuple[frozenset[str], Callable[[], None]]] = []
_watched_names: set[str] = set()
_watched_prefixes: set[str] = set()  # names ending in "."


def _depth() -> int:
    return getattr(_local, "depth", 0)


def _watched(name: str) -> bool:
    if name in _watched_names:
        return True
    return any(name.startswith(prefix) or name == prefix[:-1] for prefix in _watched_prefixes)


class _CountingLoader(importlib.abc.Loader):
    """Delegates to the real loader; counts the import as in progress while the module body runs."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def __getattr__(self, name: str):  # get_source, get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _local.depth = _depth() + 1
        try:
            self._loader.exec_module(module)
        finally:
            _local.depth -= 1
            # from here on the module looks as if it had been loaded without us
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
        if _local.depth == 0:
            run_pending()


class _ImportWatcher(importlib.abc.MetaPathFinder):
    """First finder on ``sys.meta_path``: finds watched modules with the finders after it and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if not _watched(fullname) or getattr(_local, "finding", False):
            return None
        _local.finding = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            _local.finding = False
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CountingLoader(spec.loader)
        return spec


def _install() -> None:
    if not any(isinstance(finder, _ImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportWatcher())


def when_imported(triggers: str | Iterable[str], callback: Callable[[], None], wait_for: Iterable[str] = ()) -> None:
    """Run ``callback()`` once, as soon as any module named in ``triggers`` has been imported.

    ``wait_for``: further module names, or packages written ``"name."`` (the package and all its submodules),
    whose imports the callback must not interrupt. The callback runs when a trigger is in ``sys.modules`` and no
    import of a trigger or ``wait_for`` module is in progress in this thread: now, or when the outermost such import
    finishes. A callback that raises is logged as a warning; it must not break the user's import of the library
    being registered with.
    """
    names = frozenset([triggers] if isinstance(triggers, str) else triggers)
    with _lock:
        for name in (*names, *wait_for):
            (_watched_prefixes if name.endswith(".") else _watched_names).add(name)
        _pending.append((names, callback))
    _install()
    if _depth() == 0:
        run_pending()


def run_pending() -> None:
    """Run (and forget) every pending callback one of whose triggers is in ``sys.modules``."""
    if getattr(_local, "running", False):
        return  # the imports of a running callback finished; the outer call carries on
    _local.running = True
    try:
        while True:
            with _lock:
                ready = next((item for item in _pending if not item[0].isdisjoint(sys.modules)), None)
                if ready is None:
                    return
                _pending.remove(ready)
            try:
                ready[1]()
            except Exception:  # noqa: BLE001 - reported, never raised into someone else's import
                name = getattr(ready[1], "__qualname__", repr(ready[1]))
                logger.warning("hf_kan: registration %s failed", name, exc_info=True)
    finally:
        _local.running = False


__all__ = ["run_pending", "when_imported"]
