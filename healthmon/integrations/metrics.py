"""Decoded record rows -> a bounded dict of per-layer health metrics for a trainer's logger.

Plain functions over host rows (``Monitor.records()``): no tensors, no device access.
"""
from __future__ import annotations

import math
from typing import Dict, List

PREFIX = "healthmon/"


def health_metrics(rows: List[dict], anomalies: int, max_modules: int = 32) -> Dict[str, float]:
    """Per-layer health of one decoded step, with a bounded number of keys.

    Args:
        rows: ``Monitor.records()`` of one step (dicts with ``site``, ``phase``, ``norm``,
            ``absmax``, ``nan``, ``posinf``, ``neginf``, ...), in execution order.
        anomalies: anomalies so far (``len(mon.anomalies)``; with ``on_anomaly="warn"`` or
            ``"log"`` each one was a warning / log line).
        max_modules: modules with their own keys (those whose parameter gradients come
            first in execution order); the totals cover every module.
    Returns:
        ``healthmon/grad_norm/<module>`` (2-norm of the module's parameter gradients),
        ``healthmon/grad_absmax/<module>``, and the totals ``healthmon/grad_norm``,
        ``healthmon/grad_absmax``, ``healthmon/forward_absmax`` (largest finite forward
        output), ``healthmon/nan``, ``healthmon/inf`` (non-finite counts over every record of
        the step), ``healthmon/anomalies``: at most ``2 * max_modules + 6`` keys, floats.
    """
    sq: Dict[str, float] = {}  # module -> sum of squared parameter-gradient norms
    amax: Dict[str, float] = {}
    nan = inf = 0
    fwd_absmax = 0.0
    for r in rows:
        nan += r["nan"]
        inf += r["posinf"] + r["neginf"]
        if r["phase"] == "forward":
            fwd_absmax = max(fwd_absmax, r["absmax"])
        elif r["phase"] == "grad":
            site = r["site"]
            sq[site] = sq.get(site, 0.0) + r["norm"] ** 2
            amax[site] = max(amax.get(site, 0.0), r["absmax"])
    out: Dict[str, float] = {}
    for site in list(sq)[:max_modules]:
        out[f"{PREFIX}grad_norm/{site}"] = math.sqrt(sq[site])
        out[f"{PREFIX}grad_absmax/{site}"] = float(amax[site])
    out[f"{PREFIX}grad_norm"] = math.sqrt(sum(sq.values()))
    out[f"{PREFIX}grad_absmax"] = float(max(amax.values(), default=0.0))
    out[f"{PREFIX}forward_absmax"] = float(fwd_absmax)
    out[f"{PREFIX}nan"] = float(nan)
    out[f"{PREFIX}inf"] = float(inf)
    out[f"{PREFIX}anomalies"] = float(anomalies)
    return out
