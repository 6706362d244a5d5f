"""Decoding a step's records on the host and applying the policy (a Monitor mixin).

:class:`Decoder` turns host copies of the record rows into anomalies: the first bad record
in execution order is the anomaly, later ones are its consequences; a bad gradient that
follows a healthy one of another module is blamed on that consumer (see
:mod:`healthmon.monitor`). The policy (``raise`` / ``warn`` / ``log``) is applied here, or,
when distributed, after the ranks agree (:mod:`healthmon.distributed`).
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional

from . import alerts, labels
from ._layout import LABEL, NUM_LABEL
from .errors import Anomaly, HealthError
from .records import Site, Step
from .stats import TensorStats

_log = logging.getLogger("healthmon")
MAX_ANOMALIES = 1000


class Decoder:
    """Decoding, policy and inspection methods of :class:`~healthmon.Monitor`."""

    # ----------------------------------------------------------------- decoding / policy

    def _decode(self, step: Step, apply_policy: bool) -> None:
        for buf in self._bufs.values():
            buf.wait()
        hosts = {d: b.host.tolist() for d, b in self._bufs.items() if b.host is not None}
        rows = []
        first: Optional[Anomaly] = step.anomaly
        prev_bwd = None
        for site, sid in step.order:
            row = hosts[site.device][site.slot]
            if site.phase == "label":
                meta = step.label_meta[site]
                if row[LABEL["bad"]] and not meta[4] and (not self.config.sync or
                                                          self._dist is not None):
                    stats = labels.LabelStats.from_record(row[:NUM_LABEL], *meta[:4])
                    anomaly = labels.label_anomaly(stats, site.name, self._stacks.frames(sid),
                                                   step.index)
                    if first is None:
                        first = anomaly
                    else:
                        first.consequences.append(anomaly)
                continue
            rows.append((site, row))
            bad = self._bad(site, row)
            if not bad:
                site.last_healthy = row
                if site.phase == "backward":
                    prev_bwd = (site, sid)
                continue
            if self.config.sync:
                continue  # already reported by its hook
            # consequences keep their own site: prev_bwd is the last *healthy* consumer, a
            # blame that only holds for the first bad gradient
            anomaly = self._anomaly(site, row, sid, step.index,
                                    prev_bwd if first is None else None)
            if first is None:
                first = anomaly
            else:
                first.consequences.append(anomaly)
        self._last_rows = rows
        self._last_step = step.index
        if self.sinks:
            dicts = self._row_dicts(rows)
            for sink in self.sinks:
                sink.write_step(step.index, dicts)
        if self._rules is not None:  # early warnings (none in a step with an anomaly)
            alerts.issue(self._rules.evaluate(step.index, rows), step.order, step.index,
                         self._stacks.frames, self.warnings, self.sinks,
                         self._dist.rank if self._dist is not None else None, self._modules)
        if self._dist is not None and apply_policy:  # every rank takes the same branch
            self._dist.settle(step.index, first, reported=self.config.sync)
        elif first is not None and not self.config.sync:
            self._report(first, apply_policy)

    @staticmethod
    def _bad(site: Site, row: list) -> Optional[str]:
        if row[1]:
            return "nan"
        if (row[2] or row[3]) and not site.allow_inf:
            return "inf"
        return None

    def _anomaly(self, site: Site, row: list, sid: int, step: int, prev_bwd) -> Anomaly:
        name, role, stack_id, call = site.name, site.role, sid, site.call
        module = site.module
        if site.phase == "backward" and prev_bwd is not None and prev_bwd[0].module != site.module:
            consumer, consumer_sid = prev_bwd
            name, call, stack_id = consumer.name, consumer.call, consumer_sid
            module = consumer.module
            which = site.role[len("grad_"):] if site.role.startswith("grad_") else site.role
            role = f"grad_input (gradient of {site.name} {which})"
        last = site.last_healthy
        return Anomaly(site=name, phase=site.phase, role=role, step=step,
                       kind=self._bad(site, row), stats=TensorStats.from_record(row),
                       stack=self._stacks.frames(stack_id),
                       last_healthy=TensorStats.from_record(last) if last is not None else None,
                       call=call, rank=self._dist.rank if self._dist is not None else None,
                       module_type=type(self._modules[module]).__name__ if module >= 0 else "")

    def _check_now(self, site: Site, sid: int) -> None:
        """Sync mode: read the record just written and report it if bad (raises here)."""
        row = self._bufs[site.device].records[site.slot].tolist()
        cur = self._cur
        if not self._bad(site, row):
            site.last_healthy = row
            if site.phase == "backward":
                cur.prev_bwd = (site, sid)
            return
        anomaly = self._anomaly(site, row, sid, cur.index,
                                cur.prev_bwd if cur.anomaly is None else None)
        if cur.anomaly is not None:
            cur.anomaly.consequences.append(anomaly)
            return
        cur.anomaly = anomaly
        self._report(anomaly, self._dist is None)  # distributed: raise at the boundary

    def _report(self, anomaly: Anomaly, apply_policy: bool) -> None:
        if len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append(anomaly)
        else:
            self.dropped_anomalies += 1
        for sink in self.sinks:
            sink.write_anomaly(anomaly)
        if not apply_policy:
            return
        mode = self.config.on_anomaly
        if mode == "raise":
            raise HealthError(anomaly)
        if mode == "warn":
            warnings.warn(anomaly.report(), RuntimeWarning, stacklevel=2)
        else:
            _log.error("%s", anomaly.report())

    # ----------------------------------------------------------------- inspection

    @staticmethod
    def _row_dicts(rows) -> List[dict]:
        out = []
        for order, (site, row) in enumerate(rows):
            d = {"site": site.name, "phase": site.phase, "role": site.role,
                 "call": site.call, "order": order}
            d.update(TensorStats.from_record(row).as_dict())
            out.append(d)
        return out

    def records(self) -> List[dict]:
        """Rows of the last decoded step, in execution order (see :mod:`healthmon.sinks`)."""
        return self._row_dicts(self._last_rows)

    def summary(self, width: Optional[int] = None, limit: Optional[int] = None) -> str:
        """Per-site table of the last decoded step (worst first), plus skipped tensors."""
        from .summary import format_summary
        if not self.config.enabled:
            return "healthmon is off (HEALTHMON=off): nothing recorded"
        head = f"healthmon: step {self._last_step}" if self._last_step is not None \
            else "healthmon: no step decoded yet (call mon.check())"
        text = head + "\n" + format_summary(self.records(), width=width, limit=limit)
        if self.warnings:
            text += "\n" + alerts.format_warnings(self.warnings)
        if self.skipped:
            text += "\nskipped (not recorded): " + "; ".join(
                f"{n} x {reason}" for reason, n in sorted(self.skipped.items()))
        return text

    @property
    def num_sites(self) -> int:
        return len(self._sites)

    def buffer_bytes(self) -> int:
        """Bytes of the device record buffers (bounded by the number of sites)."""
        return sum(b.records.numel() * b.records.element_size() for b in self._bufs.values())
