"""Decoding a step's records on the host and applying the policy (a Monitor mixin).

:class:`Decoder` turns host copies of the record rows into anomalies: the first bad record
in execution order is the anomaly, later ones are its consequences; a bad gradient that
follows a healthy one of another module is blamed on that consumer (see
:mod:`healthmon.monitor`). The policy (``raise`` / ``warn`` / ``log``) is applied here, or,
when distributed, after the ranks agree (:mod:`healthmon.distributed`).
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import List, Optional

from . import alerts, labels
from ._layout import LABEL, NUM_LABEL
from .errors import Anomaly, HealthError
from .records import Site, Step, merge_order
from .sinks import call_sinks
from .stats import TensorStats, is_additive_mask

_log = logging.getLogger("healthmon")
MAX_ANOMALIES = 1000


class _LazyRows:
    """The decoded step's rows as ``(site, row list)`` pairs, converted on first use (most
    steps are never looked at: the conversion is the cost of a healthy step). ``sites`` is
    the list of sites in execution order, or a function that builds it (a healthy step with
    compiled records: their execution order costs Python per row, paid only when read)."""

    __slots__ = ("_sites", "_hosts", "_rows")

    def __init__(self, sites, hosts):
        self._sites, self._hosts, self._rows = sites, hosts, None

    def sites(self) -> list:
        """The sites, in execution order."""
        if callable(self._sites):
            self._sites = self._sites()
        return self._sites

    def _materialize(self):
        if self._rows is None:
            lists = {b: h.tolist() for b, h in self._hosts.items()}
            self._rows = [(s, lists[s.buffer][s.slot]) for s in self.sites()]
            self._hosts = None
        return self._rows

    def __iter__(self):
        return iter(self._materialize())

    def __len__(self):
        return len(self.sites())

    def __getitem__(self, i):
        return self._materialize()[i]


class Decoder:
    """Decoding, policy and inspection methods of :class:`~healthmon.Monitor`."""

    # ----------------------------------------------------------------- decoding / policy

    def _decode_partial(self, step: Step) -> None:
        """CPU, before the optimizer's update: check the records of the open step so far
        and apply the policy now (a bad gradient raises before it reaches the weights).
        The step's final decode reports only what came after."""
        if self.config.sync or self._dist is not None or (
                step.decoded >= len(step.order) and not self._rec.has_compiled):
            return
        rows = self._rec.cpu_rows()  # CPU: judged in place; the step's final decode copies
        if rows is None:
            self._rec.copy_to_host()
        self._decode(step, True, partial=True, hosts=rows)

    def _decode(self, step: Step, apply_policy: bool, partial: bool = False,
                hosts: Optional[dict] = None) -> None:
        """Turn the step's host rows into anomalies and sink rows (``hosts``: rows to read
        instead of the host copies, ``{buffer: float64 (used, NUM_STATS)}``).

        Only rows with a nonzero NaN / ±Inf / bad-label count (columns 1-3, found with one
        native scan per buffer) are converted to Python and judged; the healthy rows
        stay in the host tensors, kept as the step's view (``records()`` and the sinks read
        it) and as the previous step's rows ("last healthy record" of a later anomaly)."""
        if hosts is None:
            self._rec.wait()
            hosts = self._rec.host_tensors()
        flagged = self._rec.flagged(hosts)
        first: Optional[Anomaly] = None if partial else step.anomaly
        healthy = first is None and not any(flagged.values())
        # (a compiled graph is the same every step: the record op skips the steps the
        # cadence skips, and only a CUDA graph replay records them anyway; the decode
        # judges active steps only)
        compiled = self._rec.has_compiled and step.active
        if partial and healthy:  # nothing to report before the update
            step.decoded = len(step.order)
            step.compiled_decoded = step.compiled_decoded or compiled
            return
        prev_bwd = None
        done = 0 if partial else step.decoded
        order = step.order[step.decoded:] if partial else step.order
        if partial:
            step.decoded += len(order)
        compiled_done = step.compiled_decoded and not partial
        view = []  # (site, stack id) of the rows the sinks see, in execution order
        if healthy and not partial:
            # the healthy step (the common case): nothing to judge, no Python per row; the
            # execution order is built only if the rows are read (sinks, rules, records())
            if compiled and not order and not self._rec.any_compiled_written(hosts):
                return  # nothing ran in this step
            eager = order
            view = (lambda: [site for site, _ in merge_order(eager, self._rec.compiled_written(
                kept)) if site.phase != "label"]) if compiled else \
                [site for site, _ in order if site.phase != "label"]
            order = ()
        elif compiled and not (partial and step.compiled_decoded):
            order = merge_order(order, self._rec.compiled_written(hosts))
            step.compiled_decoded = step.compiled_decoded or partial
        eager_seen = 0
        for site, sid in order:
            if site.compiled:
                if compiled_done:
                    view.append(site)  # checked before the update already
                    continue
            else:
                eager_seen += 1
                if eager_seen <= done:
                    if site.phase != "label":
                        view.append(site)  # checked before the update already
                    continue
            if site.slot not in flagged[site.buffer]:
                if site.phase != "label":
                    view.append(site)
                    if site.phase == "backward":
                        prev_bwd = (site, sid)
                continue
            row = hosts[site.buffer][site.slot].tolist()
            if site.phase == "label":
                meta = step.label_meta[site]
                if row[LABEL["bad"]] and not meta[4] and (not self.config.sync or
                                                          self._dist is not None):
                    stats = labels.LabelStats.from_record(row[:NUM_LABEL], *meta[:4])
                    anomaly = labels.label_anomaly(stats, site.name, self._stacks.frames(sid),
                                                   step.index, role=site.role)
                    if first is None:
                        first = anomaly
                    else:
                        first.consequences.append(anomaly)
                continue
            view.append(site)
            bad = self._bad(site, row)
            if not bad:
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
        if partial:
            if first is not None:
                step.anomaly = first  # later records of the step are its consequences
                step.partial_reported = True
                self._report(first, apply_policy)
            return
        if not view and first is None:
            return  # nothing ran in this step (compiled sites all unwritten)
        # an accelerator's pinned host buffer is reused at the next boundary: keep a copy
        kept = {b: h if b.device.type == "cpu" else h.clone() for b, h in hosts.items()}
        self._rec.keep_healthy(kept)
        self._last_rows = _LazyRows(view, kept)
        self._last_step = step.index
        if self.sinks:
            dicts = self._row_dicts(self._last_rows)
            call_sinks(self.sinks, "write_step", step.index, dicts)
        if self._rules is not None and self._rules_cadence.due():
            # early warnings (none in a step with an anomaly), within their time budget
            t0 = time.perf_counter()
            # (the step's whole order for the sites' stacks: ``order`` is empty on the
            # healthy path, the only one that warns)
            alerts.issue(self._rules.evaluate_view(step.index, self._last_rows.sites(), kept),
                         step.order, step.index, self._stacks.frames, self.warnings,
                         self.sinks, self._dist.rank if self._dist is not None else None,
                         self._modules)
            self._rules_cadence.spent(time.perf_counter() - t0)
        if self._dist is not None and apply_policy:  # every rank takes the same branch
            self._dist.settle(step.index, first, reported=self.config.sync)
        elif first is not None and not self.config.sync and not step.partial_reported:
            self._report(first, apply_policy)

    @staticmethod
    def _bad(site: Site, row: list) -> Optional[str]:
        if row[1]:
            return "nan"
        if (row[2] or row[3]) and not site.allow_inf and not (
                site.phase in ("input", "forward") and is_additive_mask(row)):  # 0/-inf mask
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
        last = self._rec.last_healthy(site)
        return Anomaly(site=name, phase=site.phase, role=role, step=step,
                       kind=self._bad(site, row), stats=TensorStats.from_record(row),
                       stack=self._stacks.frames(stack_id),
                       last_healthy=TensorStats.from_record(last) if last is not None else None,
                       call=call, rank=self._dist.rank if self._dist is not None else None,
                       module_type=type(self._modules[module]).__name__ if module >= 0 else "")

    def _check_now(self, site: Site, sid: int) -> None:
        """Sync mode: read the record just written and report it if bad (raises here)."""
        row = site.buffer.records[site.slot].tolist()
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
        if self._drill is not None:  # the exact op and line (a replay, first anomaly only)
            self._drill.explain(site, anomaly)
        self._report(anomaly, self._dist is None)  # distributed: raise at the boundary

    def _report(self, anomaly: Anomaly, apply_policy: bool) -> None:
        last = self._last_report
        if last is not None and last.step == anomaly.step and last.rank == anomaly.rank:
            # a later segment of a step already reported (several forwards or evaluation
            # batches in one step): one anomaly per step, the rest are its consequences
            last.consequences.append(anomaly)
            last.consequences.extend(anomaly.consequences)
            anomaly.consequences = []
            return
        self._last_report = anomaly
        if len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append(anomaly)
        else:
            self.dropped_anomalies += 1
        call_sinks(self.sinks, "write_anomaly", anomaly)
        if not apply_policy:
            return
        mode = self.config.on_anomaly
        if mode == "raise":
            if self.remove_on_raise:  # a trainer callback: the error leaves the loop
                self._release()
            raise HealthError(anomaly)
        if mode == "warn":
            warnings.warn(anomaly.report(), RuntimeWarning, stacklevel=2)
        elif mode == "skip":
            warnings.warn(anomaly.report() + "\n  on_anomaly=skip: this step's update is "
                          "skipped (the weights and the optimizer state stay as they were)",
                          RuntimeWarning, stacklevel=2)
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
    def last_step(self) -> Optional[int]:
        """Step number of the rows ``records()`` returns (None before the first decode)."""
        return self._last_step

    @property
    def num_sites(self) -> int:
        return len(self._sites)

    def buffer_bytes(self) -> int:
        """Bytes of the device record buffers (bounded by the number of sites)."""
        return self._rec.nbytes()
