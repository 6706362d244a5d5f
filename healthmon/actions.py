"""What a monitor does with an anomaly: keep it, hand it to the sinks, apply the policy.

:class:`Reporter` holds a monitor's anomaly history (bounded) and applies ``on_anomaly``
(``raise`` / ``warn`` / ``log`` / ``skip``); :class:`UpdateSkipper` is ``skip``'s other half,
dropping an optimizer's gradients so its update leaves the weights untouched. Both are given
what they need (the sinks list, the policy, a callback to run before raising); neither
knows the monitor. Distributed agreement (:mod:`healthmon.distributed`) keeps the agreed
anomaly through the same history.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, List, Optional

from .errors import Anomaly, HealthError
from .sinks import call_sinks

_log = logging.getLogger("healthmon")
MAX_ANOMALIES = 1000  # history kept per monitor; later ones are counted in ``dropped``


class Reporter:
    """A monitor's anomalies and its policy.

    ``sinks``: the monitor's list of sinks (shared: sinks added later are seen);
    ``before_raise``: called before a ``HealthError`` leaves (the trainer callbacks release
    the monitor there). ``anomalies`` is the monitor's public list, oldest first.
    """

    def __init__(self, on_anomaly: str, sinks: list, before_raise: Callable[[], None]):
        self.on_anomaly = on_anomaly
        self.sinks = sinks
        self.before_raise = before_raise
        self.anomalies: List[Anomaly] = []
        self.dropped = 0  # anomalies not kept (history full)
        self._last: Optional[Anomaly] = None  # the last reported (one per step and rank)

    def keep(self, anomaly: Anomaly) -> None:
        """Add to the history (bounded by ``MAX_ANOMALIES``)."""
        if len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append(anomaly)
        else:
            self.dropped += 1

    def report(self, anomaly: Anomaly, apply_policy: bool) -> None:
        """Keep ``anomaly``, write it to the sinks and, with ``apply_policy``, act on it
        (raise ``HealthError`` / warn / log). A later anomaly of a step already reported
        (several forwards or evaluation batches in one step) becomes a consequence of the
        first: one anomaly per step."""
        last = self._last
        if last is not None and last.step == anomaly.step and last.rank == anomaly.rank:
            last.consequences.append(anomaly)
            last.consequences.extend(anomaly.consequences)
            anomaly.consequences = []
            return
        self._last = anomaly
        self.keep(anomaly)
        call_sinks(self.sinks, "write_anomaly", anomaly)
        if apply_policy:
            self.act(anomaly)

    def act(self, anomaly: Anomaly) -> None:
        mode = self.on_anomaly
        if mode == "raise":
            self.before_raise()
            raise HealthError(anomaly)
        if mode == "warn":
            warnings.warn(anomaly.report(), RuntimeWarning, stacklevel=3)
        elif mode == "skip":
            warnings.warn(anomaly.report() + "\n  on_anomaly=skip: this step's update is "
                          "skipped (the weights and the optimizer state stay as they were)",
                          RuntimeWarning, stacklevel=3)
        else:
            _log.error("%s", anomaly.report())


class UpdateSkipper:
    """``on_anomaly="skip"``: a step with an anomaly gets no optimizer update.

    :meth:`skip` drops every gradient of the optimizer's parameters (``grad = None``), so
    ``step()`` leaves the weights and the optimizer's state (moments, step counts) untouched:
    every ``torch.optim`` optimizer, foreach and fused included, skips parameters without a
    gradient. After ``max_skips`` consecutive skipped steps it raises instead.
    ``steps`` (the monitor's ``skipped_steps``): the step numbers whose update was dropped.
    """

    def __init__(self, max_skips: int):
        self.max_skips = max_skips
        self.consecutive = 0
        self.steps: List[int] = []

    def healthy(self) -> None:
        self.consecutive = 0

    def skip(self, optimizer, step: int, anomaly: Anomaly, everywhere: bool = False) -> None:
        """Drop ``optimizer``'s update of ``step``; ``anomaly``: the reason (the error's
        anomaly when the skips run out); ``everywhere``: every rank skips it (distributed).

        Raises:
            HealthError: more than ``max_skips`` consecutive steps skipped.
        """
        self.consecutive += 1
        if self.consecutive > self.max_skips:
            limit = (f"healthmon: {self.consecutive} consecutive steps skipped"
                     f"{' on every rank' if everywhere else ''} (max_skips={self.max_skips}, "
                     "HEALTHMON_MAX_SKIPS)")
            if everywhere:
                raise HealthError(anomaly, limit + "; the anomaly reports of the skipped "
                                  "steps are in mon.anomalies and the logs")
            raise HealthError(anomaly, limit + "; the last one:\n" + anomaly.report())
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.steps.append(step)
