#!/usr/bin/env python
"""Kernel benchmark: the fused healthmon stats against ``x.sum()`` and plain-torch composites.

For sizes from 1 Ki to 256 Mi elements and fp32 / bf16 it times, interleaved in one run:

- ``sum``       ``x.sum()``: one streaming read of the tensor, the practical floor;
- ``fused``     ``healthmon.ops.stats_record(x)``: all eleven statistics in one pass;
- ``composite`` the best plain-torch composite we could write for the same eleven statistics
                (see :func:`composite_stats`: preallocated work buffers, ``count_nonzero``
                instead of bool sums, bf16 staged once to fp32, no host sync);
- ``naive``     the composite a user would write first (:func:`naive_stats`: fresh
                temporaries, ``isnan(x).sum()``, ...), for reference;
- ``compiled``  (``--compiled``) :func:`naive_stats` under ``torch.compile``.

plus the multi-tensor op over 300 gradient-shaped tensors against a loop of single calls.
Prints a table of ratios measured in the same run (``fused/sum``, ``composite/fused``), the
targets of issue 2 with PASS / MISS, and writes everything to JSON (``--json PATH``).
Absolute times are shown only on a GPU (DESIGN.md: figures are ratios; absolute times only
from a GPU); the JSON always has them.

    python bench/kernel_bench.py                        # CPU: 1Ki..64Mi, fp32 + bf16
    python bench/kernel_bench.py --device cuda          # GPU: 1Ki..256Mi
    python bench/kernel_bench.py --max-size 1Mi --rounds 3 --json /tmp/k.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List, Optional, Sequence

import torch

import _timing as T  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from healthmon import ops  # noqa: E402
from healthmon._layout import NUM_STATS, STAT  # noqa: E402

INF = math.inf
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- composites

class Workspace:
    """Preallocated temporaries of :func:`composite_stats` (one bool mask, one float buffer),
    reused across calls so the composite pays no allocation / page-fault cost."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.buf: Optional[torch.Tensor] = None
        self.stage: Optional[torch.Tensor] = None

    def get(self, x: torch.Tensor, acc: torch.dtype):
        n = x.numel()
        if self.mask is None or self.mask.numel() != n or self.mask.device != x.device:
            self.mask = torch.empty(n, dtype=torch.bool, device=x.device)
            self.buf = torch.empty(n, dtype=acc, device=x.device)
            self.stage = torch.empty(n, dtype=acc, device=x.device) if x.dtype != acc else None
        return self.mask, self.buf, self.stage


def _finish(numel: int, nan, posinf, neginf, zeros, mn, mx, s, ss, device) -> torch.Tensor:
    """Assemble one float64 record (layout of healthmon._layout) from 0-dim tensors, no sync."""
    counts = torch.stack([nan, posinf, neginf, zeros]).to(torch.float64)
    finite = numel - counts[:3].sum()
    has = finite > 0
    mn = mn.to(torch.float64)
    mx = mx.to(torch.float64)
    nanv = torch.full((), math.nan, dtype=torch.float64, device=device)
    mn = torch.where(has, mn, nanv)
    mx = torch.where(has, mx, nanv)
    absmax = torch.where(has, torch.maximum(-mn, mx), torch.zeros_like(mn))
    numel_t = torch.full((1,), float(numel), dtype=torch.float64, device=device)
    return torch.cat([numel_t, counts, finite.reshape(1),
                      torch.stack([mn, mx, s.to(torch.float64), ss.to(torch.float64), absmax])])


def composite_stats(x: torch.Tensor, ws: Optional[Workspace] = None) -> torch.Tensor:
    """The best plain-torch composite of the eleven statistics we could write.

    Args:
        x: floating tensor, any shape / layout.
        ws: reusable :class:`Workspace` (preallocated temporaries; a fresh one when None).
    Returns:
        float64 ``(NUM_STATS,)`` record on ``x.device`` (same layout as ``ops.stats_record``).

    Passes over the data: nan / +inf / -inf / zero counts (``ne``/``eq`` into a reused mask,
    then ``count_nonzero``: bool ``sum()`` is ~20x slower on CPU); zero-filled copy for
    ``sum``, squared in place for the sum of squares; +inf-filled and -inf-filled copies for the finite
    ``amin`` / ``amax``; ``absmax = max(-min, max)`` for free. fp16 / bf16 are first copied
    once to fp32 so every reduction accumulates in fp32 (as the fused kernel does).
    """
    ws = ws or Workspace()
    n = x.numel()
    x = x.reshape(-1)
    acc = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
    mask, buf, stage = ws.get(x, acc)
    if stage is not None:
        stage.copy_(x)
        x = stage
    torch.ne(x, x, out=mask)
    nan = torch.count_nonzero(mask)
    torch.eq(x, INF, out=mask)
    posinf = torch.count_nonzero(mask)
    torch.eq(x, -INF, out=mask)
    neginf = torch.count_nonzero(mask)
    torch.eq(x, 0, out=mask)
    zeros = torch.count_nonzero(mask)
    torch.nan_to_num(x, 0.0, 0.0, 0.0, out=buf)
    s = buf.sum()
    # torch.dot and linalg.vector_norm accumulate naively in fp32 on CPU (1% off at 64Mi);
    # square in place, then the cascade-summed sum() is as accurate as the fused kernel.
    torch.mul(buf, buf, out=buf)
    ss = buf.sum()
    torch.nan_to_num(x, INF, INF, INF, out=buf)
    mn = buf.amin()
    torch.nan_to_num(x, -INF, -INF, -INF, out=buf)
    mx = buf.amax()
    return _finish(n, nan, posinf, neginf, zeros, mn, mx, s, ss, x.device)


def naive_stats(x: torch.Tensor) -> torch.Tensor:
    """The composite a user writes first: fresh temporaries, one expression per statistic,
    no host sync (same record layout as ``ops.stats_record``)."""
    n = x.numel()
    acc = torch.float32 if x.dtype in LOW_PRECISION else x.dtype
    xf = x.to(acc)
    nan = torch.isnan(xf).sum()
    posinf = torch.isposinf(xf).sum()
    neginf = torch.isneginf(xf).sum()
    zeros = (xf == 0).sum()
    fin = torch.isfinite(xf)
    z = torch.where(fin, xf, 0.0)
    s = z.sum()
    ss = (z * z).sum()
    mn = torch.where(fin, xf, INF).amin()
    mx = torch.where(fin, xf, -INF).amax()
    return _finish(n, nan, posinf, neginf, zeros, mn, mx, s, ss, x.device)


def records_agree(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> bool:
    """Counts equal, floats close (sums are accumulated in different orders)."""
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.equal(a[:STAT["min"]], b[:STAT["min"]]):
        return False
    fa, fb = a[STAT["min"]:], b[STAT["min"]:]
    scale = torch.maximum(fa.abs(), fb.abs()).clamp_min(1.0)
    # sum is a cancelling sum of +/- values: compare it against sqrt(sumsq) scale.
    scale[STAT["sum"] - STAT["min"]] = max(float(scale[STAT["sum"] - STAT["min"]]),
                                           math.sqrt(max(float(fa[3]), 0.0)))
    same_nan = torch.isnan(fa) == torch.isnan(fb)
    close = ((fa - fb).abs() <= rtol * scale) | (torch.isnan(fa) & torch.isnan(fb))
    return bool(same_nan.all() and close.all())


# --------------------------------------------------------------------------- inputs

def make_input(n: int, dtype: torch.dtype, device: torch.device, specials: bool) -> torch.Tensor:
    """Normal values; with ``specials`` also a NaN, +Inf, -Inf and exact zeros at scattered
    positions (a few blocks leave the all-finite fast path, as in a real anomaly)."""
    g = torch.Generator(device="cpu").manual_seed(n)
    x = torch.randn(n, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)
    if specials and n >= 8:
        idx = torch.tensor([n // 7, n // 3, (2 * n) // 3, n - 1, 1], device=device)
        vals = torch.tensor([math.nan, INF, -INF, 0.0, 0.0], dtype=dtype, device=device)
        x[idx] = vals
    return x


def gradient_like_shapes(count: int, d: int) -> List[tuple]:
    """``count`` parameter-gradient shapes of a transformer of width ``d`` (qkv, out proj,
    MLP in / out, their biases, two layer norms: 12 tensors per layer)."""
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,),
             (d,), (d,), (d,), (d,)]
    shapes = []
    while len(shapes) < count:
        shapes.extend(layer)
    return shapes[:count]


# --------------------------------------------------------------------------- runs

def bench_single(sizes: Sequence[int], dtypes: Sequence[str], device: torch.device,
                 args) -> List[dict]:
    rows = []
    compiled = None
    if args.compiled:
        compiled = torch.compile(naive_stats, dynamic=True)
    for dname in dtypes:
        dtype = DTYPES[dname]
        for n in sizes:
            x = make_input(n, dtype, device, not args.all_finite)
            ws = Workspace()
            variants = {
                "sum": lambda: x.sum(),
                "fused": lambda: ops.stats_record(x),
                "composite": lambda: composite_stats(x, ws),
            }
            if not args.no_naive:
                variants["naive"] = lambda: naive_stats(x)
            if compiled is not None:
                variants["compiled"] = lambda: compiled(x)
            fused_rec = ops.stats_record(x)
            agree = {k: records_agree(fused_rec, f()) for k, f in variants.items()
                     if k not in ("sum",)}
            res = T.interleaved(variants, baseline="sum", device=device, rounds=args.rounds,
                                warmup=args.warmup, target_s=args.target_s)
            row = {
                "n": n, "size": T.human_size(n), "dtype": dname,
                "bytes": n * x.element_size(), "agrees_with_fused": agree,
                "timing": res.as_dict(),
                "fused_over_sum": res.ratio("fused", "sum"),
                "composite_over_fused": res.ratio("composite", "fused"),
                "naive_over_fused": res.ratio("naive", "fused") if "naive" in variants
                else None,
                "compiled_over_fused": res.ratio("compiled", "fused") if compiled else None,
                "errors": res.errors,
            }
            for k in variants:
                row[f"{k}_s"] = res.median(k)
            row["sum_bw_gbs"] = row["bytes"] / row["sum_s"] / 1e9
            row["fused_bw_gbs"] = row["bytes"] / row["fused_s"] / 1e9
            rows.append(row)
            print(_single_line(row, device), flush=True)
            del x, ws
    return rows


def count_cuda_kernels(fn) -> Optional[int]:
    """Number of CUDA kernels one call of ``fn`` launches (torch.profiler), None on failure."""
    try:
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events()
                   if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    except Exception as exc:  # profiler unavailable: report, do not fail the benchmark
        print(f"  (kernel count unavailable: {exc})")
        return None


def bench_multi(device: torch.device, args) -> dict:
    shapes = gradient_like_shapes(args.multi_count, args.multi_d)
    dtype = DTYPES[args.multi_dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(s, generator=g).to(dtype=dtype, device=device) for s in shapes]
    numel = sum(x.numel() for x in xs)
    records = torch.zeros(len(xs), NUM_STATS, dtype=torch.float64, device=device)
    slots = list(range(len(xs)))
    variants = {
        "loop_sum": lambda: [x.sum() for x in xs],
        "foreach_norm": lambda: torch._foreach_norm(xs),
        "multi": lambda: ops.multi_stats(xs),
        "multi_into": lambda: ops.multi_stats_into(xs, records, slots),
        "loop_fused": lambda: torch.stack([ops.stats_record(x) for x in xs]),
    }
    agree = records_agree(ops.multi_stats(xs).flatten(),
                          torch.stack([ops.stats_record(x) for x in xs]).flatten())
    res = T.interleaved(variants, baseline="multi", device=device, rounds=args.rounds,
                        warmup=args.warmup, target_s=args.target_s)
    out = {
        "tensors": len(xs), "elements": numel, "dtype": args.multi_dtype, "d": args.multi_d,
        "agrees_with_loop": agree, "timing": res.as_dict(),
        "loop_over_multi": res.ratio("loop_fused", "multi"),
        "multi_over_loop_sum": res.ratio("multi", "loop_sum"),
        "multi_over_foreach_norm": res.ratio("multi", "foreach_norm"),
        "kernels_per_multi_call": None,
    }
    for k in variants:
        out[f"{k}_s"] = res.median(k)
    if device.type == "cuda":
        out["kernels_per_multi_call"] = count_cuda_kernels(lambda: ops.multi_stats_into(
            xs, records, slots))
        out["kernels_per_loop"] = count_cuda_kernels(
            lambda: [ops.stats_record(x) for x in xs])
    return out


# --------------------------------------------------------------------------- report

def _fmt_ratio(r: Optional[float]) -> str:
    return "-" if r is None or (isinstance(r, float) and math.isnan(r)) else f"{r:.2f}x"


def _fmt_time(s: Optional[float]) -> str:
    if s is None or math.isnan(s):
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def _single_line(row: dict, device: torch.device) -> str:
    t = (f" sum {_fmt_time(row['sum_s'])} fused {_fmt_time(row['fused_s'])}"
         if device.type == "cuda" else "")
    bad = [k for k, v in row["agrees_with_fused"].items() if not v]
    return (f"  {row['dtype']:>4} {row['size']:>6}: fused/sum {_fmt_ratio(row['fused_over_sum'])}"
            f"  composite/fused {_fmt_ratio(row['composite_over_fused'])}"
            f"  naive/fused {_fmt_ratio(row['naive_over_fused'])}{t}"
            + (f"  DISAGREE: {bad}" if bad else ""))


def single_table(rows: List[dict], device: torch.device, compiled: bool) -> str:
    headers = ["dtype", "elements", "fused/sum", "composite/fused", "naive/fused"]
    if compiled:
        headers.append("compiled/fused")
    if device.type == "cuda":
        headers += ["sum", "fused", "sum GB/s", "fused GB/s", "fused % of sum BW"]
    out = []
    for r in rows:
        line = [r["dtype"], r["size"], _fmt_ratio(r["fused_over_sum"]),
                _fmt_ratio(r["composite_over_fused"]), _fmt_ratio(r["naive_over_fused"])]
        if compiled:
            line.append(_fmt_ratio(r["compiled_over_fused"]))
        if device.type == "cuda":
            line += [_fmt_time(r["sum_s"]), _fmt_time(r["fused_s"]),
                     f"{r['sum_bw_gbs']:.0f}", f"{r['fused_bw_gbs']:.0f}",
                     f"{100 * r['sum_s'] / r['fused_s']:.0f}%"]
        out.append(line)
    return T.fmt_table(headers, out)


def multi_table(m: dict, device: torch.device) -> str:
    headers = ["tensors", "elements", "dtype", "loop of stats / multi", "multi / loop of sum",
               "multi / _foreach_norm"]
    line = [m["tensors"], m["elements"], m["dtype"], _fmt_ratio(m["loop_over_multi"]),
            _fmt_ratio(m["multi_over_loop_sum"]), _fmt_ratio(m["multi_over_foreach_norm"])]
    if device.type == "cuda":
        headers += ["multi", "loop", "kernels / multi call", "kernels / loop"]
        line += [_fmt_time(m["multi_s"]), _fmt_time(m["loop_fused_s"]),
                 m["kernels_per_multi_call"], m.get("kernels_per_loop")]
    return T.fmt_table(headers, [line])


def evaluate_targets(rows: List[dict], multi: Optional[dict], device: torch.device) -> List[dict]:
    """The targets of issue 2 that this run measured, with PASS / MISS."""
    out = []

    def add(name, target, value, ok, note=""):
        out.append({"target": name, "wanted": target, "measured": value,
                    "status": "PASS" if ok else "MISS", "note": note})

    def find(n, dtype):
        return next((r for r in rows if r["n"] == n and r["dtype"] == dtype), None)

    if device.type == "cpu":
        r = find(64 << 20, "fp32")
        if r is None:
            out.append({"target": "CPU 64Mi fp32", "wanted": "-", "measured": "-",
                        "status": "NOT RUN", "note": "size 64Mi fp32 not in this run"})
        else:
            add("CPU 64Mi fp32: fused / x.sum()", "<= 1.5x", _fmt_ratio(r["fused_over_sum"]),
                r["fused_over_sum"] <= 1.5)
            add("CPU 64Mi fp32: composite / fused", ">= 8x",
                _fmt_ratio(r["composite_over_fused"]), r["composite_over_fused"] >= 8)
    else:
        big = [r for r in rows if r["bytes"] >= 256 << 20 and r["dtype"] in ("fp32", "bf16")]
        if not big:
            out.append({"target": "GPU >= 256 MiB bandwidth", "wanted": ">= 90% of sum",
                        "measured": "-", "status": "NOT RUN",
                        "note": "no tensor >= 256 MiB in this run"})
        for r in big:
            frac = r["sum_s"] / r["fused_s"]
            add(f"GPU {r['dtype']} {r['size']} ({r['bytes'] >> 20} MiB): fused BW / sum BW",
                ">= 90%", f"{100 * frac:.0f}%", frac >= 0.9)
        small = [r for r in rows if r["n"] <= 4096]
        for r in small:
            add(f"GPU {r['dtype']} {r['size']}: time per call", "<= 10 us",
                _fmt_time(r["fused_s"]), r["fused_s"] <= 10e-6)
        if multi is not None:
            k = multi.get("kernels_per_multi_call")
            add(f"GPU multi-tensor stats over {multi['tensors']} tensors", "1 launch",
                "unknown" if k is None else f"{k} kernel(s)", k == 1,
                "counted with torch.profiler (memcpy/memset excluded)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16,fp64")
    p.add_argument("--min-size", default="1Ki")
    p.add_argument("--max-size", default=None,
                   help="largest size (default 64Mi on CPU, 256Mi on CUDA)")
    p.add_argument("--sizes", default=None, help="explicit comma list, e.g. 1Ki,1Mi,64Mi")
    p.add_argument("--rounds", type=int, default=7, help="interleaved samples per variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target-s", type=float, default=0.03,
                   help="seconds per sample (small sizes repeat the call)")
    p.add_argument("--all-finite", action="store_true",
                   help="no NaN/Inf/zero injected (default injects a few)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive composite")
    p.add_argument("--compiled", action="store_true",
                   help="also time the naive composite under torch.compile")
    p.add_argument("--no-multi", action="store_true", help="skip the multi-tensor benchmark")
    p.add_argument("--multi-count", type=int, default=300)
    p.add_argument("--multi-d", type=int, default=None,
                   help="transformer width of the gradient shapes (default 256 CPU, 768 GPU)")
    p.add_argument("--multi-dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--json", default=None, help="write all results to this path")
    p.add_argument("--allow-reference", action="store_true",
                   help="run on the float64 reference fallback (numbers marked REFERENCE)")
    args = p.parse_args(argv)

    device = T.pick_device(args.device)
    path = T.require_native(device, args.allow_reference)
    info = T.machine_info(device)
    print(T.describe_machine(info), flush=True)

    if args.sizes:
        sizes = [T.parse_size(s) for s in args.sizes.split(",")]
    else:
        hi = T.parse_size(args.max_size or ("256Mi" if device.type == "cuda" else "64Mi"))
        lo = T.parse_size(args.min_size)
        sizes, n = [], 1024
        while n <= hi:
            if n >= lo:
                sizes.append(n)
            n *= 4
    if args.multi_d is None:
        args.multi_d = 768 if device.type == "cuda" else 256
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"unknown dtype {d!r} (choose from {', '.join(DTYPES)})")

    print(f"single-tensor stats: sizes {', '.join(T.human_size(s) for s in sizes)}; "
          f"dtypes {', '.join(dtypes)}; {args.rounds} interleaved rounds", flush=True)
    rows = bench_single(sizes, dtypes, device, args)
    multi = None
    if not args.no_multi:
        print(f"multi-tensor stats: {args.multi_count} tensors (width {args.multi_d})",
              flush=True)
        multi = bench_multi(device, args)
    targets = evaluate_targets(rows, multi, device)

    tag = "" if path["native"] else "  [REFERENCE FALLBACK: not the native kernels]"
    print(f"\n## Kernel benchmark ({device.type}){tag}\n{T.describe_machine(info)}\n")
    print(single_table(rows, device, args.compiled))
    if multi is not None:
        print("\n" + multi_table(multi, device))
    print("\nTargets (issue 2):")
    print(T.fmt_table(["target", "wanted", "measured", "status"],
                      [[t["target"], t["wanted"], t["measured"], t["status"]]
                       for t in targets]))
    disagree = [(r["dtype"], r["size"], k) for r in rows
                for k, v in r["agrees_with_fused"].items() if not v]
    if disagree:
        print(f"\nWARNING: composites disagree with the fused record at {disagree}")
    if multi is not None and not multi["agrees_with_loop"]:
        print("\nWARNING: multi_stats disagrees with a loop of stats_record")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "kernels", "machine": info, "ops_path": path,
                       "args": vars(args), "single": rows, "multi": multi,
                       "targets": targets}, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
