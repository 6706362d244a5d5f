"""Early warnings: the decoded rows of one step -> findings (no tensors, no host sync).

:class:`Rules` is fed, once per decoded step, the rows the decoder already has on the host
(``(site, row)`` pairs in execution order; ``row`` is a float64 stats record, fields in
:data:`healthmon._layout.STATS_FIELDS`) and keeps a little per-site history. It returns
:class:`Finding` tuples; turning them into :class:`~healthmon.HealthWarning` objects (stack,
sinks, ``warnings.warn``) is :mod:`healthmon.alerts`' job.

Signals (each reported once per ``(kind, site)`` episode; an episode ends after
``rearm_steps`` records in a row without the condition):

``overflow``  abs-max of an output, gradient or the loss above ``headroom`` x the largest
              finite value of its dtype (float16, bfloat16, the float8 types).
``spike``     a site's metric (gradient norm, activation abs-max, loss abs-value) more than
              ``spike_factor`` x the median of its last ``window`` records, and more than
              ``spike_mad`` robust deviations (MAD of log10 values) above it (the loss: also
              above ``loss_floor`` x its first value; sites under ``spike_floor`` x the
              largest value of their phase in the step are rounding noise, not judged).
``growth``    the same metric up ``growth_factor`` x over the last ``growth_steps`` records,
              rising at 80% of them, while the loss is higher than ``growth_steps`` records
              ago (or not recorded): sustained exponential growth, not fitting.
``dead``      a forward output all zeros, or a parameter gradient exactly zero, for
              ``dead_steps`` training steps in a row.
``frozen``    a parameter whose gradient is non-zero (and not rounding noise: at least
              ``spike_floor`` x the step's largest gradient norm) but whose record (phase
              ``param``) is bit-for-bit unchanged for ``frozen_steps`` training steps in a row.
``vanishing`` a parameter gradient's norm below ``vanish_ratio`` x its own median (or all
              its values denormal) for ``vanish_steps`` steps while the loss is above
              ``converged_ratio`` x its first value (not converged).

Histories are kept apart for training steps (steps with a loss or gradient record) and
evaluation steps (forward only): eval-mode BatchNorm and dropout change activations.
Defaults and the evidence they rest on: ``docs/warnings.md``.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, fields, replace
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ._layout import STAT

_NUMEL, _ZEROS, _FINITE = STAT["numel"], STAT["zeros"], STAT["finite"]
_SUMSQ, _ABSMAX = STAT["sumsq"], STAT["absmax"]
_TRAIN_PHASES = ("backward", "grad", "loss")
_HEADROOM_PHASES = ("forward", "backward", "grad", "loss")

_LOW_PRECISION = [torch.float16, torch.bfloat16]
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _LOW_PRECISION.append(getattr(torch, _name))
# largest finite value of the dtypes whose range a training run can plausibly exhaust
DTYPE_MAX = {dt: float(torch.finfo(dt).max) for dt in _LOW_PRECISION}
_TINY = {dt: float(torch.finfo(dt).tiny) for dt in
         _LOW_PRECISION + [torch.float32, torch.float64]}


# WarnConfig fields that count records or steps (ints)
_COUNT_FIELDS = ("window", "min_history", "growth_steps", "dead_steps", "frozen_steps",
                 "vanish_steps", "rearm_steps")


@dataclass(frozen=True)
class WarnConfig:
    """Thresholds of the early warnings (``healthmon.watch(model, warn=WarnConfig(...))``).

    Defaults were chosen from healthy and degrading runs (``docs/warnings.md``): each sits
    well above the largest value the healthy runs produced and below what the degrading
    runs reach several steps before their first NaN/Inf.
    """
    headroom: float = 0.25        # fraction of the dtype's largest finite value
    spike_factor: float = 10.0    # x the median of the site's recent records
    spike_mad: float = 8.0        # and this many robust deviations (log10 MAD) above it
    spike_floor: float = 1e-3     # sites below this x their phase's largest value: noise
    loss_floor: float = 0.1       # a loss spike is judged against >= this x its first value
    window: int = 50              # records of history per site
    min_history: int = 10         # records before a site's spikes are judged
    growth_steps: int = 40        # records over which sustained growth is measured
    growth_factor: float = 10.0   # growth over growth_steps (rising at 80% of them) that warns
    dead_steps: int = 20          # steps of all-zero output / exactly-zero gradient
    frozen_steps: int = 20        # steps of an unchanged parameter with a non-zero gradient
    vanish_ratio: float = 1e-2    # gradient norm / its own median that counts as collapsed
    vanish_steps: int = 5         # steps of collapse before a vanishing warning
    converged_ratio: float = 1e-2  # loss / its first value under which it counts converged
    rearm_steps: int = 10         # clear records that end an episode
    # the rules' share of a training step's wall time; above it they run every k-th
    # decoded step (k up to 64), so always-on warnings stay cheap on launch-bound models
    # (>= 1: every step, whatever it costs)
    budget: float = 0.05

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"healthmon: WarnConfig.{f.name} must be a positive number, "
                                 f"got {v!r}")
            if f.name in _COUNT_FIELDS and not isinstance(v, int):
                raise ValueError(f"healthmon: WarnConfig.{f.name} is a number of records or "
                                 f"steps: a positive int, got {v!r}")
        if not self.headroom <= 1:
            raise ValueError(f"healthmon: WarnConfig.headroom is a fraction of the dtype's "
                             f"largest value, in (0, 1]; got {self.headroom!r}")
        if self.growth_steps >= self.window:
            raise ValueError(f"healthmon: WarnConfig.growth_steps ({self.growth_steps}) must "
                             f"be smaller than window ({self.window})")


class Cadence:
    """When the rules run: on every decoded step while they cost less than
    ``budget`` x the training step's wall time (both exponential moving averages),
    otherwise on every k-th, k = cost / (budget x step time), at most 64. K-step rules
    (dead, frozen, vanishing) then count evaluated steps."""

    def __init__(self, budget: float):
        self.budget = budget
        self.interval = 1
        self._count = 0
        self._last: Optional[float] = None
        self._step: Optional[float] = None
        self._cost: Optional[float] = None

    def due(self) -> bool:
        now = time.perf_counter()
        if self._last is not None:
            dt = now - self._last
            self._step = dt if self._step is None else 0.9 * self._step + 0.1 * dt
        self._last = now
        self._count += 1
        return self._count % self.interval == 0

    def spent(self, seconds: float) -> None:
        self._cost = seconds if self._cost is None else 0.9 * self._cost + 0.1 * seconds
        if self.budget < 1 and self._step:
            self.interval = max(1, min(64, math.ceil(self._cost / (self.budget * self._step))))


def resolve_warn(warn, enabled: bool = True) -> Optional[WarnConfig]:
    """The warn configuration of a monitor: None (warnings off) or a :class:`WarnConfig`.

    Args:
        warn: ``None``/``True`` (defaults), ``False`` (off), a :class:`WarnConfig`, or a dict
            of :class:`WarnConfig` fields.
        enabled: False when ``HEALTHMON_WARN=off`` (wins over ``warn``).
    Raises:
        TypeError: ``warn`` of another type; ValueError / TypeError: a bad field.
    """
    if not enabled or warn is False:
        return None
    cfg = _resolve_warn(warn)
    budget = os.environ.get("HEALTHMON_WARN_BUDGET", "").strip()
    if budget:  # the rules' share of a step (>= 1: every step), for runs that want all
        try:
            value = float(budget)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"healthmon: HEALTHMON_WARN_BUDGET={budget!r} is not valid; a "
                             "positive number (the rules' share of a step's time; 1: "
                             "every step)")
        cfg = replace(cfg, budget=value)
    return cfg


def _resolve_warn(warn) -> WarnConfig:
    if warn is None or warn is True:
        return WarnConfig()
    if isinstance(warn, WarnConfig):
        return warn
    if isinstance(warn, dict):
        names = {f.name for f in fields(WarnConfig)}
        unknown = sorted(set(warn) - names)
        if unknown:
            raise TypeError(f"healthmon: unknown warn option(s) {', '.join(unknown)}; "
                            f"accepted: {', '.join(sorted(names))}")
        return replace(WarnConfig(), **warn)
    raise TypeError(f"healthmon: warn must be True, False, None, a dict or a "
                    f"healthmon.rules.WarnConfig, got {type(warn).__name__}")


class Finding(NamedTuple):
    """One early signal: the site and row it was seen on, its kind and a one-line detail."""
    site: object  # records.Site
    row: list
    kind: str
    detail: str


# The findings' one-line details, shared by Rules and the C++ engine's glue
# (healthmon.native_rules): both pass the same numbers, so the texts are the same.

def overflow_detail(absmax: float, dtype, headroom: float) -> str:
    fmax = DTYPE_MAX[dtype]
    dt = str(dtype).replace("torch.", "")
    return (f"abs-max {absmax:.6g} is {absmax / fmax:.0%} of the largest finite {dt} value "
            f"({fmax:.6g}); a few more steps of growth overflow to Inf (threshold: "
            f"{headroom:.0%} of the range)")


def dead_detail(phase: str, numel: float, n: int) -> str:
    what = "output is all zeros" if phase == "forward" else "gradient is exactly zero"
    why = ("e.g. a ReLU whose inputs are all negative" if phase == "forward"
           else "this parameter no longer influences the loss")
    return (f"{what} ({int(numel)} elements) for {n} training steps in a row: "
            f"a dead layer ({why})")


def spike_detail(name: str, m: float, lm: float, med: float, records: int) -> str:
    return (f"{name} {m:.4g} is {10 ** (lm - med):.3g}x the median ({10 ** med:.4g}) "
            f"of its last {records} records")


def growth_detail(name: str, m: float, lm: float, first: float, steps: int,
                  rises: int) -> str:
    ratio = 10 ** (lm - first)
    return (f"{name} grew {ratio:.3g}x over the last {steps} records "
            f"({ratio ** (1 / steps):.3g}x per record, now {m:.4g}), "
            f"rising at {rises} of them: sustained exponential growth")


def vanishing_detail(m: float, lm: float, med: Optional[float], loss_now: Optional[float],
                     n: int) -> str:
    ref = f"{10 ** lm / 10 ** med:.2g}x its median {10 ** med:.3g}" \
        if med is not None else "the denormal range"
    loss = f" ({loss_now:.4g})" if loss_now is not None else ""
    return (f"gradient norm {m:.3g} collapsed to {ref} for {n} steps while the "
            f"loss{loss} has not converged")


def frozen_detail(n: int) -> str:
    return (f"value unchanged for {n} training steps although its gradient is non-zero: "
            f"it is not in any optimizer's param_groups (e.g. replaced after the "
            f"optimizer was built) or its learning rate is 0")


def _median(values) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _metric(phase: str, row: list) -> Tuple[str, float]:
    """The quantity whose history a site keeps: gradient norm, activation / loss abs-max."""
    if phase in ("backward", "grad"):
        return "gradient norm", math.sqrt(row[_SUMSQ])
    if phase == "loss":
        return "loss", row[_ABSMAX]
    return "abs-max", row[_ABSMAX]


class Rules:
    """Per-site running state of the early-warning rules (one per monitor).

    Args:
        config: the thresholds.
    """

    def __init__(self, config: WarnConfig):
        self.config = config
        self._hist: Dict[tuple, deque] = {}      # (site, train) -> log10 metric values
        self._streak: Dict[tuple, int] = {}      # (kind, site) -> consecutive records
        self._episodes: Dict[tuple, int] = {}    # (kind, site) -> clear records since
        self._prev_param: Dict[tuple, list] = {}  # (module, name, role) -> last param row
        self._grad_live: Dict[tuple, bool] = {}  # (module, name, role) -> grad non-zero now
        self._loss_ref: List[float] = []         # first loss values (convergence reference)
        self._loss_hist: deque = deque(maxlen=config.window)  # log10 |loss|, one per step

    # ------------------------------------------------------------------ bookkeeping

    def _fire(self, kind: str, site, cond: bool) -> bool:
        """True when ``cond`` starts a new (kind, site) episode."""
        key = (kind, site)
        if cond:
            if key in self._episodes:
                self._episodes[key] = 0
                return False
            self._episodes[key] = 0
            return True
        clear = self._episodes.get(key)
        if clear is not None:
            if clear + 1 >= self.config.rearm_steps:
                del self._episodes[key]
            else:
                self._episodes[key] = clear + 1
        return False

    def _count(self, kind: str, site, cond: bool) -> int:
        key = (kind, site)
        n = self._streak.get(key, 0) + 1 if cond else 0
        self._streak[key] = n
        return n

    # ------------------------------------------------------------------ evaluation

    def evaluate_view(self, step: int, sites: List, hosts: Dict) -> List[Finding]:
        """:meth:`evaluate` of a decoded step: ``sites`` in execution order, each row read
        from ``hosts`` (``{buffer: float64 tensor [rows, NUM_STATS]}``) at ``site.slot``."""
        lists = {b: h.tolist() for b, h in hosts.items()}
        return self.evaluate(step, [(s, lists[s.buffer][s.slot]) for s in sites])

    def evaluate(self, step: int, rows: List[tuple]) -> List[Finding]:
        """Judge the rows of one step (execution order) and update the histories.

        Args:
            step: the step index (for messages only).
            rows: ``(site, row)`` pairs; ``site`` has ``name, phase, role, module, dtype``;
                ``row`` a list of float64 stats (``STATS_FIELDS`` order).
        Returns:
            the findings that start a new episode, in execution order.
        """
        cfg = self.config
        out: List[Finding] = []
        train = any(site.phase in _TRAIN_PHASES for site, _ in rows)
        # a step with a non-finite record is reported as an error; its huge-but-finite
        # neighbours (the gradients of an Inf loss) are consequences, not early warnings
        bad = any(row[_FINITE] < row[_NUMEL] and not site.allow_inf and site.phase != "label"
                  for site, row in rows)
        loss_now = None
        for site, row in rows:
            if site.phase == "loss" and row[_FINITE]:
                first_loss = loss_now is None
                loss_now = row[_ABSMAX]
                if len(self._loss_ref) < cfg.min_history:
                    self._loss_ref.append(loss_now)
                if first_loss and loss_now > 0:
                    self._loss_hist.append(math.log10(loss_now))
        # growth counts as divergence only while the loss rises too (2x over the same
        # records): outputs growing from a tiny init toward the targets' scale are
        # fitting, with a flat or falling loss
        lh, g = self._loss_hist, cfg.growth_steps
        loss_rising = True  # no loss recorded: no evidence either way
        if len(lh) > g:
            seq, n = list(lh), len(lh)
            loss_rising = _median(seq[-3:]) - _median(seq[max(0, n - g - 2):n - g + 1]) > \
                math.log10(2.0)
        loss_ref = max(self._loss_ref) if self._loss_ref else None
        converged = loss_now is not None and loss_ref is not None and \
            loss_now < cfg.converged_ratio * loss_ref
        top: Dict[str, float] = {}  # largest metric of each phase in this step
        for site, row in rows:
            if row[_FINITE] == row[_NUMEL]:
                m = _metric(site.phase, row)[1]
                if m > top.get(site.phase, 0.0):
                    top[site.phase] = m
        for site, row in rows:
            phase = site.phase
            if phase == "input" or phase == "label":
                continue  # the user's data: not the model's health
            if phase == "param":
                self._frozen(site, row, out)
                continue
            numel, finite = row[_NUMEL], row[_FINITE]
            if finite < numel or numel == 0:
                continue  # non-finite: an anomaly, reported as an error
            # overflow headroom
            if phase in _HEADROOM_PHASES:
                fmax = DTYPE_MAX.get(getattr(site, "dtype", None))
                cond = fmax is not None and row[_ABSMAX] > cfg.headroom * fmax
                if self._fire("overflow", site, cond):
                    out.append(Finding(site, row, "overflow",
                                       overflow_detail(row[_ABSMAX], site.dtype, cfg.headroom)))
            # dead: all-zero forward output / exactly-zero parameter gradient
            if train and (phase == "grad" or (phase == "forward" and numel >= 2)):
                n = self._count("dead", site, row[_ZEROS] == numel)
                if self._fire("dead", site, n >= cfg.dead_steps):
                    out.append(Finding(site, row, "dead", dead_detail(phase, numel, n)))
            name, m = _metric(phase, row)
            if phase == "grad":
                # a gradient at rounding-noise level (a conv bias before BatchNorm) moves
                # nothing under SGD: not evidence of a parameter left out of the optimizer
                key = (site.module, site.name, site.role)
                self._grad_live[key] = row[_ZEROS] < numel and m >= cfg.spike_floor * top.get(phase, 0.0)
            if not m > 0:
                continue
            lm = math.log10(m)
            hist = self._hist.get((site, train))
            if hist is None:
                hist = self._hist[(site, train)] = deque(maxlen=cfg.window)
            med = _median(hist) if len(hist) >= cfg.min_history else None
            # spike: far above the site's own recent history; a near-converged loss is
            # judged against a floor (its noise is large in ratio), and sites that are
            # rounding noise next to their phase's largest value are not judged
            cond = False
            if med is not None and (phase == "loss" or m >= cfg.spike_floor * top.get(phase, 0.0)):
                base = med
                if phase == "loss" and loss_ref:
                    base = max(med, math.log10(cfg.loss_floor * loss_ref))
                if lm - base > math.log10(cfg.spike_factor):  # the MAD only when needed
                    mad = _median([abs(v - med) for v in hist])
                    cond = lm - med > cfg.spike_mad * 1.4826 * mad
            if self._fire("spike", site, cond):
                out.append(Finding(site, row, "spike",
                                   spike_detail(name, m, lm, med, len(hist))))
            # sustained exponential growth
            cond = False
            if loss_rising and len(hist) >= cfg.growth_steps and \
                    lm - hist[-cfg.growth_steps] > math.log10(cfg.growth_factor):
                seq = list(hist)[-cfg.growth_steps:] + [lm]
                rises = sum(b > a for a, b in zip(seq, seq[1:]))
                cond = loss_rising and lm - seq[0] > math.log10(cfg.growth_factor) and \
                    rises >= 0.8 * cfg.growth_steps and (
                        phase == "loss" or m >= cfg.spike_floor * top.get(phase, 0.0))
            if self._fire("growth", site, cond):
                out.append(Finding(site, row, "growth", growth_detail(
                    name, m, lm, seq[0], cfg.growth_steps, rises)))
            # vanishing gradient
            if phase == "grad":
                tiny = _TINY.get(getattr(site, "dtype", None), _TINY[torch.float32])
                collapsed = row[_ABSMAX] < tiny or (
                    med is not None and lm - med < math.log10(cfg.vanish_ratio))
                n = self._count("vanishing", site, collapsed and not converged)
                if self._fire("vanishing", site, n >= cfg.vanish_steps):
                    out.append(Finding(site, row, "vanishing",
                                       vanishing_detail(m, lm, med, loss_now, n)))
            hist.append(lm)
        return [] if bad else out

    def _frozen(self, site, row: list, out: List[Finding]) -> None:
        key = (site.module, site.name, site.role)
        prev = self._prev_param.get(key)
        self._prev_param[key] = row
        live = self._grad_live.pop(key, False)  # the gradient of this very step
        cond = prev is not None and prev == row and live
        n = self._count("frozen", site, cond)
        if self._fire("frozen", site, n >= self.config.frozen_steps):
            out.append(Finding(site, row, "frozen", frozen_detail(n)))
