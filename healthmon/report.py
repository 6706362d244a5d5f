"""``python -m healthmon report``: PNG plots and an HTML page from healthmon JSONL logs.

The pictures debugging guides draw: per-layer gradient-norm bars and activation bars for one
step, per-site norms over all steps as heat maps, and the anomaly with its stack. Uses
matplotlib's Agg canvas directly (no pyplot, so the caller's backend is left alone).
"""
from __future__ import annotations

import html
import math
import os
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from .sinks import expand_logs, read_jsonl, read_warnings
from .summary import format_summary, row_name, truncate_middle

GRAD_PHASES = ("grad", "backward")
ACT_PHASES = ("input", "forward")
WEIGHT_PHASES = ("param", "weight")
_BAD = "#d62728"
_WARN = "#ff7f0e"
_LABEL_CHARS = 44


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("healthmon report needs matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _bad(row: dict) -> int:
    return int(row.get("nan", 0)) + int(row.get("posinf", 0)) + int(row.get("neginf", 0))


def _pos(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _site_order(records: Sequence[dict]) -> Dict[str, int]:
    """Model order of sites: first forward execution order seen (inputs first)."""
    order: Dict[str, int] = {}
    for r in records:
        if r.get("phase") in ACT_PHASES and r["site"] not in order:
            order[r["site"]] = len(order)
    return order


def _sorted_rows(rows: List[dict], site_order: Dict[str, int]) -> List[dict]:
    """Rows in model order (first layer first); backward-phase rows without a forward
    record fall back to reversed execution order."""
    def key(r: dict):
        base = site_order.get(r["site"])
        if base is None:
            o = r.get("order", 0)
            return (1, -o if r.get("phase") in GRAD_PHASES else o)
        return (0, base, r.get("order", 0))
    return sorted(rows, key=key)


def _bars(path: str, rows: List[dict], metrics: Sequence[Tuple[str, str]], title: str,
          xlabel: str, highlight: Optional[str]) -> str:
    """Horizontal bars per row (log x), one bar per metric; non-finite rows marked in red."""
    n = len(rows)
    fig = _figure(10, min(max(2.5, 0.32 * n * max(1, len(metrics) * 0.7) + 1.6), 60))
    ax = fig.add_subplot(1, 1, 1)
    values = [r[m] for r in rows for m, _ in metrics if _pos(r.get(m))]
    floor = min(values) / 10 if values else 1e-8
    top = max(values) * 60 if values else 1.0
    height = 0.8 / len(metrics)
    colors = ("#1f77b4", "#ff7f0e", "#2ca02c")
    for j, (metric, label) in enumerate(metrics):
        ys = [i - 0.4 + height * (j + 0.5) for i in range(n)]
        xs = [r[metric] if _pos(r.get(metric)) else floor for r in rows]
        ax.barh(ys, [x - floor * 0.999 for x in xs], left=floor * 0.999, height=height * 0.9,
                color=colors[j % len(colors)], label=label)
    for i, r in enumerate(rows):
        if _bad(r):
            kinds = [k for k, key in (("NaN", "nan"), ("+Inf", "posinf"), ("-Inf", "neginf"))
                     if r.get(key)]
            ax.axhspan(i - 0.5, i + 0.5, color=_BAD, alpha=0.12, lw=0)
            end = max([r[m] for m, _ in metrics if _pos(r.get(m))] or [floor])
            ax.text(end * 1.3, i, "/".join(kinds) + " (bar: finite part)", va="center",
                    color=_BAD, fontweight="bold", fontsize=8,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    labels = [truncate_middle(row_name(r), _LABEL_CHARS) for r in rows]
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=9 if n <= 40 else 7, family="monospace")
    for tick, r in zip(ax.get_yticklabels(), rows):
        if _bad(r) or (highlight is not None and r["site"] == highlight):
            tick.set_color(_BAD)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xscale("log")
    ax.set_xlim(floor, top)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", which="major", alpha=0.3)
    if len(metrics) > 1:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _heatmap(path: str, records: List[dict], phases: Sequence[str], metric: str, title: str,
             site_order: Dict[str, int], anomaly_step: Optional[int],
             max_columns: int = 400, warns: Sequence[dict] = ()) -> Optional[str]:
    """Sites (y) x steps (x) heat map of ``metric`` on a log colour scale; steps are binned
    (max per bin) past ``max_columns``; non-finite cells red, missing / zero cells grey;
    early warnings (``type: "warning"`` log lines) as orange rings on their site's row."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in records if r.get("phase") in phases]
    if not rows:
        return None
    names: Dict[str, dict] = {}
    for r in _sorted_rows(rows, site_order):
        names.setdefault(row_name(r), r)
    index = {name: i for i, name in enumerate(names)}
    steps = sorted({r["step"] for r in rows})
    ncol = min(len(steps), max_columns)
    edges = np.linspace(steps[0], steps[-1] + 1, ncol + 1)
    col_of = {s: min(int(np.searchsorted(edges, s, side="right")) - 1, ncol - 1)
              for s in steps}
    data = np.full((len(index), ncol), np.nan)
    bad = np.zeros((len(index), ncol), dtype=bool)
    for r in rows:
        i, j = index[row_name(r)], col_of[r["step"]]
        if _bad(r):
            bad[i, j] = True
        v = r.get(metric)
        if _pos(v):
            data[i, j] = v if math.isnan(data[i, j]) else max(data[i, j], v)
    n = len(index)
    height = min(max(3.0, 0.26 * n + 1.8), 60)
    fig = _figure(11, height)
    ax = fig.add_subplot(1, 1, 1)
    extent = (edges[0] - 0.5, edges[-1] - 0.5, n - 0.5, -0.5)
    finite = data[np.isfinite(data)]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    if finite.size:
        vmin, vmax = float(finite.min()), float(finite.max())
        if vmax <= vmin:
            vmin, vmax = vmin / 2, vmax * 2
        im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", interpolation="nearest",
                       cmap=cmap, norm=LogNorm(vmin=vmin, vmax=vmax), extent=extent)
        fig.colorbar(im, ax=ax, label=f"{metric} (log scale)", pad=0.01,
                     shrink=min(1.0, 6.0 / height))
    if bad.any():
        red = ListedColormap([_BAD])
        ax.imshow(np.ma.masked_where(~bad, np.ones_like(data)), aspect="auto",
                  interpolation="nearest", cmap=red, extent=extent)
    if anomaly_step is not None:
        ax.plot([anomaly_step], [-0.5], marker="v", ms=10, color=_BAD, clip_on=False,
                ls="none")
    marks = [(w["step"], index[row_name(w)]) for w in warns
             if w.get("phase") in phases and row_name(w) in index]
    if marks:
        ax.plot([s for s, _ in marks], [i for _, i in marks], marker="o", ms=9, mfc="none",
                mec=_WARN, mew=2, ls="none", clip_on=False)
    ax.set_yticks(range(n))
    ax.set_yticklabels([truncate_middle(k, _LABEL_CHARS) for k in index],
                       fontsize=8 if n <= 50 else 6, family="monospace")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    binned = f", {len(steps)} steps in {ncol} bins (max per bin)" if ncol < len(steps) else ""
    mark = f"; \u25bc anomaly at step {anomaly_step}" if anomaly_step is not None else ""
    mark += "; orange ring: early warning" if marks else ""
    ax.set_xlabel(f"step{binned}    (grey: not recorded or 0; red: NaN/Inf{mark})")
    ax.set_title(title, fontsize=11, pad=12)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _anomaly_png(path: str, anomalies: List[dict], max_lines: int = 70) -> str:
    """The first anomaly's report (headline, consequences, stack) as a monospace picture."""
    first = anomalies[0]
    text = first.get("report") or first.get("headline") or str(first)
    lines: List[str] = []
    for line in text.splitlines():
        lines.extend(textwrap.wrap(line, 118, subsequent_indent="        ",
                                   drop_whitespace=False) or [""])
    if len(anomalies) > 1:
        lines += ["", f"(+ {len(anomalies) - 1} more anomal{'y' if len(anomalies) == 2 else 'ies'}"
                      " in the log: see index.html)"]
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [f"... {len(lines) - max_lines + 1} more lines"]
    height = 0.5 + 0.165 * len(lines)
    fig = _figure(12, height)
    head = next(i for i, line in enumerate(lines + [""]) if line.startswith("  ") or not line)
    pad = 0.12 / height  # 0.12 inch from the top
    fig.text(0.01, 1 - pad, "\n".join(lines[:head]), va="top", ha="left", color=_BAD,
             family="monospace", fontsize=8.5, fontweight="bold")
    fig.text(0.01, 1 - pad, "\n" * head + "\n".join(lines[head:]), va="top", ha="left",
             family="monospace", fontsize=8.5)
    fig.savefig(path)
    return path


def _choose(records: List[dict], anomalies: List[dict], step: Optional[int]
            ) -> Tuple[int, Optional[int]]:
    """(step, rank) to draw the bars for."""
    steps = sorted({r["step"] for r in records})
    if step is not None:
        if step not in steps:
            raise ValueError(f"no records at step {step} (the log has steps "
                             f"{steps[0]}..{steps[-1]})" if steps else "the log has no records")
        chosen = step
    elif anomalies:
        target = anomalies[0].get("step")
        earlier = [s for s in steps if target is None or s <= target]
        chosen = earlier[-1] if earlier else steps[-1]
    else:
        chosen = steps[-1]
    ranks = sorted({r.get("rank") for r in records if r["step"] == chosen},
                   key=lambda x: -1 if x is None else x)
    rank = anomalies[0].get("rank") if anomalies else None
    return chosen, (rank if rank in ranks else ranks[0])


def render_report(jsonl_paths, out_dir: str, step: Optional[int] = None) -> str:
    """Render PNG plots and ``index.html`` from healthmon JSONL logs; returns the HTML path.

    Args:
        jsonl_paths: one path or several (rank files; rotated files are picked up), or a
            base name ``run.jsonl`` / glob that stands for the rank files
            ``run.rank<R>.jsonl`` (see :func:`healthmon.sinks.expand_logs`).
        out_dir: created if missing; PNGs: ``grad_norms.png`` (parameter-gradient norms, or
            output-gradient norms when no parameter gradients were recorded),
            ``activations.png`` (rms and abs-max of forward outputs), ``weight_norms.png``
            (only when weight records exist), ``heatmap_grad.png`` and ``heatmap_act.png``
            (per-site values over all steps), ``anomaly.png`` (only when the log has one).
        step: the step of the bar charts; default the anomaly's step (or the last recorded
            step before it), else the last step.
    Raises:
        ValueError: when the logs hold no records, or none at ``step``.
    """
    jsonl_paths = expand_logs(jsonl_paths)
    records, anomalies, metas = read_jsonl(jsonl_paths)
    warns = read_warnings(jsonl_paths)
    if not records:
        raise ValueError(f"no records in {jsonl_paths!r}")
    os.makedirs(out_dir, exist_ok=True)
    chosen, rank = _choose(records, anomalies, step)
    mine = [r for r in records if r.get("rank") == rank]
    at = [r for r in mine if r["step"] == chosen]
    order = _site_order(mine)
    hot = anomalies[0]["site"] if anomalies and anomalies[0].get("step") == chosen else None
    where = f"step {chosen}" + (f", rank {rank}" if rank is not None else "")
    images: List[Tuple[str, str]] = []

    def out(name: str) -> str:
        return os.path.join(out_dir, name)
    grads = [r for r in at if r.get("phase") == "grad"] or \
            [r for r in at if r.get("phase") == "backward"]
    if grads:
        what = "parameter" if grads[0]["phase"] == "grad" else "output (grad_output)"
        images.append((_bars(out("grad_norms.png"), _sorted_rows(grads, order), [("norm", "norm")],
                             f"Gradient norm per {what}, {where}", "L2 norm of the gradient "
                             "(log scale)", hot), "Gradient norms per layer"))
    acts = [r for r in at if r.get("phase") in ACT_PHASES]
    if acts:
        images.append((_bars(out("activations.png"), _sorted_rows(acts, order),
                             [("rms", "rms"), ("absmax", "abs max")],
                             f"Activations per layer (forward outputs), {where}",
                             "value (log scale)", hot), "Activations per layer"))
    weights = [r for r in at if r.get("phase") in WEIGHT_PHASES]
    if weights:
        images.append((_bars(out("weight_norms.png"), _sorted_rows(weights, order),
                             [("norm", "norm")], f"Weight norm per parameter, {where}",
                             "L2 norm (log scale)", hot), "Weight norms per layer"))
    bad_step = anomalies[0].get("step") if anomalies else None
    heat_phases = ("grad",) if any(r.get("phase") == "grad" for r in mine) else ("backward",)
    for name, phases, metric, title, caption in (
            ("heatmap_grad.png", heat_phases, "norm", "Gradient norm per site over steps",
             "Gradient norms over steps"),
            ("heatmap_act.png", ("forward",), "rms", "Activation rms per site over steps",
             "Activation rms over steps")):
        p = _heatmap(out(name), mine, phases, metric, title, order, bad_step,
                     warns=_flat_warnings(warns, rank))
        if p:
            images.append((p, caption))
    if anomalies:
        images.append((_anomaly_png(out("anomaly.png"), anomalies), "The anomaly"))
    path = out("index.html")
    _write_html(path, jsonl_paths, images, anomalies, metas, at, where, warns)
    return path


def _flat_warnings(warns: Sequence[dict], rank) -> List[dict]:
    """The warnings of ``rank`` and the sites grouped with them (``consequences``)."""
    out = []
    for w in warns:
        if w.get("rank") == rank:
            out.append(w)
            out.extend(dict(c, step=c.get("step", w.get("step"))) for c in
                       w.get("consequences") or ())
    return out


def _write_html(path: str, sources, images, anomalies, metas, rows, where,
                warns: Sequence[dict] = (), max_warnings: int = 20) -> None:
    esc = html.escape
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    meta = metas[0] if metas else {}
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>healthmon report</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
             "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}"
             "img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}"
             ".bad{color:#d62728}</style></head><body>",
             "<h1>healthmon report</h1>",
             f"<p>logs: {esc(', '.join(os.fspath(s) for s in sources))}<br>"
             f"host {esc(str(meta.get('host', '?')))}, torch {esc(str(meta.get('torch', '?')))}, "
             f"written {esc(str(meta.get('time', '?')))}; bars for {esc(where)}</p>"]
    if anomalies:
        parts.append(f"<h2 class='bad'>{len(anomalies)} anomal"
                     f"{'y' if len(anomalies) == 1 else 'ies'}</h2>")
        for a in anomalies:
            parts.append(f"<pre>{esc(a.get('report') or a.get('headline') or '')}</pre>")
    else:
        parts.append("<h2>no anomalies</h2>")
    if warns:
        parts.append(f"<h2 style='color:{_WARN}'>{len(warns)} early warning"
                     f"{'' if len(warns) == 1 else 's'}</h2>")
        for w in warns[:max_warnings]:
            parts.append(f"<pre>{esc(w.get('report') or w.get('headline') or '')}</pre>")
        if len(warns) > max_warnings:
            parts.append(f"<p>... {len(warns) - max_warnings} more in the log</p>")
    for img, caption in images:
        name = os.path.basename(img)
        parts.append(f"<h3>{esc(caption)}</h3><img src='{esc(name)}' alt='{esc(caption)}'>")
    parts.append(f"<h2>Summary, {esc(where)} (worst first)</h2>")
    parts.append(f"<pre>{esc(format_summary(rows, width=130))}</pre></body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
