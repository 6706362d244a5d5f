#!/usr/bin/env python
"""A/B of healthmon's Inductor pass (healthmon/compile_pass.py) in one process.

Three copies of a small model, each its own subclass (so Dynamo keeps one compiled entry
each): unwatched, watched and compiled with the record-merging pass, watched and compiled
with the pass taken out of Inductor's config while it compiles. Steps are timed round by
round, interleaved; the table gives medians of the per-round paired ratios.

    python bench/compile_pass_ab.py --model deep --rounds 9
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings

import torch

import models as M  # noqa: E402  (bench/ is sys.path[0] when run as a script)

import healthmon
from healthmon import compile_pass


def variant(spec: M.SmallModel, tag: str, watched: bool, merged: bool):
    """A compiled copy of ``spec.model`` and its step function (compiled in the warm-up)."""
    base = spec.model
    model = copy.deepcopy(base)
    model.__class__ = type(f"{type(base).__name__}_{tag}", (type(base),), {})
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr)
    mon = healthmon.watch(model, sync=False) if watched else None
    fwd = torch.compile(model)

    def step():
        spec.step(fwd, opt)
        if mon is not None:
            mon.step()

    if not merged:
        compile_pass.uninstall()
    try:
        for _ in range(4):  # compiles here
            step()
    finally:
        if not merged:
            compile_pass.install()
    return step, mon


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="deep", choices=M.SMALL_MODELS)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=100, help="steps per round and variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="tiny models (smoke tests)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    spec = M.build_small(args.model, torch.device("cpu"), tiny=args.tiny)
    anchor = healthmon.watch(torch.nn.Linear(1, 1))  # keeps the pass installed throughout
    variants = {"unwatched": variant(spec, "u", False, True),
                "merged": variant(spec, "m", True, True),
                "unmerged": variant(spec, "n", True, False)}
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, (step, _) in variants.items():
            for _ in range(3):
                step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"{args.model}, {args.rounds} rounds x {args.steps} steps, {args.threads} thread(s)")
    print("| variant | ms / step | / unwatched | / unmerged |\n|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.3f} | "
              f"{ratio(name, 'unwatched'):.3f}x | {ratio(name, 'unmerged'):.3f}x |")
    for name, (_, mon) in variants.items():
        if mon is not None:
            mon.check()
            assert not mon.anomalies, mon.anomalies[0].report()
            mon.remove()
    anchor.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
