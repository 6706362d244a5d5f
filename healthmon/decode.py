"""Decoding a step's records on the host: rows in execution order, judged (plain functions).

:func:`judge` turns a step's host rows into its first anomaly and the sites the sinks see:
the first bad record in execution order is the anomaly, later ones are its consequences; a
bad gradient that follows a healthy one of another module is blamed on that consumer (see
:mod:`healthmon.monitor`). What is done with the anomaly (policy, sinks, distributed
agreement) is the caller's: :mod:`healthmon.actions`.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

from . import labels
from ._layout import LABEL, NUM_LABEL
from .errors import Anomaly
from .records import Recorder, Site, Step, merge_order
from .stats import TensorStats, is_additive_mask

class LazyRows:
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


class Context(NamedTuple):
    """What judging a step needs of its monitor: the ``recorder`` (sites, stacks, the last
    healthy rows), the watched ``modules`` (their type names go into reports), ``sync``
    (records were judged in their hooks already) and ``rank`` (None unless distributed)."""
    recorder: Recorder
    modules: list
    sync: bool
    rank: Optional[int]


class Judgement(NamedTuple):
    """``first``: the step's first anomaly (its consequences attached), or None. ``view``:
    the sites the sinks see, in execution order; None for a healthy step with compiled
    records, whose order is merged only if read (:func:`merged_view`)."""
    first: Optional[Anomaly]
    view: Optional[list]


def is_bad(site: Site, row: list) -> Optional[str]:
    """``"nan"``, ``"inf"`` or None for one record row (float64 list, ``NUM_STATS``)."""
    if row[1]:
        return "nan"
    if (row[2] or row[3]) and not site.allow_inf and not (
            site.phase in ("input", "forward") and is_additive_mask(row)):  # 0/-inf mask
        return "inf"
    return None


def merged_view(order: list, compiled: List[Site]) -> List[Site]:
    """The sites of a step's eager ``order`` ``[(site, stack id)]`` and its written
    ``compiled`` sites, in execution order, labels left out (they have rows of their own)."""
    return [site for site, _ in merge_order(order, compiled) if site.phase != "label"]


class ViewMemo:
    """The last :func:`merged_view` and what it merged: a steady loop's steps (the same
    eager records, the same compiled rows written) reuse it instead of merging ~2 rows
    per site again in Python. The view is shared: callers only read it."""

    __slots__ = ("order", "compiled", "view")

    def __init__(self):
        self.order: Optional[list] = None
        self.compiled: Optional[List[Site]] = None
        self.view: List[Site] = []

    def merged(self, order: list, compiled: List[Site]) -> List[Site]:
        # list equality compares items by identity first: sites, stack ids
        if order != self.order or compiled != self.compiled:
            self.view = merged_view(order, compiled)
            self.order, self.compiled = list(order), compiled
        return self.view


def make_anomaly(site: Site, row: list, sid: int, step: int, prev_bwd,
                 ctx: Context) -> Anomaly:
    """The anomaly of bad row ``row`` of ``site`` (stack ``sid``) in ``step``.
    ``prev_bwd``: ``(site, stack id)`` of the last healthy gradient record before it, the
    consumer a bad gradient of another module is blamed on (None: no blame)."""
    name, role, stack_id, call = site.name, site.role, sid, site.call
    module = site.module
    if site.phase == "backward" and prev_bwd is not None and prev_bwd[0].module != site.module:
        consumer, consumer_sid = prev_bwd
        name, call, stack_id = consumer.name, consumer.call, consumer_sid
        module = consumer.module
        which = site.role[len("grad_"):] if site.role.startswith("grad_") else site.role
        role = f"grad_input (gradient of {site.name} {which})"
    rec = ctx.recorder
    last = rec.last_healthy(site)
    return Anomaly(site=name, phase=site.phase, role=role, step=step,
                   kind=is_bad(site, row), stats=TensorStats.from_record(row),
                   stack=rec.stacks.frames(stack_id),
                   last_healthy=TensorStats.from_record(last) if last is not None else None,
                   call=call, rank=ctx.rank,
                   module_type=type(ctx.modules[module]).__name__ if module >= 0 else "")


def judge(step: Step, hosts: dict, ctx: Context, partial: bool = False
          ) -> Optional[Judgement]:
    """Judge ``step``'s rows (``hosts``: ``{buffer: float64 (used, NUM_STATS)}``).

    Only rows with a nonzero NaN / ±Inf / bad-label count (columns 1-3, found with one
    native scan per buffer) are converted to Python; a healthy step costs no Python per row.
    ``partial``: the open step before the optimizer's update; the records judged are marked
    in ``step`` (``decoded``, ``compiled_decoded``) and its final judgement reports only
    what came after. Returns None when nothing ran in the step (every compiled site
    unwritten).
    """
    rec = ctx.recorder
    flagged = rec.flagged(hosts)
    first: Optional[Anomaly] = None if partial else step.anomaly
    healthy = first is None and not any(flagged.values())
    # (a compiled graph is the same every step: the record op skips the steps the cadence
    # skips, and only a CUDA graph replay records them anyway; only active steps are judged)
    compiled = rec.has_compiled and step.active
    if partial and healthy:  # nothing to report before the update
        step.decoded = len(step.order)
        step.compiled_decoded = step.compiled_decoded or compiled
        return Judgement(None, [])
    if healthy:  # the common case: nothing to judge
        if compiled:
            return Judgement(None, None) if step.order or rec.any_compiled_written(hosts) \
                else None
        view = [site for site, _ in step.order if site.phase != "label"]
        return Judgement(None, view) if view else None
    prev_bwd = None
    done = 0 if partial else step.decoded
    order = step.order[step.decoded:] if partial else step.order
    if partial:
        step.decoded += len(order)
    compiled_done = step.compiled_decoded and not partial
    if compiled and not (partial and step.compiled_decoded):
        order = merge_order(order, rec.compiled_written(hosts))
        step.compiled_decoded = step.compiled_decoded or partial
    view: List[Site] = []
    eager_seen = 0
    for site, sid in order:
        if site.compiled:
            if compiled_done:
                view.append(site)  # judged before the update already
                continue
        else:
            eager_seen += 1
            if eager_seen <= done:
                if site.phase != "label":
                    view.append(site)  # judged before the update already
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
            # (sync mode without distribution reported it at the loss call)
            if row[LABEL["bad"]] and not meta[4] and (not ctx.sync or ctx.rank is not None):
                stats = labels.LabelStats.from_record(row[:NUM_LABEL], *meta[:4])
                anomaly = labels.label_anomaly(stats, site.name, rec.stacks.frames(sid),
                                               step.index, role=site.role)
                if first is None:
                    first = anomaly
                else:
                    first.consequences.append(anomaly)
            continue
        view.append(site)
        if not is_bad(site, row):
            if site.phase == "backward":
                prev_bwd = (site, sid)
            continue
        if ctx.sync:
            continue  # already reported by its hook
        # consequences keep their own site: prev_bwd is the last *healthy* consumer, a
        # blame that only holds for the first bad gradient
        anomaly = make_anomaly(site, row, sid, step.index,
                               prev_bwd if first is None else None, ctx)
        if first is None:
            first = anomaly
        else:
            first.consequences.append(anomaly)
    if not partial and not view and first is None:
        return None  # nothing ran in this step (compiled sites all unwritten)
    return Judgement(first, view)


def row_dicts(rows) -> List[dict]:
    """Sink / ``records()`` rows of ``(site, row list)`` pairs, in order."""
    out = []
    for order, (site, row) in enumerate(rows):
        d = {"site": site.name, "phase": site.phase, "role": site.role,
             "call": site.call, "order": order}
        d.update(TensorStats.from_record(row).as_dict())
        out.append(d)
    return out
