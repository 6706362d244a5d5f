"""The monitor's life driven by a trainer's events (shared by the Lightning and HF callbacks).

A trainer callback owns one :class:`TrainerSession` and forwards its events:

* training starts: :meth:`start` watches the model (``HEALTHMON*`` apply, as in ``watch``)
  and makes the trainer's global step the step number (``Monitor.set_step``);
* every training batch starts, and every optimizer step ends: :meth:`at_step` with the
  trainer's global step. A new number ends the current step (its records are decoded and
  the policy applied; on CPU right there, on accelerators one step later) and starts the
  new one; the same number is a no-op, so gradient-accumulation micro-batches share one
  step and evaluation / validation batches (run between those calls) never start one;
* training ends: :meth:`finish` checks the last step (``mon.check()``, which reports the
  trainer's last step under its own number) and removes every hook;
* an exception: :meth:`abort` removes every hook without raising or communicating.

A :class:`~healthmon.HealthError` raised by :meth:`at_step` or :meth:`finish` removes the
hooks first and then propagates, so the trainer's own exception path (Lightning's
``on_exception``, HF's ``train()`` raising) sees it.
"""
from __future__ import annotations

from typing import Dict, Optional

from torch import nn

from ..config import resolve
from ..monitor import Monitor, watch
from .metrics import health_metrics

_WATCH_OPTIONS = ("every", "sync", "on_anomaly", "log", "allow_inf", "sinks", "prefix")


class TrainerSession:
    """One monitor per training run, numbered by the trainer's global step.

    Args:
        watch_options: keyword arguments of :func:`healthmon.watch` (``every``, ``sync``,
            ``on_anomaly``, ``log``, ``allow_inf``, ``sinks``, ``prefix``).
        max_modules: most modules given their own logged metrics (see
            :func:`~healthmon.integrations.metrics.health_metrics`).
    Raises:
        TypeError: an unknown option.
        ValueError: an invalid option or ``HEALTHMON*`` value (here, not at train start).
    """

    def __init__(self, watch_options: Dict, max_modules: int = 32):
        unknown = sorted(set(watch_options) - set(_WATCH_OPTIONS))
        if unknown:
            raise TypeError(f"healthmon: unknown option(s) {', '.join(unknown)} for "
                            f"HealthmonCallback; accepted: {', '.join(_WATCH_OPTIONS)}")
        if not isinstance(max_modules, int) or max_modules < 0:
            raise ValueError(f"healthmon: max_modules must be an int >= 0, got {max_modules!r}")
        resolve(every=watch_options.get("every"), sync=watch_options.get("sync"),
                on_anomaly=watch_options.get("on_anomaly"), log=watch_options.get("log"))
        self.watch_options = dict(watch_options)
        self.max_modules = max_modules
        self.monitor: Optional[Monitor] = None
        self._logged_step: Optional[int] = None

    def start(self, model: nn.Module, global_step: int) -> Monitor:
        """Watch ``model`` from ``global_step`` on (a stale monitor of an earlier run that
        ended by an exception is removed first)."""
        self.abort()
        self.monitor = watch(model, **self.watch_options)
        self.monitor.remove_on_raise = True  # raised from inside the trainer's loop too
        self._logged_step = None
        self.at_step(global_step)
        return self.monitor

    def active_monitor(self) -> Optional[Monitor]:
        """The monitor while it watches (None before training and once it is removed, e.g.
        by the HealthError it raised)."""
        mon = self.monitor
        return mon if mon is not None and mon.active else None

    def at_step(self, global_step: int) -> None:
        """The trainer's global step is ``global_step`` (idempotent within a step)."""
        mon = self.monitor
        if mon is None:
            return
        try:
            mon.set_step(int(global_step))
        except BaseException:
            self.abort()
            raise

    def finish(self) -> None:
        """Check the last step (may raise HealthError) and remove the monitor."""
        mon = self.monitor
        if mon is None:
            return
        try:
            mon.check()
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove the monitor's hooks; never raises a HealthError, never communicates."""
        mon, self.monitor = self.monitor, None
        if mon is not None:
            mon.remove()

    def new_metrics(self) -> Optional[tuple]:
        """``(step, metrics)`` of the last decoded step if not returned before, else None.

        Reads host rows decoded at a step boundary: no device access, no host sync.
        """
        mon = self.monitor
        if mon is None or not mon.active:
            return None
        step = mon.last_step
        if step is None or step == self._logged_step:
            return None
        self._logged_step = step
        return step, health_metrics(mon.records(), len(mon.anomalies), self.max_modules)
