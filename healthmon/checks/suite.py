"""``run_all``: every sanity check on one model and batch, with a summary table."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, TextIO

import torch
from torch import nn

from ._common import Batch, CheckResult, OptimizerSpec, split_batch
from .activations import dead_units, nonlinearity
from .data import input_ranges
from .gradients import batch_independence, parameters_update
from .loss import initial_loss, input_dependence, overfit_batch


@dataclass
class SuiteResult:
    """Results of :func:`run_all`: ``ok`` when every check passed."""
    results: List[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failed(self) -> List[CheckResult]:
        return [r for r in self.results if not r.ok]

    def __getitem__(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def table(self) -> str:
        """A fixed-width table: check, status, seconds, one-line summary."""
        rows = [("check", "status", "time", "summary")]
        for r in self.results:
            rows.append((r.name, "ok" if r.ok else "FAIL", f"{r.seconds:.2f}s", r.summary))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = []
        for k, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
            if k == 0:
                lines.append("-" * (sum(widths) + 6 + 40))
        return "\n".join(lines)

    def report(self) -> str:
        """The table followed by the full report of every failed check."""
        parts = [self.table()]
        for r in self.failed:
            parts.append(f"\n{r.name}:\n{r.report}")
        return "\n".join(parts)

    def raise_if_failed(self) -> "SuiteResult":
        if not self.ok:
            raise AssertionError("healthmon.checks.run_all failed:\n" + self.report())
        return self


def _first_in_channels(model: nn.Module) -> Optional[int]:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return None
    return None


def run_all(model: nn.Module, batch: Batch, loss_fn: Callable,
            num_classes: Optional[int] = None, optimizer_factory: OptimizerSpec = None,
            overfit_steps: int = 150, expect_frozen: Iterable[str] = (),
            skip: Iterable[str] = (), print_table: bool = True,
            file: Optional[TextIO] = None) -> SuiteResult:
    """Run the whole sanity-check suite on ``model`` and one small ``batch``.

    Checks, in order: ``input_ranges``, ``initial_loss`` (only with ``num_classes``),
    ``nonlinearity``, ``batch_independence``, ``dead_units``, ``parameters_update``,
    ``overfit_batch``. Each restores the model's state, so the order does not matter.

    Args:
        model: the model; ``model(inputs)`` -> outputs for ``loss_fn``.
        batch: ``(inputs, targets)``: inputs float ``(B, ...)`` on the model's device, a few
            (8 to 64) samples; targets whatever ``loss_fn`` takes (e.g. int64 ``(B,)``).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar float tensor.
        num_classes: for the initial-loss check of a classifier (skipped when None).
        optimizer_factory: ``params -> Optimizer`` (or an optimizer class) for
            ``parameters_update`` and ``overfit_batch``; default Adam.
        overfit_steps: steps of ``overfit_batch``.
        expect_frozen: parameter names / module prefixes meant to be frozen.
        skip: names of checks not to run.
        print_table: print the table (and failed reports) to ``file`` (default stdout).
    Returns:
        :class:`SuiteResult` (``.ok``, ``.results``, ``.table()``, ``suite["overfit_batch"]``).
    """
    inputs, _ = split_batch(batch)
    skip = set(skip)
    factory = optimizer_factory
    if isinstance(factory, torch.optim.Optimizer):
        raise TypeError("healthmon.checks.run_all: pass optimizer_factory as a callable "
                        "params -> Optimizer (e.g. lambda p: torch.optim.Adam(p, lr=1e-3))")
    plan = [
        ("input_ranges", lambda: input_ranges(batch, expected_channels=_first_in_channels(model))),
        ("initial_loss", (lambda: initial_loss(model, batch, loss_fn, num_classes))
         if num_classes is not None else None),
        ("nonlinearity", lambda: nonlinearity(model, inputs)),
        ("batch_independence", lambda: batch_independence(model, inputs)),
        ("dead_units", lambda: dead_units(model, inputs)),
        ("parameters_update", lambda: parameters_update(model, batch, loss_fn, factory,
                                                        expect_frozen=expect_frozen)),
        ("overfit_batch", lambda: overfit_batch(model, batch, loss_fn, steps=overfit_steps,
                                                optimizer=factory)),
        ("input_dependence", lambda: input_dependence(model, batch, loss_fn,
                                                      steps=max(overfit_steps * 2 // 3, 1),
                                                      optimizer=factory)),
    ]
    suite = SuiteResult()
    for name, run in plan:
        if run is None or name in skip:
            continue
        if name in ("nonlinearity", "batch_independence") and not inputs.is_floating_point():
            continue
        suite.results.append(run())
    if print_table:
        print(suite.report(), file=file or sys.stdout)
    return suite
