#!/usr/bin/env python
"""healthmon under ``torch.compile`` (issue 13): compiled step time and compile time,
unwatched against watched.

Variants, each on its own copy of the model and optimizer (SGD), the model compiled as a
module (``torch.compile(model)``; loss and optimizer step stay eager, as most scripts do):

  eager           no monitoring, not compiled (for scale: what compiling buys)
  compiled        no monitoring, ``torch.compile(model)``
  compiled+async  ``healthmon.watch(model, sync=False)`` then ``torch.compile(model)``

Extra variant (``--variants``):

  compiled+noop   hooks that do nothing where the monitor hooks (``small.NoopHooks``), then
                  ``torch.compile(model)``, with Dynamo guarding on module hooks as while a
                  monitor is attached: the floor of any hook-based monitor under compile

Steady-state step times are interleaved round by round after a warm-up (ratios to
``compiled``, median of the per-round ratios). Compile time is the wall time of the warm-up
steps minus that many steady steps, measured once per variant (not interleaved: it happens
once; on a shared machine take it as a rough figure; with slow, noisy steps it can come out
as 0). Graphs and graph breaks per variant are
counted with Dynamo's counters (``counters["stats"]["unique_graphs"]``,
``counters["graph_break"]``) around each variant's warm-up. Every variant compiles with the
same backend string, as a user's ``torch.compile(model)`` does: a counting backend object per
variant (Dynamo's ``CompileCounterWithBackend``) made the variants' backends unequal, and
the watched model then ran 1.6-2.2x slower than unwatched on the deep stack where it runs
1.2-1.4x with equal backends (measured 2026-12-03; the graphs were the same).

    python bench/compiled.py                                  # transformer + small set, inductor
    python bench/compiled.py --models deep,mlp --backend aot_eager --rounds 5
    python bench/compiled.py --json bench/results/compiled_cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import torch
import torch._dynamo
from torch._dynamo.utils import counters

import _timing as T  # noqa: E402  (bench/ is sys.path[0] when run as a script)

import models as M  # noqa: E402
import overhead as O  # noqa: E402
import small as S  # noqa: E402

VARIANTS = ("eager", "compiled", "compiled+async")
EXTRA_VARIANTS = ("compiled+noop",)
DEFAULT_MODELS = ("transformer",) + M.SMALL_MODELS + ("mlp",)


def build(name: str, tiny: bool) -> M.SmallModel:
    if name in M.SMALL_MODELS:
        return M.build_small(name, torch.device("cpu"), tiny=tiny)
    return M.as_small(M.build(name, torch.device("cpu"), tiny=tiny))


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


class Runner:
    """One variant: its own model copy; ``step()`` = one optimizer step."""

    def __init__(self, variant: str, spec: M.SmallModel, backend: str):
        self.variant = variant
        self.spec = spec
        self.model = copy.deepcopy(spec.model)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.lr)
        self.mon = None
        self.hooks = None
        self.compiled = variant != "eager"
        self.fwd = self.model
        if variant == "compiled+async":
            self.mon = O._watch(self.model, "async")
            O._LIVE_MONITORS.append(self.mon)
        elif variant == "compiled+noop":
            self.hooks = S.NoopHooks(self.model)
        if self.compiled:
            self.fwd = torch.compile(self.model, backend=backend)
        self.compile_s = None
        self.graphs = None
        self.breaks = None
        self.break_reasons = {}

    def step(self):
        O._own_loss_guard(self.mon)
        self.spec.step(self.fwd, self.opt)
        if self.mon is not None:
            O._call(self.mon, "step")

    def warm_up(self, steps: int) -> float:
        """Run the first ``steps`` steps (compilation happens here); their wall time."""
        before = dict(counters["graph_break"])
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        dt = time.perf_counter() - t0
        if self.compiled:
            self.graphs = counters["stats"]["unique_graphs"] - graphs
            after = counters["graph_break"]
            self.break_reasons = {k.splitlines()[0][:160]: v - before.get(k, 0)
                                  for k, v in after.items() if v - before.get(k, 0)}
            self.breaks = sum(self.break_reasons.values())
        return dt

    def finish(self) -> Optional[str]:
        err = None
        O._own_loss_guard(self.mon)
        try:
            O._call(self.mon, "check")
        except Exception as exc:
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        O._call(self.mon, "remove")
        if self.hooks is not None:
            self.hooks.remove()
        if self.mon in O._LIVE_MONITORS:
            O._LIVE_MONITORS.remove(self.mon)
        return err


def bench_model(name: str, args) -> dict:
    spec = build(name, args.tiny)
    print(f"\n[{name}] {spec.description}, {spec.params / 1e6:.3f} M parameters, "
          f"backend {args.backend}", flush=True)
    torch._dynamo.reset()
    if "compiled+noop" in args.variants:
        # what a monitor sets while attached, before any variant compiles: without it the
        # hooked copy runs the unhooked variant's code (one code object per class), unseen
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    runners, warm, errors = {}, {}, {}
    for v in args.variants:  # one after the other: compile counts stay per variant
        try:
            r = Runner(v, spec, args.backend)
            warm[v] = r.warm_up(args.warmup)
            runners[v] = r
        except Exception as exc:
            errors[v] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            print(f"  {v}: failed: {errors[v]}", flush=True)
    for r in runners.values():
        # watch() after the unwatched variant's compiled code ran resets Dynamo's caches (see
        # Monitor._warn_if_compiled): that variant recompiles here, not in a timed round
        r.step()
    base = "compiled" if "compiled" in runners else next(iter(runners))
    if args.steps_per_sample:
        n = args.steps_per_sample
    else:
        n = T.calibrate_inner(runners[base].step, torch.device("cpu"), args.target_s,
                              max_inner=200)
    res = T.interleaved({v: r.step for v, r in runners.items()}, baseline=base,
                        device=torch.device("cpu"), rounds=args.rounds, warmup=0,
                        inner={v: n for v in runners}, budget_s=args.budget_s)
    out = {"model": name, "description": spec.description, "params": spec.params,
           "backend": args.backend, "steps_per_sample": n, "timing": res.as_dict(),
           "setup_errors": errors, "run_errors": res.errors, "variants": {}}
    for v, r in runners.items():
        steady = res.median(v)
        r.compile_s = max(0.0, warm[v] - args.warmup * steady) if steady == steady else None
        out["variants"][v] = {
            "median_s": steady, "ratio": res.ratio(v), "iqr_rel": res.spread(v),
            "ratio_to_eager": res.ratio(v, "eager") if "eager" in runners else None,
            "warmup_s": warm[v], "compile_s": r.compile_s, "graphs": r.graphs,
            "graph_breaks": r.breaks, "break_reasons": r.break_reasons,
            "error": res.errors.get(v)}
    out["anomalies_at_end"] = {v: e for v, r in runners.items() if (e := r.finish())}
    c = out["variants"].get("compiled", {}).get("compile_s")
    for v in out["variants"].values():
        # below 0.5 s the unwatched compile time is lost in step-time noise (or there was no
        # graph at all): a ratio to it would mean nothing
        v["compile_ratio"] = (v["compile_s"] / c) if c and c >= 0.5 and \
            v["compile_s"] is not None else None
    rows = []
    for v, d in out["variants"].items():
        rows.append([v, f"{d['ratio']:.3f}x", f"{100 * d['iqr_rel']:.0f} %",
                     "-" if d["graphs"] is None else d["graphs"],
                     "-" if d["graph_breaks"] is None else d["graph_breaks"],
                     "-" if d["compile_s"] is None or v == "eager" else f"{d['compile_s']:.1f}"])
    print(T.fmt_table(["variant", f"step / {base}", "IQR", "graphs", "breaks", "compile s"],
                      rows), flush=True)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--backend", default="inductor", help="inductor (default), aot_eager, eager")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed first steps per variant (compilation happens here)")
    p.add_argument("--steps-per-sample", type=int, default=None)
    p.add_argument("--target-s", type=float, default=0.2)
    p.add_argument("--budget-s", type=float, default=None)
    p.add_argument("--no-cache", action="store_true",
                   help="disable Inductor's on-disk caches (clean compile times)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--allow-reference", action="store_true")
    args = p.parse_args(argv)

    dev = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = T.require_native(dev, args.allow_reference)
    if args.no_cache:  # otherwise graphs compiled by an earlier run are loaded, not compiled
        import torch._inductor.config as inductor_config
        inductor_config.force_disable_caches = True
    warnings.filterwarnings("ignore")  # Dynamo's per-break warnings would drown the tables
    info = T.machine_info(dev)
    print(T.describe_machine(info), flush=True)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS + EXTRA_VARIANTS:
            p.error(f"unknown variant {v!r} "
                    f"(choose from {', '.join(VARIANTS + EXTRA_VARIANTS)})")
    if "compiled" not in args.variants:
        args.variants.insert(0, "compiled")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    results = [bench_model(n, args) for n in names]

    tag = "" if path["native"] else "  [REFERENCE FALLBACK: not the native kernels]"
    print(f"\n## Compiled step ({args.backend}, {dev.type}){tag}\n{T.describe_machine(info)}\n")
    vs = [v for v in args.variants]
    print("Step time relative to compiled unwatched (median of paired per-round ratios); "
          "graphs / breaks; compile time watched / unwatched:\n")
    rows = []
    for r in results:
        d = r["variants"]
        row = [r["model"]]
        for v in vs:
            row.append("error" if v not in d or d[v]["error"] else f"{d[v]['ratio']:.3f}x")
        for v in ("compiled", "compiled+async"):
            row.append(f"{d[v]['graphs']} / {d[v]['graph_breaks']}" if v in d else "-")
        w = d.get("compiled+async", {}).get("compile_ratio")
        row.append("-" if w is None else f"{w:.2f}x")
        rows.append(row)
    print(T.fmt_table(["model"] + vs + ["graphs/breaks unwatched", "graphs/breaks watched",
                                        "compile time watched/unwatched"], rows))
    targets = []
    for r in results:
        w = r["variants"].get("compiled+async")
        if not w or w["error"]:
            continue
        lim = 1.05 if r["model"] == "transformer" else 1.10
        targets.append([f"{r['model']}: compiled+async / compiled", f"<= {lim:.2f}x",
                        f"{w['ratio']:.3f}x", "PASS" if w["ratio"] <= lim else "MISS"])
        u = r["variants"]["compiled"]
        targets.append([f"{r['model']}: graph breaks added", "0",
                        str((w["graph_breaks"] or 0) - (u["graph_breaks"] or 0)),
                        "PASS" if w["graph_breaks"] == u["graph_breaks"] else "MISS"])
    print("\nTargets (issue 13; timings reported, never asserted in tests):")
    print(T.fmt_table(["target", "wanted", "measured", "status"], targets))
    for r in results:
        w = r["variants"].get("compiled+async")
        if w and w["break_reasons"]:
            print(f"\n{r['model']}: graph-break reasons when watched (first line, count):")
            for k, n in sorted(w["break_reasons"].items(), key=lambda kv: -kv[1])[:6]:
                print(f"  {n:3d} x {k}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"benchmark": "compiled", "machine": info, "ops_path": path,
                       "args": vars(args), "models": results, "targets": targets},
                      f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
