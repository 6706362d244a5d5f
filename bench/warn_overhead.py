"""Cost of the early warnings: training-step time with ``warn=True`` / ``warn=False``.

Interleaved repetitions in one run (the ratio is the figure; absolute CPU times are noisy),
on the tiny models of tests/_warn_models.py (these are the worst case: the rules cost is
per record, in Python, so small models with many sites pay the most relative to compute).
Also the time of ``Rules.evaluate`` itself: its share of a run's wall time (the steadier
figure on a shared machine), per step and per row.

    PYTHONPATH=.:tests .venv/bin/python bench/warn_overhead.py
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

import _warn_models as W  # noqa: E402
from healthmon import rules as R  # noqa: E402


def timed(fn, warn, steps):
    t = time.perf_counter()
    fn(steps=steps, watch_kwargs={"warn": warn})
    return time.perf_counter() - t


def main(reps: int = 5, steps: int = 60):
    torch.set_num_threads(1)
    calls = []
    original = R.Rules.evaluate

    def evaluate(self, step, rows):  # measure the rules alone
        t = time.perf_counter()
        out = original(self, step, rows)
        calls.append((time.perf_counter() - t, len(rows)))
        return out
    print(f"{'model':<15} {'warn on / off':>14} {'rules share':>12} {'rules ms/step':>14} "
          f"{'us/row':>7}")
    for name in ("transformer_lm", "cnn_bn", "bf16_relu"):
        fn = W.HEALTHY[name]
        timed(fn, True, 5)  # warm-up
        on, off = [], []
        for _ in range(reps):
            off.append(timed(fn, False, steps))
            on.append(timed(fn, True, steps))
        calls.clear()
        R.Rules.evaluate = evaluate
        t = time.perf_counter()
        fn(steps=steps)
        total = time.perf_counter() - t
        R.Rules.evaluate = original
        per_step = statistics.median(c[0] for c in calls) * 1e3
        per_row = sum(c[0] for c in calls) / max(1, sum(c[1] for c in calls)) * 1e6
        share = sum(c[0] for c in calls) / total
        print(f"{name:<15} {statistics.median(on) / statistics.median(off):>13.3f}x "
              f"{share:>11.1%} {per_step:>14.3f} {per_row:>7.2f}")


if __name__ == "__main__":
    main()
