"""The summary table of one step's records (``mon.summary()``), worst sites first."""
from __future__ import annotations

import math
import shutil
from typing import Any, Iterable, List, Optional, Sequence


def row_name(row: dict) -> str:
    """Short name of a row's tensor: ``site.role`` for parameter gradients, ``site`` or
    ``site/role`` otherwise, ``#call`` for repeated calls of a module."""
    site, role, phase = row.get("site", "?"), row.get("role", ""), row.get("phase", "")
    if phase == "grad" and role:
        name = f"{site}.{role}"
    elif role and role not in ("output", "output[0]", "grad_output", "grad_output[0]",
                               "input", "input[0]"):
        name = f"{site}/{role}"
    else:
        name = site
    return f"{name}#{row['call']}" if row.get("call") else name


def _nonfinite(row: dict) -> int:
    return int(row.get("nan", 0)) + int(row.get("posinf", 0)) + int(row.get("neginf", 0))


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    return f"{v:.3g}"


def truncate_middle(text: str, width: int) -> str:
    """``text`` shortened to ``width`` characters by cutting out its middle (``...``)."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    head = (width - 3 + 1) // 2
    tail = width - 3 - head
    return text[:head] + "..." + (text[-tail:] if tail else "")


def sort_worst_first(rows: Iterable[dict]) -> List[dict]:
    """Rows with non-finite values first (in execution order: the first is the culprit),
    then the largest absmax, then the largest norm."""
    def key(r: dict):
        bad = _nonfinite(r) > 0
        absmax = r.get("absmax", 0.0)
        norm = r.get("norm", 0.0)
        absmax = -1.0 if absmax is None or math.isnan(absmax) else absmax
        norm = -1.0 if norm is None or math.isnan(norm) else norm
        return (0, r.get("order", 0), 0.0, 0.0) if bad else (1, 0, -absmax, -norm)
    return sorted(rows, key=key)


_COLUMNS = (  # header, width, right-aligned, getter; dropped right to left by priority
    ("phase", 8, False, lambda r: str(r.get("phase", ""))),
    ("numel", 8, True, lambda r: _num(r.get("numel"))),
    ("NaN", 6, True, lambda r: _num(r.get("nan", 0))),
    ("Inf", 6, True, lambda r: _num(int(r.get("posinf", 0)) + int(r.get("neginf", 0)))),
    ("min", 9, True, lambda r: _num(r.get("min"))),
    ("max", 9, True, lambda r: _num(r.get("max"))),
    ("norm", 9, True, lambda r: _num(r.get("norm"))),
    ("rms", 9, True, lambda r: _num(r.get("rms"))),
)
_DROP_ORDER = ("numel", "min", "rms", "phase")


def format_summary(rows: Sequence[dict], width: Optional[int] = None,
                   limit: Optional[int] = None) -> str:
    """A readable table of one step's rows, worst first, fitting ``width`` columns.

    Columns: site (``site.param`` for parameter gradients, middle-truncated), phase, numel,
    NaN and Inf counts, finite min / max, norm, rms. ``width`` defaults to the terminal
    width; narrow terminals drop numel, min, rms, phase in that order. ``limit`` keeps the
    worst ``limit`` rows and says how many were left out.
    """
    if width is None:
        width = shutil.get_terminal_size((100, 24)).columns
    rows = sort_worst_first(rows)
    if not rows:
        return "(no records)"
    shown = rows if limit is None else rows[:limit]
    names = [row_name(r) for r in shown]
    cols = list(_COLUMNS)
    site_min = 16

    def fixed(cs) -> int:
        return sum(w + 1 for _, w, _, _ in cs)
    for drop in _DROP_ORDER:
        if site_min + fixed(cols) <= width:
            break
        cols = [c for c in cols if c[0] != drop]
    site_w = max(4, min(max(len(n) for n in names), width - fixed(cols)))
    header = "site".ljust(site_w) + "".join(
        " " + (h.rjust(w) if right else h.ljust(w)) for h, w, right, _ in cols)
    lines = [header, "-" * len(header)]
    for name, row in zip(names, shown):
        cells = []
        for _, w, right, get in cols:
            text = truncate_middle(get(row), w)
            cells.append(" " + (text.rjust(w) if right else text.ljust(w)))
        lines.append(truncate_middle(name, site_w).ljust(site_w) + "".join(cells))
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows")
    return "\n".join(line.rstrip() for line in lines)
