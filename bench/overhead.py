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
(absolute times only on a GPU). The monitor's loss guard is process-wide, so each step hands
it to the monitor of the variant being stepped (as if each variant ran alone). A detection
matrix then injects NaN / Inf into a forward output, an activation gradient and a parameter
gradient of a small model and records which variant notices and where the monitor says the
value came from, so the comparison is fair about what each variant actually checks.

    python bench/overhead.py                          # CPU: mlp, unet, transformer
    python bench/overhead.py --device cuda            # GPU: gpt2, resnet50 (bf16 autocast)
    python bench/overhead.py --models transformer --rounds 5 --json bench/results/o.json
    python bench/overhead.py --threads 1 ...          # one torch thread (shared machines)
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
from healthmon import labels as hm_labels  # noqa: E402
from healthmon.errors import HealthError  # noqa: E402
import models as M  # noqa: E402
from kernel_bench import naive_stats  # noqa: E402

VARIANTS = ("none", "async", "sync", "anomaly", "naive", "off")
LETTER = dict(zip(VARIANTS, "abcdef"))

# What each variant checks (the fairness column of the table).
CHECKS = {
    "none": "nothing",
    "async": "NaN, +Inf, -Inf, zeros, finite min/max/sum/sumsq/absmax of the model inputs, "
             "every module output, output gradient, parameter gradient and (after the "
             "optimizer step) every parameter, plus cross_entropy labels; reported at the step "
             "boundary, no host sync",
    "sync": "same records as async; each checked inside its hook (raises at the producing "
            "line)",
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


# The monitor's loss guard (label check of cross_entropy / nll_loss targets) is process-wide:
# it wraps torch's loss entry points and hands every call to the most recently created live
# monitor. A real job has one monitor; here up to two (async, sync) live side by side, so
# without this every variant's loss -- the baseline's included -- would be label-checked by
# the sync monitor (a host sync per step on a GPU). Each step therefore gives the guard to
# the monitor of the variant being stepped, and to nobody for the other variants.
_LIVE_MONITORS: List[object] = []


def _own_loss_guard(mon) -> None:
    for m in _LIVE_MONITORS:
        if m is not mon:
            hm_labels.uninstall_loss_guard(m)
    if mon is not None and mon.active:
        hm_labels.install_loss_guard(mon)


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
        self.error: Optional[BaseException] = None  # what finish() caught
        if variant in ("async", "sync", "off"):
            self.mon = _watch(self.model, variant)
            if self.mon.active:
                _LIVE_MONITORS.append(self.mon)
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
        _own_loss_guard(self.mon)
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
        _own_loss_guard(self.mon)
        try:
            _call(self.mon, "check")
        except Exception as exc:
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.error = exc
        _call(self.mon, "remove")
        if self.mon in _LIVE_MONITORS:
            _LIVE_MONITORS.remove(self.mon)
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
    """Identity forward; the backward writes ``value`` into the first gradient element."""

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
    """``x * scale`` (``scale`` a parameter of ones); optionally writes a NaN / Inf into its
    output (forward), into the gradient of its input (backward: the gradient of the previous
    module's output), or into the gradient of ``scale`` only (param grad: every activation
    gradient stays finite)."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.fwd_value: Optional[float] = None
        self.bwd_value: Optional[float] = None
        self.param_value: Optional[float] = None

    def forward(self, x):
        if self.bwd_value is not None:
            x = _GradInject.apply(x, self.bwd_value)
        scale = self.scale
        if self.param_value is not None:
            scale = _GradInject.apply(scale, self.param_value)
        x = x * scale
        if self.fwd_value is not None:
            x = x.clone()
            x.view(-1)[0] = self.fwd_value
        return x


DETECTION_CASES = {
    "forward NaN": ("fwd", math.nan), "forward Inf": ("fwd", math.inf),
    "backward NaN": ("bwd", math.nan), "backward Inf": ("bwd", math.inf),
    "param grad NaN": ("param", math.nan), "param grad Inf": ("param", math.inf),
}

# The exception by which each variant reports a bad value; anything else is a failure of
# the variant (a crash is not a detection).
_DETECTS_WITH = {"async": HealthError, "sync": HealthError, "off": HealthError,
                 "anomaly": RuntimeError, "naive": FloatingPointError}


def _detected(variant: str, exc: BaseException) -> bool:
    kind = _DETECTS_WITH.get(variant)
    if kind is None or not isinstance(exc, kind):
        return False
    return variant != "anomaly" or "nan" in str(exc).lower()


def _describe(exc: BaseException) -> Optional[dict]:
    """Where a HealthError says the bad tensor came from."""
    a = getattr(exc, "anomaly", None)
    if a is None:
        return None
    return {"site": a.site, "phase": a.phase, "role": a.role, "kind": a.kind,
            "module_type": a.module_type, "step": a.step,
            "stack_tail": [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}"
                           for f in a.stack[-2:]]}


def detection_matrix(device: torch.device, variants: Sequence[str]) -> dict:
    """Which variant notices a NaN / +Inf written into a forward output, an activation
    gradient or a parameter gradient of a small probe model, and where it says so.

    Returns ``{variant: {case: {"verdict": str, "where": dict or None}}}``; verdicts start
    with ``detected`` (in which phase of the step, or at the final ``mon.check()``),
    ``not detected`` or ``error`` (the variant failed with an unexpected exception).
    """
    out: Dict[str, Dict[str, dict]] = {}
    for v in variants:
        out[v] = {}
        for case, (where, value) in DETECTION_CASES.items():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(8, 16), Inject(16), nn.Tanh(), nn.Linear(16, 4))
            spec = M.BenchModel("probe", model, (torch.randn(4, 8, device=device),),
                                torch.randint(0, 4, (4,), device=device),
                                nn.functional.cross_entropy, None, 1e-3, "probe")
            model.to(device)
            try:
                r = Runner(v, spec, device)
                r.step()  # one clean step first
            except Exception as exc:
                out[v][case] = {"verdict": f"error: setup failed: {type(exc).__name__}: {exc}",
                                "where": None}
                continue
            inj = r.model[1]
            setattr(inj, {"fwd": "fwd_value", "bwd": "bwd_value",
                          "param": "param_value"}[where], value)
            verdict, exc = "not detected", None
            try:
                r.step()
                T.sync(device)
                err = r.finish()
                if err:
                    exc = r.error
                    verdict = "detected at check: " + err[:160]
            except Exception as e:  # raised inside the step
                exc = e
                verdict = (f"detected in {r.phase}: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:160] if str(e) else ''}")
                try:
                    r.finish()
                except Exception:
                    pass
            if exc is not None and not _detected(v, exc):
                verdict = "error: " + verdict.split(": ", 1)[1]
            out[v][case] = {"verdict": verdict, "where": _describe(exc) if exc else None}
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
        n = len(DETECTION_CASES)
        for v in ("async", "sync"):
            if v not in detect:
                continue
            verdicts = [r["verdict"] for r in detect[v].values()]
            name = f"{v}: detects NaN and Inf in forward, backward and param grads"
            if all(x.startswith("error: setup failed") for x in verdicts):
                out.append({"target": name, "wanted": f"{n} / {n}", "measured": "-",
                            "status": "NOT RUN"})
            else:
                got = sum(x.startswith("detected") for x in verdicts)
                add(name, f"{n} / {n}", f"{got} / {len(verdicts)}", got == len(verdicts))
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
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice, one per core)")
    p.add_argument("--json", default=None,
                   help="write all results to this path (e.g. bench/results/overhead_cpu.json)")
    p.add_argument("--allow-reference", action="store_true",
                   help="run on the float64 reference fallback (numbers marked REFERENCE)")
    args = p.parse_args(argv)

    device = T.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = T.require_native(device, args.allow_reference)
    # NaiveHooks on modules whose inputs need no grad (the first layer): expected, not news.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
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
        print("\nDetection matrix (one NaN / +Inf written into a forward output, an activation "
              "gradient or a parameter gradient of a small probe model; 'opt.step' = the "
              "optimizer's step hook, the monitor's step boundary):\n")
        cases = list(DETECTION_CASES)
        print(T.fmt_table(["variant"] + cases,
                          [[f"({LETTER[v]}) {v}"] + [_short(detect[v][c]["verdict"])
                                                     for c in cases] for v in detect]))
        named = [[f"({LETTER[v]}) {v}", c, _where(r["where"])]
                 for v in detect for c, r in detect[v].items() if r["where"]]
        if named:
            print("\nWhat healthmon names (site / phase / role; last stack frame):\n")
            print(T.fmt_table(["variant", "case", "reported as"], named))
        errors = [(v, c, r["verdict"]) for v in detect for c, r in detect[v].items()
                  if r["verdict"].startswith("error")]
        for v, c, e in errors:
            print(f"  ERROR ({LETTER[v]}) {v} / {c}: {e}")
    print("\nTargets (issue 5):")
    print(T.fmt_table(["target", "wanted", "measured", "status"],
                      [[t["target"], t["wanted"], t["measured"], t["status"]]
                       for t in targets]))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"benchmark": "overhead", "machine": info, "ops_path": path,
                       "args": vars(args), "models": results, "checks": CHECKS,
                       "detection": detect, "targets": targets}, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


_PHASE = {"forward": "forward", "backward": "backward", "optimizer": "opt.step",
          "step boundary": "mon.step()"}


def _short(verdict: str) -> str:
    if verdict.startswith("detected at check"):
        return "yes (at mon.check())"
    if verdict.startswith("detected in "):
        phase = verdict[len("detected in "):].split(":")[0]
        return f"yes (raised in {_PHASE.get(phase, phase)})"
    if verdict.startswith("error"):
        return "ERROR (see below)"
    return verdict


def _where(w: dict) -> str:
    frame = w["stack_tail"][-1] if w.get("stack_tail") else "-"
    return (f"{w['site']} [{w['module_type'] or '-'}] / {w['phase']} / {w['role']} "
            f"({w['kind']}; {frame})")


if __name__ == "__main__":
    sys.exit(main())
