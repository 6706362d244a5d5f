"""Evidence for the early-warning defaults (healthmon.rules.WarnConfig).

Runs the healthy and degrading training runs of ``tests/_warn_models.py`` with a sink that
keeps every step's rows, and measures, independently of healthmon.rules, the quantity each
rule thresholds: the largest spike ratio (value / median of the site's last 50 records,
after 10), its robust z (log10 distance / (1.4826 MAD)) combined as "joint" = the largest
min(ratio / 10, z / 8) (> 1: the default spike rule fires), the largest 40-record growth
with at least 32 rises (and "+loss up": the same while the loss is 2x above its value 40
records earlier, as the rule requires), the longest all-zero streak, the longest "unchanged parameter with a
non-zero gradient" streak, the smallest gradient-norm / median ratio over 5 records, and
the largest abs-max / dtype max of low-precision sites. Healthy runs give the floor a
threshold must stay above; degrading runs what it must stay below. Also: when each
degrading run's first warning and first non-finite value came.

    PYTHONPATH=.:tests .venv/bin/python bench/warn_evidence.py
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time
from collections import defaultdict, deque

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch  # noqa: E402

import _warn_models as W  # noqa: E402
from healthmon.sinks import MemorySink  # noqa: E402

DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38}


Keep = MemorySink  # (site rows of every decoded step)


def measure(steps, dtypes):
    hist = defaultdict(lambda: deque(maxlen=50))
    zero_streak, frozen_streak, vanish = defaultdict(int), defaultdict(int), defaultdict(list)
    prev_param, grad_live = {}, {}
    loss_hist = []  # log10 |loss|, first loss record of each step
    out = dict(spike=(0.0, None), z=0.0, growth=(1.0, None), growth_rl=(1.0, None),
               dead=(0, None),
               frozen=(0, None), vanish=(1.0, None), headroom=(0.0, None))
    loss_ref = []
    for step, rows in steps:
        train = any(r["phase"] in ("backward", "grad", "loss") for r in rows)
        top = defaultdict(float)  # largest metric of each phase in this step
        for r in rows:
            if r["finite"] == r["numel"] and r["numel"]:
                top[r["phase"]] = max(top[r["phase"]], r["norm"] if r["phase"] in (
                    "grad", "backward") else r["absmax"])
            if r["phase"] == "loss" and len(loss_ref) < 10:
                loss_ref.append(r["absmax"])
        losses = [r["absmax"] for r in rows if r["phase"] == "loss" and r["absmax"] > 0]
        if losses:
            loss_hist.append(math.log10(losses[0]))
        rising = len(loss_hist) <= 40 or statistics.median(loss_hist[-3:]) - \
            statistics.median(loss_hist[-42:-39]) > math.log10(2.0)
        for r in rows:
            key = (r["site"], r["phase"], r["role"], r["call"])
            ph = r["phase"]
            if ph in ("input", "label") or r["finite"] < r["numel"]:
                continue
            if ph == "param":
                pk = (r["site"], r["role"])
                vals = tuple(r[k] for k in ("sum", "sumsq", "min", "max", "absmax"))
                live = grad_live.pop(pk, False)
                same = prev_param.get(pk) == vals and live
                prev_param[pk] = vals
                frozen_streak[pk] = frozen_streak[pk] + 1 if same else 0
                if frozen_streak[pk] > out["frozen"][0]:
                    out["frozen"] = (frozen_streak[pk], (step, *pk))
                continue
            dt = dtypes.get(key)
            if dt in DTYPE_MAX and r["absmax"] / DTYPE_MAX[dt] > out["headroom"][0]:
                out["headroom"] = (r["absmax"] / DTYPE_MAX[dt], (step, *key[:3]))
            if train and (ph == "grad" or (ph == "forward" and r["numel"] >= 2)):
                zero_streak[key] = zero_streak[key] + 1 if r["zeros"] == r["numel"] else 0
                if zero_streak[key] > out["dead"][0]:
                    out["dead"] = (zero_streak[key], (step, *key[:3]))
            if ph == "grad":
                grad_live[(r["site"], r["role"])] = r["zeros"] < r["numel"] and \
                    r["norm"] >= 1e-3 * top["grad"]
            m = r["norm"] if ph in ("grad", "backward") else r["absmax"]
            if not m > 0:
                continue
            lm = math.log10(m)
            h = hist[(key, train)]
            if len(h) >= 10:
                med = statistics.median(h)
                mad = statistics.median(abs(v - med) for v in h)
                ratio = 10 ** (lm - med)
                # as healthmon.rules judges a spike: the loss against a floor of 0.1 x its
                # first values, other sites only when >= 1e-3 x their phase's largest value
                base = max(10 ** med, 0.1 * max(loss_ref)) if ph == "loss" else 10 ** med
                sratio = m / base if (ph == "loss" or m >= 1e-3 * top[ph]) else 0.0
                if sratio > out["spike"][0]:
                    out["spike"] = (sratio, (step, *key[:3]))
                z = (lm - med) / (1.4826 * mad) if mad > 0 else math.inf
                if sratio > 1:
                    out["z"] = max(out["z"], min(sratio / 10, z / 8))
                if ph == "grad":
                    v = vanish[key]
                    v.append(ratio)
                    worst5 = max(v[-5:]) if len(v) >= 5 else 1.0  # 5 records in a row
                    if worst5 < out["vanish"][0]:
                        out["vanish"] = (worst5, (step, *key[:3]))
            if len(h) >= 40:
                seq = list(h)[-40:] + [lm]
                rises = sum(b > a for a, b in zip(seq, seq[1:]))
                g = 10 ** (lm - seq[0])
                if rises >= 32 and g > out["growth"][0]:
                    out["growth"] = (g, (step, *key[:3]))
                if rises >= 32 and rising and g > out["growth_rl"][0]:
                    out["growth_rl"] = (g, (step, *key[:3]))
            h.append(lm)
    return out


def site_dtypes(mon_sites):
    return {(s.name, s.phase, s.role, s.call): str(s.dtype).replace("torch.", "")
            for s in mon_sites}


def main():
    torch.set_num_threads(1)
    import healthmon.monitor as hm
    captured = {}
    original = hm.Monitor.remove

    def remove(self):  # keep each run's site dtypes (the sink rows carry no dtype)
        captured["dtypes"] = site_dtypes(self._sites.values())
        original(self)
    hm.Monitor.remove = remove
    runs = [(n, f, True) for n, f in W.HEALTHY.items()] + [
        (n, getattr(W, "run_" + n), False) for n in (
            "diverging_lr", "fp16_creep", "dead_relu", "head_replaced", "mse_overflow",
            "vanishing", "loss_spike")]
    print(f"{'run':<15} {'steps':>5} {'spike x':>9} {'joint':>6} {'growth x':>9} "
          f"{'+loss up':>9} {'dead':>5} "
          f"{'frozen':>6} {'vanish':>8} {'headroom':>8} | first warning (kind) / first non-finite")
    for name, fn, healthy in runs:
        keep = Keep()
        t = time.perf_counter()
        run = fn(sink=keep)
        m = measure(keep.steps, captured.get("dtypes", {}))
        first = min(run.warnings, key=lambda w: w.step) if run.warnings else None
        fw = f"{first.step} ({first.kind})" if first else "-"
        print(f"{name:<15} {run.steps:>5} {m['spike'][0]:>9.3g} {m['z']:>6.2f} "
              f"{m['growth'][0]:>9.3g} {m['growth_rl'][0]:>9.3g} {m['dead'][0]:>5} "
              f"{m['frozen'][0]:>6} "
              f"{m['vanish'][0]:>8.2g} {m['headroom'][0]:>8.2g} | {fw} / "
              f"{run.first_bad_step if run.first_bad_step is not None else '-'}"
              f"  [{time.perf_counter() - t:.1f} s]")
        if healthy:
            print(f"{'':<15} worst spike at {m['spike'][1]}, growth at {m['growth'][1]}, "
                  f"vanish at {m['vanish'][1]}")


if __name__ == "__main__":
    main()
