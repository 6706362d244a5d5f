"""Shared timing helpers of the healthmon benchmarks.

Rules (DESIGN.md, "Rules of the house"): figures are ratios measured in one run, because
benchmark machines are noisy. Every helper here therefore times the variants of one
comparison *interleaved* (A B C A B C ..., with the starting variant rotated every round so
that no variant always runs right after the same neighbour), after a warm-up, and reports the
median per variant plus the median of the per-round ratios to the baseline (a paired
estimate: each ratio compares samples taken seconds apart).

On CUDA a sample is timed with CUDA events around ``inner`` back-to-back calls (after a
``torch.cuda.synchronize``); on CPU with ``time.perf_counter``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as `python bench/x.py` from anywhere, without installing
    sys.path.insert(0, REPO)


# --------------------------------------------------------------------------- device timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def calibrate_inner(fn: Callable[[], object], device: torch.device, target_s: float,
                    max_inner: int = 10_000) -> int:
    """Number of back-to-back calls that makes one sample last about ``target_s``."""
    fn()
    sync(device)
    one = time_block(fn, 1, device)
    if one >= target_s:
        return 1
    n = 1
    while n < max_inner:
        n = min(max_inner, n * 4)
        t = time_block(fn, n, device) * n
        if t >= target_s / 2:
            return max(1, min(max_inner, int(round(n * target_s / max(t, 1e-9)))))
    return max_inner


@dataclass
class Result:
    """Samples (seconds per call) of every variant, and ratios to the baseline."""
    names: List[str]
    baseline: str
    samples: Dict[str, List[float]] = field(default_factory=dict)
    inner: Dict[str, int] = field(default_factory=dict)
    errors: Dict[str, str] = field(default_factory=dict)

    def median(self, name: str) -> float:
        s = self.samples.get(name) or []
        return statistics.median(s) if s else float("nan")

    def spread(self, name: str) -> float:
        """Relative interquartile range of the samples (a noise indicator)."""
        s = sorted(self.samples.get(name) or [])
        if len(s) < 4:
            return float("nan")
        q1, q3 = s[len(s) // 4], s[(3 * len(s)) // 4]
        return (q3 - q1) / statistics.median(s)

    def ratio(self, name: str, to: Optional[str] = None) -> float:
        """Median of the per-round ratios ``name / to`` (paired: same round)."""
        to = to or self.baseline
        a, b = self.samples.get(name) or [], self.samples.get(to) or []
        pairs = [x / y for x, y in zip(a, b) if y > 0]
        return statistics.median(pairs) if pairs else float("nan")

    def as_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "variants": {
                n: {"median_s": self.median(n), "samples_s": self.samples.get(n, []),
                    "inner": self.inner.get(n), "iqr_rel": self.spread(n),
                    "ratio_to_baseline": self.ratio(n), "error": self.errors.get(n)}
                for n in self.names},
        }


def interleaved(variants: Dict[str, Callable[[], object]], *, baseline: str,
                device: torch.device, rounds: int = 7, warmup: int = 2,
                target_s: float = 0.05, inner: Optional[Dict[str, int]] = None,
                max_inner: int = 10_000, budget_s: Optional[float] = None) -> Result:
    """Time every variant, interleaved round by round.

    Args:
        variants: name -> zero-argument callable (one call = one unit of work).
        baseline: the name the ratios are taken against.
        rounds: samples per variant (the median is over these).
        warmup: untimed calls of every variant before the first round.
        target_s: a sample lasts about this long (``inner`` calls are calibrated per variant).
        inner: fixed calls per sample instead of calibrating.
        budget_s: stop after the round in which this many seconds have elapsed (>= 3 rounds).
    """
    names = list(variants)
    res = Result(names=names, baseline=baseline)
    live = {}
    for name, fn in variants.items():
        try:
            for _ in range(warmup):
                fn()
            sync(device)
            res.inner[name] = (inner or {}).get(name) or calibrate_inner(fn, device, target_s,
                                                                         max_inner)
            res.samples[name] = []
            live[name] = fn
        except Exception as exc:  # a variant that cannot run is reported, not fatal
            res.errors[name] = f"{type(exc).__name__}: {exc}"
    t_start = time.perf_counter()
    for r in range(rounds):
        order = [n for n in names if n in live]
        k = r % max(1, len(order))
        order = order[k:] + order[:k]
        gc.collect()
        for name in order:
            res.samples[name].append(time_block(live[name], res.inner[name], device))
        if budget_s is not None and r >= 2 and time.perf_counter() - t_start > budget_s:
            break
    return res


# --------------------------------------------------------------------------- environment

def machine_info(device: torch.device) -> dict:
    """Where and with what the numbers were measured."""
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["gpu"] = p.name
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def describe_machine(info: dict) -> str:
    where = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores, " \
                                f"{info['torch_threads']} torch threads)"
    return (f"{info['date']} | {where} | torch {info['torch']} | python {info['python']}"
            f" | commit {info.get('git_commit')}")


def ops_path(device: torch.device) -> dict:
    """Which implementation of the healthmon ops is in use (native or float64 reference)."""
    from healthmon import ops
    native = ops.extension_available()
    cuda = ops.extension_cuda_available() if native else False
    if not native:
        path = "REFERENCE (float64 pure-torch fallback: NOT the native kernels)"
    elif device.type == "cuda" and not cuda:
        path = "native extension WITHOUT CUDA kernels (CUDA tensors cannot use it)"
    else:
        path = f"native extension ({'CUDA' if device.type == 'cuda' else 'CPU'} kernels)"
    return {"native": native, "native_cuda": cuda, "path": path,
            "load_error": getattr(ops, "_load_error", None)}


def require_native(device: torch.device, allow_reference: bool) -> dict:
    """Print which ops path is in use; exit(2) on the fallback unless allowed."""
    p = ops_path(device)
    print(f"healthmon ops path: {p['path']}", flush=True)
    ok = p["native"] and (device.type != "cuda" or p["native_cuda"])
    if not ok:
        if not allow_reference:
            print("refusing to publish numbers from the reference fallback: build the extension "
                  "(make build, or pip install --no-build-isolation --no-deps -e .) or pass "
                  "--allow-reference (numbers are then marked REFERENCE).", file=sys.stderr)
            sys.exit(2)
        print("WARNING: --allow-reference: every number below measures the slow float64 "
              "reference, not the native kernels.", flush=True)
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False on this machine")
    return dev


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (also readable as plain text)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def human_size(n: int) -> str:
    for unit, div in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= div and n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def parse_size(s: str) -> int:
    s = s.strip()
    mult = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "k": 2**10, "m": 2**20, "g": 2**30}
    low = s.lower()
    for suf in ("ki", "mi", "gi", "k", "m", "g"):
        if low.endswith(suf):
            return int(float(low[: -len(suf)]) * mult[suf])
    return int(s)
