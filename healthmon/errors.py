"""`Anomaly` (one bad tensor, where and when it was seen) and `HealthError`."""
from __future__ import annotations

import os
import sys
import sysconfig
import traceback
from dataclasses import dataclass, field
from typing import Any, List, Optional

PHASES = ("input", "forward", "backward", "grad", "label", "loss", "param")
# early-warning kinds (healthmon.rules); "nan" / "inf" / "label" are errors
WARNING_KINDS = ("overflow", "spike", "growth", "dead", "frozen", "vanishing")

SYNC_HINT = ("exact operation: run with HEALTHMON=sync (or healthmon.watch(model, sync=True)) "
             "to name the operation and the line that produced it")


@dataclass
class Operation:
    """The first operation whose output held a NaN or a not-allowed ±Inf (sync mode).

    Attributes:
        op: ``aten::log`` for a forward op, the autograd node (``SqrtBackward0``) for a
            backward one.
        phase: ``"forward"`` or ``"backward"``.
        summary: what its inputs held that explains it (``"log received 3 zeros"``).
        frames: stack of the op, outermost first: the call of the replayed module (or of
            ``backward``) and the frames inside it down to the op; for a backward node, the
            stack of the forward op that created it.
        how: how it was found (``"replay of encoder.attn forward"``).
        certain: False when the line is a best guess (a source match, see
            :mod:`healthmon.drilldown`).
    """
    op: str
    phase: str
    summary: str
    frames: List[traceback.FrameSummary] = field(default_factory=list)
    how: str = ""
    certain: bool = True

    def user_frames(self) -> List[traceback.FrameSummary]:
        """The user's frames (not torch, healthmon, site-packages, stdlib), innermost first."""
        return [fr for fr in reversed(self.frames) if not _is_library(fr.filename)]

    def library_frames(self) -> List[traceback.FrameSummary]:
        """Frames of installed libraries and torch, innermost first."""
        return [fr for fr in reversed(self.frames) if _is_library(fr.filename)
                and not _is_package(fr.filename)]

    def lines(self) -> List[str]:
        """Report lines (indented like :meth:`Anomaly.report`)."""
        kind = "backward node" if self.phase == "backward" else "operation"
        out = [f"  {kind}: {self.op} produced the first non-finite value: {self.summary}"]
        user = self.user_frames()
        if user:
            where = "created in (your code" if self.phase == "backward" else "at (your code"
            guess = ", best guess by source match" if not self.certain else ""
            out.append(f"    {where}{guess}, innermost first):")
            out.extend(_format_frame(fr, "      ") for fr in user)
        lib = self.library_frames()
        if lib:
            out.append("    inside libraries (innermost first):")
            out.extend(_format_frame(fr, "      ") for fr in lib)
        if self.how:
            out.append(f"    found by: {self.how}")
        return out


@dataclass
class Anomaly:
    """One bad tensor.

    Attributes:
        site: module qualified name (``encoder.layers.3.linear1``), ``<input>`` for the
            model's inputs, or the loss call for label checks.
        phase: one of :data:`PHASES`.
        role: which output / argument / parameter (``output[0]``, ``grad_output``,
            ``weight``, ``target``).
        step: training step at which it was produced (-1: outside a monitored step, e.g.
            :func:`~healthmon.check_labels`).
        kind: ``"nan"``, ``"inf"``, ``"label"`` or ``"index"`` (embedding indices).
        stats: the :class:`~healthmon.TensorStats` (or ``LabelStats``) of the bad tensor.
        stack: frames of the code that produced it, outermost first (as
            ``traceback.extract_stack`` gives them).
        last_healthy: stats of the same site at its last healthy record, when known.
        rank: distributed rank that saw it (None when not distributed).
        consequences: later anomalies of the same step (NaN spreads; the first is the culprit).
        call: the n-th call of the module in the step (modules called several times).
        module_type: class name of the module (``Linear``), "" when not a module.
        operation: sync mode: the exact :class:`Operation` that produced the first bad value
            (None when not searched or not found).
        drilldown: sync mode: why the operation could not be named ("" when it was, or when
            no search ran: async mode, whose report then says how to get it).
    """
    site: str
    phase: str
    role: str
    step: int
    kind: str
    stats: Any
    stack: List[traceback.FrameSummary] = field(default_factory=list)
    last_healthy: Any = None
    rank: Optional[int] = None
    consequences: List["Anomaly"] = field(default_factory=list)
    call: int = 0
    module_type: str = ""
    operation: Optional[Operation] = None
    drilldown: str = ""
    severity: str = "error"  # "warning" for early signals (healthmon.rules)
    detail: str = ""  # warnings: what the rule saw, one line (replaces stats.describe())

    @property
    def where(self) -> str:
        """``site (phase role), step N`` in one short string."""
        call = f" call {self.call}" if self.call else ""
        rank = f", rank {self.rank}" if self.rank is not None else ""
        step = f", step {self.step}" if self.step >= 0 else ""  # -1: outside any step
        kind = f" [{self.module_type}]" if self.module_type and \
            self.module_type != self.site else ""
        return f"{self.site}{kind}{call} ({self.phase} {self.role}){step}{rank}"

    def headline(self) -> str:
        """One line: what went bad and where."""
        what = self.detail or self.stats.describe()
        return f"{self.kind_text()} in {self.where}: {what}"

    def kind_text(self) -> str:
        return _KIND_TEXT.get(self.kind, self.kind)

    def user_frames(self) -> List[traceback.FrameSummary]:
        """Frames of the stack outside torch, healthmon, installed libraries (site-packages)
        and the standard library, innermost first (the demo and healthmon's tests count as
        user code)."""
        return [fr for fr in reversed(self.stack) if not _is_library(fr.filename)]

    def library_frames(self) -> List[traceback.FrameSummary]:
        """Frames of installed libraries (transformers, lightning, torch, ...), innermost
        first; healthmon's own frames are left out."""
        return [fr for fr in reversed(self.stack) if _is_library(fr.filename)
                and not _is_package(fr.filename)]

    def report(self) -> str:
        """The complete human report (what, where, last healthy stats, stack)."""
        lines = [f"healthmon{' warning' if self.severity == 'warning' else ''}: "
                 f"{self.headline()}"]
        hint = self.stats.hint() if hasattr(self.stats, "hint") else None
        if hint:
            lines.append(f"  hint: {hint}")
        elif self.kind == "inf" and self.phase in ("input", "forward"):
            lines.append(f"  hint: {allow_inf_hint(self.site, self.phase, self.role)}")
        if self.last_healthy is not None:
            lines.append(f"  last healthy record of this site: {self.last_healthy.describe()}")
        if self.consequences:
            shown = ", ".join(f"{a.site} ({a.phase} {a.role})" for a in self.consequences[:5])
            more = f" and {len(self.consequences) - 5} more" if len(self.consequences) > 5 else ""
            lines.append(f"  also in this step: {shown}{more}" if self.severity == "warning"
                         else f"  later in the same step (consequences): {shown}{more}")
        if self.phase == "backward" and self.role.startswith("grad_output") and \
                self.severity != "warning":  # about a bad gradient's origin: errors only
            lines.append(f"  note: this gradient was already bad when it reached the output of "
                         f"{self.site}: the backward of the code that used that output outside "
                         f"the watched modules (usually the loss) produced it. The stack is "
                         f"where {self.site} was called; look at what consumes its output.")
        if self.operation is not None:
            lines.extend(self.operation.lines())
        elif self.drilldown:
            lines.append(f"  exact operation: {self.drilldown}")
        elif self.phase in ("forward", "backward", "grad") and self.severity != "warning":
            lines.append(f"  {SYNC_HINT}")
        if self.phase == "loss" and self.severity != "warning":
            lines.append("  note: this is the tensor backward() was called on (the loss), "
                         "recorded before backward ran; the model's records of this step "
                         "before it were finite. Look at the loss computation (targets, "
                         "scaling, reduction); the line below is the backward call.")
        user = self.user_frames()
        if user:
            lines.append("  produced by (your code, innermost first):")
            lines.extend(_format_frame(fr) for fr in user)
        lib = self.library_frames()
        if lib and user:
            lines.append("  through libraries (innermost first):")
            lines.extend(_format_frame(fr) for fr in lib)
        if self.stack and self.severity != "warning":  # a warning: the user's lines suffice
            lines.append("  full stack (most recent call last):")
            lines.extend(_format_frame(fr) for fr in self.stack)
        return "\n".join(lines)


def allow_inf_hint(site: str, phase: str, role: str) -> str:
    """How to allow ±Inf at a site (an attention mask, a masked score), or "" when NaN."""
    pattern = f"{site}.{role}" if phase == "input" else site
    return (f"if ±Inf is expected here (e.g. an attention mask with a finite value besides "
            f"0 and -inf), allow it: healthmon.watch(model, allow_inf=[\"{pattern}\"]), "
            f"or HEALTHMON_ALLOW_INF='{pattern}', or healthmon run --allow-inf '{pattern}' "
            f"(fnmatch patterns; NaN is never allowed; pure 0/-inf masks are allowed "
            f"without a pattern)")


_KIND_TEXT = {"nan": "NaN", "inf": "Inf", "label": "out-of-range labels",
              "index": "out-of-range embedding indices",
              "overflow": "overflow risk", "spike": "spike", "growth": "exponential growth",
              "dead": "dead", "frozen": "frozen parameter",
              "vanishing": "vanishing gradient"}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_USER_MODULES_IN_PACKAGE = ("demo.py",)


_INSTALL_MARKERS = (os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)


def _std_dirs() -> tuple:
    """The interpreter's standard library (and purelib / platlib) directories."""
    dirs = []
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            d = sysconfig.get_paths().get(key)
        except Exception:  # noqa: BLE001 - broken sysconfig: classify by markers only
            d = None
        if d:
            dirs.append(os.path.abspath(d) + os.sep)
    return tuple(dirs)


_STD_DIRS = _std_dirs()


def _library_dirs() -> tuple:
    dirs = [_PACKAGE_DIR]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    return tuple(dirs) + _STD_DIRS


def _is_package(filename: str) -> bool:
    """healthmon's own files (never shown as library frames either)."""
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) and \
        os.path.basename(path) not in _USER_MODULES_IN_PACKAGE


def _is_library(filename: str) -> bool:
    """Not the user's code: interpreter internals, healthmon, torch, the standard library
    and anything installed (site-packages / dist-packages: transformers, lightning,
    accelerate, ...)."""
    if filename.startswith("<"):  # <frozen runpy>, <string>
        return True
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return os.path.basename(path) not in _USER_MODULES_IN_PACKAGE
    if any(m in path for m in _INSTALL_MARKERS):
        return True
    return path.startswith(_library_dirs())


def _format_frame(fr: traceback.FrameSummary, indent: str = "    ") -> str:
    text = f"{indent}File \"{fr.filename}\", line {fr.lineno}, in {fr.name}"
    if fr.line:
        text += f"\n{indent}  {fr.line.strip()}"
    return text


class HealthError(RuntimeError):
    """Raised when a watched tensor goes bad; ``.anomaly`` holds the :class:`Anomaly`."""

    def __init__(self, anomaly: Anomaly, message: Optional[str] = None):
        self.anomaly = anomaly
        super().__init__(message if message is not None else anomaly.report())


class HealthWarning(UserWarning):
    """An early warning (overflow headroom, spike, growth, dead, frozen, vanishing): training
    goes on. ``.anomaly`` holds the finding (an :class:`Anomaly` with ``severity ==
    "warning"``); its fields are also on the warning itself.

    Attributes:
        kind: one of :data:`WARNING_KINDS`.
        site, phase, role, step, stats, stack: as on :class:`Anomaly`.
    """

    def __init__(self, anomaly: Anomaly):
        self.anomaly = anomaly
        self.kind, self.site, self.phase = anomaly.kind, anomaly.site, anomaly.phase
        self.role, self.step, self.stats = anomaly.role, anomaly.step, anomaly.stats
        self.stack = anomaly.stack
        super().__init__(anomaly.report())

    def __reduce__(self):  # pickles (e.g. across processes) with its finding, not the text
        return (type(self), (self.anomaly,))
