"""``healthmon run``: trainers built by an unmodified script get the healthmon callback.

:class:`TrainerPatch` wraps the entry points of the Lightning and Hugging Face trainers
(``fit`` / ``validate`` / ``test`` / ``predict``; ``train`` / ``evaluate`` / ``predict``)
while it is started, without importing either library: a class already imported is patched
at :meth:`TrainerPatch.start`, one imported later is patched right after its module runs
(a ``sys.meta_path`` finder that wraps that one module's loader). :meth:`TrainerPatch.stop`
restores the original methods and removes the finder.

Inside a wrapped call the runner's global hooks stand aside (the ``suspend`` / ``resume``
callables: trainer passes are watched by the callback, or not at all for validate / test /
predict, which are not training), and ``fit`` / ``train`` add a ``HealthmonCallback`` with
the runner's options unless the trainer already has one, and take it out again at the end
(HF: also removing its hooks if ``train()`` raised, since HF has no exception event).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from typing import Callable, Dict, List, Tuple

# module that defines the Trainer -> (kind, training method, other wrapped methods)
TARGETS: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "lightning.pytorch.trainer.trainer": ("lightning", "fit", ("validate", "test", "predict")),
    "pytorch_lightning.trainer.trainer": ("lightning", "fit", ("validate", "test", "predict")),
    "transformers.trainer": ("hf", "train", ("evaluate", "predict")),
}


class TrainerPatch:
    """Adds the healthmon callback to every Lightning / HF trainer run while started.

    Args:
        watch_options: :func:`healthmon.watch` options for the callbacks.
        suspend, resume: called around every wrapped trainer method (nesting allowed).
    """

    def __init__(self, watch_options: dict, suspend: Callable[[], None],
                 resume: Callable[[], None]):
        self.watch_options = dict(watch_options)
        self._suspend, self._resume = suspend, resume
        self._saved: List[Tuple[type, str, object]] = []  # (class, name, original attribute)
        self._patched: set = set()
        self._finder = None

    def start(self) -> "TrainerPatch":
        """Patch trainer classes imported already; patch the others on import."""
        if self._finder is None:
            self._finder = _PatchOnImport(set(TARGETS), self._patch_module)
            sys.meta_path.insert(0, self._finder)
            for name in TARGETS:
                module = sys.modules.get(name)
                if module is not None:
                    self._patch_module(name, module)
        return self

    def stop(self) -> None:
        """Restore every patched method and stop watching imports. Idempotent."""
        if self._finder is not None and self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        self._finder = None
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()
        self._patched.clear()

    def _patch_module(self, name: str, module) -> None:
        cls = getattr(module, "Trainer", None)
        if cls is None or name in self._patched:
            return
        self._patched.add(name)
        kind, train, others = TARGETS[name]
        self._wrap(cls, train, self._training(kind, name))
        for other in others:
            self._wrap(cls, other, self._standing_aside)

    def _wrap(self, cls: type, name: str, make: Callable) -> None:
        original = cls.__dict__.get(name)
        if original is None:
            return
        self._saved.append((cls, name, original))
        setattr(cls, name, make(original))

    def _standing_aside(self, method):
        patch = self

        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            patch._suspend()
            try:
                return method(*args, **kwargs)
            finally:
                patch._resume()
        return wrapper

    def _training(self, kind: str, module_name: str):
        patch = self

        def make(method):
            @functools.wraps(method)
            def wrapper(trainer, *args, **kwargs):
                patch._suspend()
                try:
                    added = patch._add_callback(kind, module_name, trainer)
                    try:
                        return method(trainer, *args, **kwargs)
                    finally:
                        if added is not None:
                            patch._remove_callback(kind, trainer, added)
                finally:
                    patch._resume()
            return wrapper
        return make

    def _add_callback(self, kind: str, module_name: str, trainer):
        if kind == "lightning":
            from .lightning import callback_class
            pl = importlib.import_module(module_name.split(".trainer.")[0])
            cls = callback_class(pl)
            if any(isinstance(cb, cls) for cb in trainer.callbacks):
                return None
            cb = cls(**self.watch_options)
            trainer.callbacks.append(cb)
            return cb
        from .hf import HealthmonCallback
        handler = trainer.callback_handler
        if any(isinstance(cb, HealthmonCallback) for cb in handler.callbacks):
            return None
        cb = HealthmonCallback(**self.watch_options)
        handler.callbacks.insert(0, cb)  # first: its metrics reach the report_to loggers
        return cb

    @staticmethod
    def _remove_callback(kind: str, trainer, cb) -> None:
        if kind == "lightning":
            if cb in trainer.callbacks:
                trainer.callbacks.remove(cb)
            return
        cb.remove()  # after an exception from other code: HF has no exception event
        trainer.remove_callback(cb)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Runs ``on_loaded(name, module)`` right after one of ``names`` is imported."""

    def __init__(self, names: set, on_loaded: Callable):
        self._names, self._on_loaded = names, on_loaded
        self._busy: set = set()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self._names or fullname in self._busy:
            return None
        self._busy.add(fullname)  # find the real spec with the other finders
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader, fullname, self._on_loaded)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, name: str, on_loaded: Callable):
        self._loader, self._name, self._on_loaded = loader, name, on_loaded

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._on_loaded(self._name, module)

    def __getattr__(self, name):  # get_source, get_filename, ...: the real loader's
        return getattr(self._loader, name)
