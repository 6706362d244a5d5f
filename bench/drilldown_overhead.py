#!/usr/bin/env python
"""Sync-mode step time with and without the drill-down (issue 15), interleaved in one run.

Variants, each on its own model copy and optimizer:

  none        no monitoring
  sync        ``healthmon.watch(model, sync=True)``: drill-down on (weak references to the root
              inputs + RNG state per step, the current call per module, the loss-side gradient
              probe before every backward)
  sync-plain  the same monitor with the drill-down detached (``mon._drill = None``, backward
              wrappers removed): sync mode as it was before issue 15

Rounds interleave the variants (rotating order); the table gives the median of per-round
ratios. Ratios only: the machine is shared and noisy. The last column is robust to that
noise: the time spent inside the drill-down's own per-step calls (``root_call``,
``forward_call``, the backward wrapper's probe), as a fraction of the sync step, measured on
extra steps of the sync variant.

    python bench/drilldown_overhead.py --models mlp,transformer --rounds 7 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402
import models as M  # noqa: E402

import healthmon  # noqa: E402
from healthmon import drilldown  # noqa: E402

VARIANTS = ("none", "sync", "sync-plain")


class Runner:
    def __init__(self, variant: str, spec: M.BenchModel):
        self.variant, self.spec = variant, spec
        self.model = copy.deepcopy(spec.model).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.lr, momentum=0.9)
        self.mon = None
        if variant != "none":
            self.mon = healthmon.watch(self.model, sync=True)
            self.drill = self.mon._drill
            drilldown.uninstall(self.drill)  # installed while this variant steps only
            if variant == "sync-plain":
                self.mon._drill = None

    def enter(self):
        if self.variant == "sync":
            drilldown.install(self.drill)

    def leave(self):
        if self.variant == "sync":
            drilldown.uninstall(self.drill)

    def step(self):
        out = self.model(*self.spec.inputs)
        loss = self.spec.loss_fn(out, self.spec.target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,transformer")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--target-s", type=float, default=0.3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device("cpu")
    print(f"torch {torch.__version__}, cpu, {args.threads} thread(s), {args.rounds} rounds")
    print(f"{'model':<12} {'sync/none':>10} {'plain/none':>11} {'sync/plain':>11} "
          f"{'drill work':>11}")
    for name in args.models.split(","):
        spec = M.build(name, dev, tiny=args.tiny)
        runners = {v: Runner(v, spec) for v in VARIANTS}
        inner = {}
        for v, r in runners.items():
            r.enter()
            for _ in range(2):
                r.step()
            inner[v] = T.calibrate_inner(r.step, dev, args.target_s)
            r.leave()
        res = T.Result(list(VARIANTS), "none")
        for k in range(args.rounds):
            order = VARIANTS[k % 3:] + VARIANTS[:k % 3]
            for v in order:
                r = runners[v]
                r.enter()
                try:
                    res.samples.setdefault(v, []).append(T.time_block(r.step, inner[v], dev))
                finally:
                    r.leave()
        work = account(runners["sync"], inner["sync"])
        for r in runners.values():
            if r.mon is not None:
                r.mon._drill = r.drill
                r.mon.remove()
        print(f"{name:<12} {res.ratio('sync'):>10.3f} {res.ratio('sync-plain'):>11.3f} "
              f"{res.ratio('sync', 'sync-plain'):>11.3f} {work:>10.2%}")


def account(runner: Runner, steps: int) -> float:
    """Fraction of a sync step spent in the drill-down's per-step calls."""
    spent = [0.0]
    saved = {}

    def timed(fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t
        return inner
    for name in ("root_call", "forward_call", "forward_done"):
        saved[name] = getattr(drilldown.Drilldown, name)
        setattr(drilldown.Drilldown, name, timed(saved[name]))
    saved["_probe"] = drilldown._probe
    drilldown._probe = timed(drilldown._probe)
    runner.enter()
    try:
        t = time.perf_counter()
        for _ in range(max(steps, 3)):
            runner.step()
        total = time.perf_counter() - t
    finally:
        runner.leave()
        drilldown._probe = saved.pop("_probe")
        for name, fn in saved.items():
            setattr(drilldown.Drilldown, name, fn)
    return spent[0] / total


if __name__ == "__main__":
    main()
