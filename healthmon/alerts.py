"""Issuing early warnings: rule findings -> :class:`~healthmon.HealthWarning`.

Each finding of :mod:`healthmon.rules` becomes an :class:`~healthmon.Anomaly` with
``severity="warning"`` and the stack of its site, is kept in the monitor's ``warnings`` list
(bounded), written to every sink that has ``write_warning`` (sinks without it are left
alone), and issued with ``warnings.warn``. Warnings never raise (unless the user turned
warnings into errors with a warnings filter) and never stop training; each rank issues its
own, with no collective.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence

from .errors import Anomaly, HealthWarning
from .sinks import call_sinks
from .stats import TensorStats

MAX_WARNINGS = 1000


def issue(findings: Sequence, order: Sequence[tuple], step: int, frames: Callable,
          store: List[Anomaly], sinks: Sequence, rank: Optional[int] = None,
          modules: Sequence = ()) -> List[Anomaly]:
    """Turn ``findings`` into warnings.

    Args:
        findings: :class:`healthmon.rules.Finding` tuples of one step.
        order: the step's eager ``(site, stack id)`` records (for each site's stack; a
            compiled site has its stack id, captured at trace time, on itself).
        step: the step index.
        frames: stack id -> ``traceback.FrameSummary`` list (``StackTable.frames``).
        store: the monitor's ``warnings`` list (appended to, at most :data:`MAX_WARNINGS`).
        sinks: the monitor's sinks.
        rank: distributed rank, None when not distributed.
        modules: the monitor's modules, indexed by ``site.module`` (for the class name).
    Returns:
        the new warnings (as ``Anomaly`` objects).
    """
    if not findings:
        return []
    sids = {site: sid for site, sid in order}
    out: List[Anomaly] = []
    by_kind = {}
    for f in findings:
        site = f.site
        module_type = type(modules[site.module]).__name__ \
            if 0 <= site.module < len(modules) else ""
        a = Anomaly(site=site.name, phase=site.phase, role=site.role, step=step, kind=f.kind,
                    stats=TensorStats.from_record(f.row),
                    stack=frames(sids.get(site, getattr(site, "sid", -1))),
                    call=site.call, rank=rank, module_type=module_type,
                    severity="warning", detail=f.detail)
        first = by_kind.get(f.kind)
        if first is not None:  # one warning per kind and step: the first site in execution
            first.consequences.append(a)  # order, the others listed with it
            continue
        by_kind[f.kind] = a
        out.append(a)
    for a in out:
        if len(store) < MAX_WARNINGS:
            store.append(a)
        call_sinks(sinks, "write_warning", a)  # duck-typed sinks without it are skipped
    # last, once everything is recorded: a user's "error" warnings filter may raise here.
    # stacklevel=1: the warning is about the site's code (in the message), not the line
    # that happened to end the step
    for a in out:
        warnings.warn(HealthWarning(a), stacklevel=1)
    return out


def format_warnings(store: Sequence[Anomaly], limit: int = 5) -> str:
    """Lines for ``mon.summary()``: the count, then the first ``limit`` headlines."""
    if not store:
        return ""
    lines = [f"early warnings ({len(store)}):"]
    lines += [f"  step {a.step}: {a.headline()}" for a in store[:limit]]
    if len(store) > limit:
        lines.append(f"  ... {len(store) - limit} more (mon.warnings)")
    return "\n".join(lines)
