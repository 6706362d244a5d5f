#!/usr/bin/env python
"""Training-step overhead of healthmon against not monitoring and against the alternatives.

Variants (each on its own copy of the model and optimizer, hooks attached for the whole run):

  a  none       no monitoring
  b  async      ``healthmon.watch(model, sync=False)`` (the default mode) + ``mon.step()``
  c  sync       ``healthmon.watch(model, sync=True)``
  d  anomaly    ``torch.autograd.detect_anomaly(check_nan=True)`` around forward + backward
  e  naive      Python hooks computing the same statistics with plain torch and one
                ``.tolist()`` per tensor (the wandb.watch / Lightning ``grad_norm`` pattern)
  f  off        ``healthmon.watch(model)`` with ``HEALTHMON=off`` (must equal (a))

Steps of every variant are interleaved round by round (A B C D E F, then B C D E F A, ...)
after a warm-up; the table reports the median step time ratio to (a) measured in the same run
(absolute times only on a GPU). A detection matrix then injects NaN / Inf into one forward
output and one gradient of a small model and records which variant notices, so the
comparison is fair about what each variant actually checks.

    python bench/overhead.py                          # CPU: mlp, unet, transformer
    python bench/overhead.py --device cuda            # GPU: gpt2, resnet50 (bf16 autocast)
    python bench/overhead.py --models transformer --rounds 5 --json /tmp/o.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

import _timing as T  # noqa: E402  (bench/ is sys.path[0] when run as a script)

import healthmon  # noqa: E402
import models as M  # noqa: E402
from kernels import naive_stats  # noqa: E402

VARIANTS = ("none", "async", "sync", "anomaly", "naive", "off")
LETTER = dict(zip(VARIANTS, "abcdef"))

# What each variant checks (the fairness column of the table).
CHECKS = {
    "none": "nothing",
    "async": "NaN, +Inf, -Inf, zeros, finite min/max/sum/sumsq/absmax of every module output, "
             "output gradient and parameter gradient; reported at the step boundary, no sync",
    "sync": "same statistics as async; checked inside each hook (raises at the producing line)",
    "anomaly": "NaN only (not Inf) in the outputs of every backward function; forward values "
               "are not checked (it records forward stacks)",
    "naive": "same statistics as healthmon (plain-torch composite) on the same tensors; one "
             "host sync (.tolist()) per tensor",
    "off": "nothing (HEALTHMON=off turns watch() into a no-op)",
}


# --------------------------------------------------------------------------- naive hooks

class NaiveHooks:
    """What a user writes without healthmon: module forward / full-backward hooks and
    parameter post-accumulate-grad hooks, each computing the statistics with plain torch
    and pulling them to the host with one ``.tolist()`` per tensor, then checking them."""

    def __init__(self, model: nn.Module):
        self.handles = []
        self.seen = 0
        for name, mod in model.named_modules():
            name = name or "<root>"
            self.handles.append(mod.register_forward_hook(self._fwd(name)))
            self.handles.append(mod.register_full_backward_hook(self._bwd(name)))
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(self._grad(name)))

    def _check(self, t, where: str) -> None:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            rec = naive_stats(t.detach()).tolist()
            self.seen += 1
            if rec[1] or rec[2] or rec[3]:
                raise FloatingPointError(f"naive hooks: non-finite values in {where} "
                                         f"(nan={rec[1]:.0f} +inf={rec[2]:.0f} "
                                         f"-inf={rec[3]:.0f})")

    def _each(self, out, where):
        if isinstance(out, torch.Tensor):
            self._check(out, where)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                self._each(o, f"{where}[{i}]")
        elif isinstance(out, dict):
            for k, o in out.items():
                self._each(o, f"{where}[{k!r}]")

    def _fwd(self, name):
        return lambda mod, inp, out: self._each(out, f"{name} forward output")

    def _bwd(self, name):
        def hook(mod, grad_input, grad_output):
            self._each(grad_output, f"{name} grad_output")
        return hook

    def _grad(self, name):
        return lambda p: self._check(p.grad, f"{name}.grad")

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


# --------------------------------------------------------------------------- variants

@contextlib.contextmanager
def healthmon_env(value: Optional[str]):
    """Set (or clear) the HEALTHMON environment variable for the duration of the block."""
    old = os.environ.get("HEALTHMON")
    if value is None:
        os.environ.pop("HEALTHMON", None)
    else:
        os.environ["HEALTHMON"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HEALTHMON", None)
        else:
            os.environ["HEALTHMON"] = old


def _watch(model: nn.Module, mode: str):
    if mode == "async":
        with healthmon_env(None):
            return healthmon.watch(model, sync=False)
    if mode == "sync":
        with healthmon_env(None):
            return healthmon.watch(model, sync=True)
    if mode == "off":
        with healthmon_env("off"):
            return healthmon.watch(model)
    raise ValueError(mode)


def _call(obj, name: str) -> None:
    fn = getattr(obj, name, None) if obj is not None else None
    if callable(fn):
        fn()


class Runner:
    """One variant: its own model copy, optimizer, and monitoring; ``step()`` = one step."""

    def __init__(self, variant: str, spec: M.BenchModel, device: torch.device):
        self.variant = variant
        self.spec = spec
        self.device = device
        self.model = copy.deepcopy(spec.model)
        self.model.train()
        if device.type == "cuda":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=spec.lr)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.lr, momentum=0.9)
        self.mon = None
        self.hooks = None
        self.phase: Optional[str] = None  # where the current step is (for the detection matrix)
        if variant in ("async", "sync", "off"):
            self.mon = _watch(self.model, variant)
        elif variant == "naive":
            self.hooks = NaiveHooks(self.model)

    def _amp(self):
        if self.spec.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.spec.amp_dtype)

    def _fwd_bwd(self):
        self.phase = "forward"
        with self._amp():
            out = self.model(*self.spec.inputs)
            loss = self.spec.loss_fn(out, self.spec.target)
        self.phase = "backward"
        loss.backward()
        return loss

    def step(self):
        if self.variant == "anomaly":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.autograd.detect_anomaly(check_nan=True):
                    loss = self._fwd_bwd()
        else:
            loss = self._fwd_bwd()
        self.phase = "optimizer"
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.phase = "step boundary"
        if self.mon is not None:
            _call(self.mon, "step")
        self.phase = None
        return loss

    def finish(self) -> Optional[str]:
        """Flush the monitor (raises on an anomaly) and detach everything; error text or None."""
        err = None
        try:
            _call(self.mon, "check")
        except Exception as exc:
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _call(self.mon, "remove")
        if self.hooks is not None:
            self.hooks.remove()
        return err


def bench_model(name: str, device: torch.device, args) -> dict:
    spec = M.build(name, device, tiny=args.tiny, batch=args.batch)
    print(f"\n[{name}] {spec.description}, {spec.params / 1e6:.2f} M parameters", flush=True)
    runners: Dict[str, Runner] = {}
    setup_errors: Dict[str, str] = {}
    for v in args.variants:
        try:
            runners[v] = Runner(v, spec, device)
        except Exception as exc:
            setup_errors[v] = f"{type(exc).__name__}: {exc}"
            print(f"  ({LETTER[v]}) {v}: cannot set up: {setup_errors[v]}", flush=True)
    base = "none" if "none" in runners else next(iter(runners))
    inner = None
    if args.steps_per_sample:
        inner = {v: args.steps_per_sample for v in runners}
    else:
        # One step count for every variant (calibrated on the baseline) keeps samples paired.
        T.sync(device)
        runners[base].step()
        n = T.calibrate_inner(runners[base].step, device, args.target_s, max_inner=50)
        inner = {v: n for v in runners}
    res = T.interleaved({v: r.step for v, r in runners.items()}, baseline=base,
                        device=device, rounds=args.rounds, warmup=args.warmup, inner=inner,
                        budget_s=args.budget_s)
    finish = {v: r.finish() for v, r in runners.items()}
    sync_check = None
    if device.type == "cuda" and "async" in args.variants and not args.no_sync_check:
        sync_check = check_no_host_sync(spec, device)
    out = {"model": name, "description": spec.description, "params": spec.params,
           "amp_dtype": str(spec.amp_dtype) if spec.amp_dtype else None,
           "steps_per_sample": inner[base] if inner else None, "timing": res.as_dict(),
           "setup_errors": setup_errors, "run_errors": res.errors,
           "anomalies_at_end": {v: e for v, e in finish.items() if e},
           "sync_check": sync_check, "variants": {}}
    for v in args.variants:
        out["variants"][v] = {
            "letter": LETTER[v], "median_s": res.median(v) if v in runners else None,
            "ratio": res.ratio(v) if v in runners else None,
            "iqr_rel": res.spread(v) if v in runners else None,
            "error": setup_errors.get(v) or res.errors.get(v), "checks": CHECKS[v]}
    print(model_table(out, device), flush=True)
    del runners
    return out


# --------------------------------------------------------------------------- GPU sync check

def check_no_host_sync(spec: M.BenchModel, device: torch.device) -> dict:
    """Run one monitored async step under ``torch.cuda.set_sync_debug_mode("error")``."""
    result = {}
    for v in ("none", "async"):
        r = Runner(v, spec, device)
        r.step()
        r.step()
        torch.cuda.synchronize()
        try:
            torch.cuda.set_sync_debug_mode("error")
            r.step()
            result[v] = "no host sync"
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            where = next((f"{fr.filename}:{fr.lineno}" for fr in reversed(tb)
                          if "healthmon" in fr.filename), f"{tb[-1].filename}:{tb[-1].lineno}")
            result[v] = f"SYNC at {where}: {str(exc).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            r.finish()
    if result.get("none") != "no host sync":
        result["verdict"] = "inconclusive (the unmonitored step itself synchronises)"
    else:
        result["verdict"] = "PASS" if result.get("async") == "no host sync" else "FAIL"
    return result


# --------------------------------------------------------------------------- detection

class _GradInject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.view(-1)[0] = ctx.value
        return g, None


class Inject(nn.Module):
    """Identity; optionally writes a NaN / Inf into its output, or into its input gradient."""

    def __init__(self):
        super().__init__()
        self.fwd_value: Optional[float] = None
        self.bwd_value: Optional[float] = None

    def forward(self, x):
        if self.fwd_value is not None:
            x = x.clone()
            x.view(-1)[0] = self.fwd_value
        if self.bwd_value is not None:
            x = _GradInject.apply(x, self.bwd_value)
        return x


def detection_matrix(device: torch.device, variants: Sequence[str]) -> dict:
    """Which variant notices a NaN / +Inf written into a forward output or a gradient."""
    cases = {"forward NaN": ("fwd", math.nan), "forward Inf": ("fwd", math.inf),
             "backward NaN": ("bwd", math.nan), "backward Inf": ("bwd", math.inf)}
    out: Dict[str, Dict[str, str]] = {}
    for v in variants:
        out[v] = {}
        for case, (where, value) in cases.items():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), Inject(), nn.Tanh(), nn.Linear(16, 4))
            spec = M.BenchModel("probe", model, (torch.randn(4, 8, device=device),),
                                torch.randint(0, 4, (4,), device=device),
                                nn.functional.cross_entropy, None, 1e-3, "probe")
            model.to(device)
            try:
                r = Runner(v, spec, device)
            except Exception as exc:
                out[v][case] = f"setup failed: {type(exc).__name__}"
                continue
            r.step()  # one clean step first
            inj = r.model[1]
            if where == "fwd":
                inj.fwd_value = value
            else:
                inj.bwd_value = value
            verdict = "not detected"
            try:
                r.step()
                T.sync(device)
                err = r.finish()
                if err:
                    verdict = "detected at check: " + err[:120]
            except Exception as exc:
                verdict = (f"detected in {r.phase}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:120]}")
                try:
                    r.finish()
                except Exception:
                    pass
            out[v][case] = verdict
    return out


# --------------------------------------------------------------------------- report

def _ratio(r) -> str:
    return "-" if r is None or (isinstance(r, float) and math.isnan(r)) else f"{r:.3f}x"


def _pct(r) -> str:
    return "-" if r is None or (isinstance(r, float) and math.isnan(r)) else \
        f"{100 * (r - 1):+.1f}%"


def model_table(m: dict, device: torch.device) -> str:
    headers = ["variant", "step / (a)", "overhead", "noise (IQR)"]
    if device.type == "cuda":
        headers.insert(1, "median step")
    rows = []
    for v, d in m["variants"].items():
        label = f"({d['letter']}) {v}"
        if d["error"]:
            rows.append([label] + (["-"] if device.type == "cuda" else []) +
                        ["-", f"error: {d['error'][:60]}", "-"])
            continue
        line = [label, _ratio(d["ratio"]), _pct(d["ratio"]),
                "-" if d["iqr_rel"] is None or math.isnan(d["iqr_rel"])
                else f"{100 * d['iqr_rel']:.1f}%"]
        if device.type == "cuda":
            line.insert(1, f"{d['median_s'] * 1e3:.2f} ms")
        rows.append(line)
    return T.fmt_table(headers, rows)


def evaluate_targets(results: List[dict], detect: Optional[dict], device: torch.device):
    out = []

    def add(name, wanted, measured, ok):
        out.append({"target": name, "wanted": wanted, "measured": measured,
                    "status": "PASS" if ok else "MISS"})

    def var(model, v):
        m = next((r for r in results if r["model"] == model), None)
        return None if m is None else m["variants"].get(v, {}).get("ratio")

    if device.type == "cpu":
        a, d = var("transformer", "async"), var("transformer", "anomaly")
        if a is not None:
            add("CPU transformer: async overhead", "<= 10%", _pct(a), a <= 1.10)
            if d is not None:
                add("CPU transformer: async below detect_anomaly", f"< {_pct(d)}", _pct(a),
                    a < d)
    else:
        a, s = var("gpt2", "async"), var("gpt2", "sync")
        if a is not None:
            add("GPU GPT-2-small: async overhead", "<= 2%", _pct(a), a <= 1.02)
        if s is not None:
            add("GPU GPT-2-small: sync overhead", "<= 25%", _pct(s), s <= 1.25)
    off = [(r["model"], var(r["model"], "off")) for r in results]
    for model, o in off:
        if o is not None:
            noise = next(r for r in results if r["model"] == model)["variants"]["none"]["iqr_rel"]
            tol = max(0.02, 2 * (noise or 0))
            add(f"{model}: HEALTHMON=off equals (a)", f"within noise (+-{100 * tol:.0f}%)",
                _pct(o), abs(o - 1) <= tol)
    if detect:
        for v in ("async", "sync"):
            if v in detect and all(r.startswith("setup failed") for r in detect[v].values()):
                out.append({"target": f"{v}: detects NaN and Inf in forward and backward",
                            "wanted": "4 / 4", "measured": "-", "status": "NOT RUN"})
            elif v in detect:
                got = [c for c, r in detect[v].items() if r.startswith("detected")]
                add(f"{v}: detects NaN and Inf in forward and backward", "4 / 4",
                    f"{len(got)} / {len(detect[v])}", len(got) == len(detect[v]))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--models", default=None,
                   help=f"comma list of {', '.join(M.ALL_MODELS)} (default: the CPU set on "
                        "CPU, the GPU set on CUDA)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--steps-per-sample", type=int, default=None,
                   help="steps per timed sample (default: calibrated to --target-s)")
    p.add_argument("--target-s", type=float, default=0.25, help="seconds per sample")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop a model's rounds after this many seconds (>= 3 rounds)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--tiny", action="store_true", help="tiny models (smoke tests)")
    p.add_argument("--no-detect", action="store_true", help="skip the detection matrix")
    p.add_argument("--no-sync-check", action="store_true",
                   help="skip the CUDA set_sync_debug_mode check")
    p.add_argument("--json", default=None, help="write all results to this path")
    p.add_argument("--allow-reference", action="store_true",
                   help="run on the float64 reference fallback (numbers marked REFERENCE)")
    args = p.parse_args(argv)

    device = T.pick_device(args.device)
    path = T.require_native(device, args.allow_reference)
    # NaiveHooks on modules whose inputs need no grad (the first layer): expected, not news.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    if not hasattr(healthmon, "watch"):
        print("healthmon.watch is not available yet: only variants (a), (d), (e) can run",
              flush=True)
    info = T.machine_info(device)
    print(T.describe_machine(info), flush=True)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r} (choose from {', '.join(VARIANTS)})")
    if "none" not in args.variants:
        args.variants.insert(0, "none")
    names = (args.models.split(",") if args.models
             else list(M.GPU_MODELS if device.type == "cuda" else M.CPU_MODELS))

    results = [bench_model(n.strip(), device, args) for n in names if n.strip()]
    detect = None if args.no_detect else detection_matrix(device, args.variants)
    targets = evaluate_targets(results, detect, device)

    tag = "" if path["native"] else "  [REFERENCE FALLBACK: not the native kernels]"
    print(f"\n## Training-step overhead ({device.type}){tag}\n{T.describe_machine(info)}\n")
    headers = ["model"] + [f"({LETTER[v]}) {v}" for v in args.variants]
    rows = []
    for r in results:
        rows.append([r["model"]] + [
            ("error" if r["variants"][v]["error"] else _ratio(r["variants"][v]["ratio"]))
            for v in args.variants])
    print("Step time relative to (a) no monitoring (median of paired per-round ratios):\n")
    print(T.fmt_table(headers, rows))
    for r in results:
        if r["anomalies_at_end"]:
            print(f"  note: {r['model']}: anomalies reported at the end: {r['anomalies_at_end']}")
        if r["sync_check"]:
            print(f"  {r['model']}: set_sync_debug_mode('error') around one async step: "
                  f"{r['sync_check']['verdict']} ({r['sync_check'].get('async')})")
    print("\nWhat each variant checks:\n")
    print(T.fmt_table(["variant", "checks"], [[f"({LETTER[v]}) {v}", CHECKS[v]]
                                              for v in args.variants]))
    if detect:
        print("\nDetection matrix (one NaN / +Inf written into a forward output or a "
              "gradient of a small probe model):\n")
        cases = list(next(iter(detect.values())).keys())
        print(T.fmt_table(["variant"] + cases,
                          [[f"({LETTER[v]}) {v}"] + [_short(detect[v][c]) for c in cases]
                           for v in detect]))
    print("\nTargets (issue 5):")
    print(T.fmt_table(["target", "wanted", "measured", "status"],
                      [[t["target"], t["wanted"], t["measured"], t["status"]]
                       for t in targets]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "overhead", "machine": info, "ops_path": path,
                       "args": vars(args), "models": results, "checks": CHECKS,
                       "detection": detect, "targets": targets}, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


def _short(verdict: str) -> str:
    if verdict.startswith("detected at check"):
        return "yes (at mon.check())"
    if verdict.startswith("detected in "):
        return f"yes (raised in {verdict[len('detected in '):].split(':')[0]})"
    return verdict


if __name__ == "__main__":
    sys.exit(main())
