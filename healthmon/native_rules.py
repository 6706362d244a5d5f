"""The early-warning rules in C++ (``healthmon._C.RulesEngine``, ``csrc/rules_core.h``).

:class:`NativeRules` has the interface of :class:`healthmon.rules.Rules`, which stays the
reference: the same thresholds, histories, episodes and findings, in the same order, with
the same detail texts (both word them with ``rules.*_detail``). The monitor registers each
site once and hands the engine the step's execution order only when it changes; a decoded
step then costs one native call over the host copies of the record buffers instead of ~3 us
of Python per row, so the rules judge every step (their time budget no longer skips any on
small models). ``tests/test_native_rules.py`` compares the two engines.

:func:`create` picks the engine: the native one unless the extension is missing or
``HEALTHMON_FASTPATH=0`` (everything in Python, for benchmarks and bisecting).
"""
from __future__ import annotations

import math
from dataclasses import asdict
from typing import Dict, List, Sequence

import torch

from . import fastpath, ops
from . import rules as R
from ._layout import NUM_STATS
from .records import DTYPE_CHANGES

PHASES = ("input", "forward", "backward", "grad", "loss", "param", "label")  # rules_core.h
_OTHER = len(PHASES)
KINDS = ("overflow", "dead", "spike", "growth", "vanishing", "frozen")


def _limits(dtype) -> tuple:
    """``(fmax, tiny)`` the engine judges a site of ``dtype`` with (fmax 0: not a
    low-precision dtype, no headroom rule)."""
    return R.DTYPE_MAX.get(dtype, 0.0), R._TINY.get(dtype, R._TINY[torch.float32])


def create(config: R.WarnConfig):
    """The rules of one monitor: :class:`NativeRules`, or the Python :class:`Rules`."""
    return NativeRules(config) if fastpath.enabled() else R.Rules(config)


class NativeRules:
    """:class:`healthmon.rules.Rules` in C++.

    Args:
        config: the thresholds (:class:`~healthmon.rules.WarnConfig`).
    """

    def __init__(self, config: R.WarnConfig):
        from . import _C
        self.config = config
        self._engine = _C.RulesEngine(asdict(config))
        self._ids: Dict[object, int] = {}         # site -> engine id
        self._param_keys: Dict[tuple, int] = {}   # (module, name, role) -> key
        self._order: List = []                    # the sites of the last set_order
        self._order_buffers: List = []
        self._dtype_changes = DTYPE_CHANGES[0]    # the count the limits are up to date with
        self._dtype_of: Dict[object, object] = {}  # site -> dtype the engine judges it as

    def _id(self, site) -> int:
        """The engine's id of ``site``, registered on first use; a site whose dtype changed
        (``model.half()`` mid-run) gets the limits of its new dtype."""
        sid = self._ids.get(site)
        dtype = getattr(site, "dtype", None)
        if sid is None:
            key = -1
            if site.phase in ("grad", "param"):  # a parameter's gradient and value meet
                key = self._param_keys.setdefault((site.module, site.name, site.role),
                                                  len(self._param_keys))
            sid = self._ids[site] = self._engine.add_site(
                PHASES.index(site.phase) if site.phase in PHASES else _OTHER,
                bool(site.allow_inf), *_limits(dtype), key)
            self._dtype_of[site] = dtype
        elif self._dtype_of[site] is not dtype:
            self._engine.set_site_limits(sid, *_limits(dtype))
            self._dtype_of[site] = dtype
        return sid

    def evaluate_view(self, step: int, sites: Sequence, hosts: Dict) -> List[R.Finding]:
        """The findings of a decoded step.

        Args:
            step: the step index (unused: the texts do not name it).
            sites: the step's sites in execution order (``records.Site``).
            hosts: ``{buffer: float64 tensor [rows, NUM_STATS]}``, the host copies; site
                ``s``'s row is ``hosts[s.buffer][s.slot]``.
        Returns:
            :class:`~healthmon.rules.Finding` tuples that start a new episode, in order.
        """
        buffers = list(hosts)
        if sites != self._order or buffers != self._order_buffers:  # identity, per item
            index = {b: i for i, b in enumerate(buffers)}
            self._engine.set_order([self._id(s) for s in sites],
                                   [index[s.buffer] for s in sites], [s.slot for s in sites])
            self._order, self._order_buffers = list(sites), buffers
        elif self._dtype_changes != DTYPE_CHANGES[0]:  # a site's limits follow its dtype
            for s in sites:
                self._id(s)
        self._dtype_changes = DTYPE_CHANGES[0]
        # (a step boundary inside a torch.func transform: the host rows are its wrappers)
        found = self._engine.evaluate_order([ops.physical(hosts[b]) for b in buffers])
        if not found:
            return []
        return [self._finding(sites[f[0]], hosts[sites[f[0]].buffer][sites[f[0]].slot].tolist(),
                              f) for f in found]

    def evaluate(self, step: int, rows: Sequence[tuple]) -> List[R.Finding]:
        """:meth:`healthmon.rules.Rules.evaluate`: ``(site, row)`` pairs in execution order,
        each row ``NUM_STATS`` floats."""
        if not rows:
            return []
        ids = [self._id(site) for site, _ in rows]
        table = torch.tensor([list(row) for _, row in rows], dtype=torch.float64)
        if table.shape[1] != NUM_STATS:
            raise ValueError(f"healthmon: rule rows have {NUM_STATS} fields, got "
                             f"{table.shape[1]}")
        found = self._engine.evaluate(ids, table)
        return [self._finding(rows[f[0]][0], list(rows[f[0]][1]), f) for f in found]

    def _finding(self, site, row: list, f: tuple) -> R.Finding:
        """Word one engine finding ``(pos, kind, count, med, records, first, loss)``."""
        _, kind, count, med, records, first, loss = f
        kind = KINDS[kind]
        cfg = self.config
        if kind == "overflow":
            detail = R.overflow_detail(row[R._ABSMAX], site.dtype, cfg.headroom)
        elif kind == "dead":
            detail = R.dead_detail(site.phase, row[R._NUMEL], count)
        elif kind == "frozen":
            detail = R.frozen_detail(count)
        else:
            name, m = R._metric(site.phase, row)
            lm = math.log10(m)
            if kind == "spike":
                detail = R.spike_detail(name, m, lm, med, records)
            elif kind == "growth":
                detail = R.growth_detail(name, m, lm, first, cfg.growth_steps, count)
            else:
                detail = R.vanishing_detail(m, lm, med, loss, count)
        return R.Finding(site, row, kind, detail)
