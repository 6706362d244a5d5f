"""Zero-code-change monitoring: ``python -m healthmon run SCRIPT.py [args]`` and
:func:`watch_all`.

PyTorch's global module hooks see every ``nn.Module`` call. :class:`AutoWatch` keeps a call
depth with them. The first module called at depth 0 (an outermost call: usually the model)
gets a full :func:`healthmon.watch` monitor, so inputs, outputs, gradients, parameter
gradients, parameters and labels are covered and its calls are the step boundaries. Later
outermost modules (a loss module, a second model) join the same monitor with
:meth:`Monitor.add` at their second outermost call, so one execution order decides which
anomaly came first; a module built anew at every step never joins (the monitor holds what
it watches), and at most :data:`MAX_ROOTS` join. Their sites are prefixed with their class
name (``CrossEntropyLoss``). A module first called *inside* another one, during backward
(checkpoint recomputation) or while ``torch.compile`` traces is never a root. When the
script calls ``healthmon.watch`` itself, its monitor takes over those modules. The
``HEALTHMON*`` environment applies; ``HEALTHMON=off`` installs nothing at all.

Lightning and Hugging Face trainers get the healthmon trainer callback instead (their global
step is the step) and these hooks stand aside inside their calls: see
:mod:`healthmon.integrations.autopatch`.
"""
from __future__ import annotations

import os
import runpy
import sys
import weakref
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from .config import resolve
from .errors import HealthError
from .monitor import _WATCHED, Monitor, _in_backward, watch

MAX_ROOTS = 64  # outermost modules joined to the monitor, besides the first


class RunSetupError(Exception):
    """``healthmon run`` could not start the script (missing file, invalid option)."""


class AutoWatch:
    """Watch every outermost ``nn.Module`` called while active (a context manager).

    Args:
        **watch_kwargs: passed to :func:`healthmon.watch` (``sync``, ``every``,
            ``on_anomaly``, ``log``, ``allow_inf``, ``sinks``).
    Attributes:
        monitor: the monitor of the current roots (None before the first module call).
        monitors: every monitor created (a new one only after the previous was removed).
    """

    def __init__(self, **watch_kwargs):
        self._kwargs = watch_kwargs
        self.config = resolve(every=watch_kwargs.get("every"), sync=watch_kwargs.get("sync"),
                              on_anomaly=watch_kwargs.get("on_anomaly"),
                              log=watch_kwargs.get("log"),
                              allow_inf=watch_kwargs.get("allow_inf"))  # bad values fail early
        self.monitors: List[Monitor] = []
        self.monitor: Optional[Monitor] = None
        self._refused: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self._candidates: "weakref.WeakKeyDictionary[nn.Module, int]" = \
            weakref.WeakKeyDictionary()
        self._added = 0
        self._depth = 0
        self._handles: list = []
        self._suspended = 0  # inside a Lightning / HF trainer call: its callback watches
        self._trainers = None  # integrations.autopatch.TrainerPatch while started

    @property
    def enabled(self) -> bool:
        """False under ``HEALTHMON=off``: no hooks are installed."""
        return self.config.enabled

    def start(self) -> "AutoWatch":
        """Install the global module hooks (nothing under ``HEALTHMON=off``)."""
        if self.config.enabled and not self._handles:
            self._handles = [
                _module.register_module_forward_pre_hook(self._pre_hook),
                _module.register_module_forward_hook(self._post_hook, always_call=True),
            ]
            from .integrations.autopatch import TrainerPatch  # imports no trainer library
            self._trainers = TrainerPatch(self._kwargs, self._suspend, self._resume).start()
            self._patch_compile()
        return self

    def _patch_compile(self) -> None:
        """``model.compile()`` compiles the module's whole call, global hooks included, so
        the first call is never seen here: watch the module when ``compile()`` is called
        (before its compiled code first runs). ``torch.compile(model)`` needs nothing: the
        wrapper's own call runs eagerly and is watched like any outermost module."""
        original = nn.Module.compile
        auto = self

        def compile(module, *args, **kwargs):
            auto._watch_for_compile(module)
            return original(module, *args, **kwargs)

        compile.__wrapped__ = original
        compile.__doc__ = original.__doc__
        nn.Module.compile = compile
        self._compile_original = original

    def _watch_for_compile(self, module: nn.Module) -> None:
        if self._suspended or module in _WATCHED or module in self._refused:
            return
        try:
            if self.monitor is None or not self.monitor.active:
                self.monitor = watch(module, **self._kwargs)
                self.monitor.auto = True
                self.monitors.append(self.monitor)
            elif self._added < MAX_ROOTS:
                self.monitor.add(module)
                self._added += 1
        except Exception:  # never break the user's script
            self._refused.add(module)

    def _suspend(self) -> None:
        self._suspended += 1

    def _resume(self) -> None:
        self._suspended -= 1

    def _pre_hook(self, module: nn.Module, args) -> None:
        depth = self._depth
        self._depth = depth + 1
        if depth or self._suspended or module in _WATCHED or module in self._refused:
            return None
        try:
            if torch.compiler.is_compiling() or _in_backward():
                return None  # compile tracing; checkpoint recomputation in backward
            if self.monitor is None or not self.monitor.active:
                self.monitor = watch(module, **self._kwargs)
                self.monitor.auto = True
                self.monitors.append(self.monitor)
                # this call's pre-hooks were collected before the monitor existed: record
                # its inputs and open its step as the root pre-hook would have
                self.monitor._on_root_forward(module, args, None)
                return None
            # later roots join at their second outermost call (a loss module built anew
            # each step never joins), up to MAX_ROOTS: the monitor holds what it watches
            calls = self._candidates.get(module, 0) + 1
            self._candidates[module] = calls
            if calls >= 2 and self._added < MAX_ROOTS:
                self.monitor.add(module)  # one monitor: one step sequence, one order
                self._added += 1
                del self._candidates[module]
        except Exception:  # never break the user's training step
            # e.g. a wrapper around a model the script watches itself: that part stays
            # watched by the script's own monitor
            self._refused.add(module)
        return None

    def _post_hook(self, module: nn.Module, args, output) -> None:
        self._depth = max(self._depth - 1, 0)
        return None

    def check(self) -> None:
        """``check()`` every monitor (raises the first :class:`HealthError`)."""
        for mon in self.monitors:
            mon.check()

    def stop(self) -> None:
        """Remove the global hooks and every monitor (records decoded, not raised)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._trainers is not None:
            self._trainers.stop()
            self._trainers = None
        original = getattr(self, "_compile_original", None)
        if original is not None:
            nn.Module.compile = original
            self._compile_original = None
        for mon in self.monitors:
            mon.remove()

    def __enter__(self) -> "AutoWatch":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.check()
        finally:
            self.stop()


def watch_all(**watch_kwargs) -> AutoWatch:
    """Monitor every ``nn.Module`` called inside ``with healthmon.watch_all():`` (notebooks,
    scripts you do not want to edit further). See :class:`AutoWatch`."""
    return AutoWatch(**watch_kwargs)


def run_script(path: str, args: Sequence[str], quiet: bool = False, **watch_kwargs) -> int:
    """Run ``path`` as ``__main__`` with ``sys.argv = [path, *args]`` under :class:`AutoWatch`.

    Returns:
        the process exit code: the script's own, or 1 after printing a
        :class:`HealthError` report to stderr (no traceback through runpy).
    Raises:
        RunSetupError: ``path`` does not exist, or an invalid option / ``HEALTHMON*`` value
            (before the script starts).
        Exception: whatever the script raises, other than HealthError / SystemExit.
    """
    if not os.path.isfile(path):
        raise RunSetupError(f"no such script: {path!r}")
    try:
        auto = AutoWatch(**watch_kwargs)
    except (ValueError, TypeError) as err:  # a bad HEALTHMON* value or option
        raise RunSetupError(str(err)) from None
    if not quiet:
        mode = "off (HEALTHMON=off): no hooks" if not auto.enabled else (
            "sync" if auto.config.sync else "async")
        print(f"healthmon: monitoring every nn.Module ({mode}); HEALTHMON=off to disable",
              file=sys.stderr)
    saved_argv, script_dir = sys.argv, os.path.dirname(os.path.abspath(path))
    sys.argv = [path, *args]
    sys.path.insert(0, script_dir)  # as `python SCRIPT.py` would
    code = 0
    try:
        with auto:
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as exit_:
                code = _exit_code(exit_.code)
    except HealthError as err:
        print(str(err), file=sys.stderr)
        return 1
    finally:
        sys.argv = saved_argv
        if sys.path and sys.path[0] == script_dir:
            del sys.path[0]
    return code


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
