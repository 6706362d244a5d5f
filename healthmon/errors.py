"""`Anomaly` (one bad tensor, where and when it was seen) and `HealthError`."""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, List, Optional

PHASES = ("input", "forward", "backward", "grad", "label", "loss", "param")
# early-warning kinds (healthmon.rules); "nan" / "inf" / "label" are errors
WARNING_KINDS = ("overflow", "spike", "growth", "dead", "frozen", "vanishing")


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
        kind: ``"nan"``, ``"inf"`` or ``"label"``.
        stats: the :class:`~healthmon.TensorStats` (or ``LabelStats``) of the bad tensor.
        stack: frames of the code that produced it, outermost first (as
            ``traceback.extract_stack`` gives them).
        last_healthy: stats of the same site at its last healthy record, when known.
        rank: distributed rank that saw it (None when not distributed).
        consequences: later anomalies of the same step (NaN spreads; the first is the culprit).
        call: the n-th call of the module in the step (modules called several times).
        module_type: class name of the module (``Linear``), "" when not a module.
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
        """Frames of the stack outside torch, healthmon and the interpreter's own, innermost
        first (the demo and healthmon's tests count as user code)."""
        return [fr for fr in reversed(self.stack) if not _is_library(fr.filename)]

    def report(self) -> str:
        """The complete human report (what, where, last healthy stats, stack)."""
        lines = [f"healthmon{' warning' if self.severity == 'warning' else ''}: "
                 f"{self.headline()}"]
        hint = self.stats.hint() if hasattr(self.stats, "hint") else None
        if hint:
            lines.append(f"  hint: {hint}")
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
        if self.phase == "loss" and self.severity != "warning":
            lines.append("  note: this is the tensor backward() was called on (the loss), "
                         "recorded before backward ran; the model's records of this step "
                         "before it were finite. Look at the loss computation (targets, "
                         "scaling, reduction); the line below is the backward call.")
        user = self.user_frames()
        if user:
            lines.append("  produced by (your code, innermost first):")
            lines.extend(_format_frame(fr) for fr in user)
        if self.stack and self.severity != "warning":  # a warning: the user's lines suffice
            lines.append("  full stack (most recent call last):")
            lines.extend(_format_frame(fr) for fr in self.stack)
        return "\n".join(lines)


_KIND_TEXT = {"nan": "NaN", "inf": "Inf", "label": "out-of-range labels",
              "overflow": "overflow risk", "spike": "spike", "growth": "exponential growth",
              "dead": "dead", "frozen": "frozen parameter",
              "vanishing": "vanishing gradient"}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_USER_MODULES_IN_PACKAGE = ("demo.py",)


def _library_dirs() -> tuple:
    dirs = [_PACKAGE_DIR]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        dirs.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    return tuple(dirs)


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen runpy>, <string>
        return True
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return os.path.basename(path) not in _USER_MODULES_IN_PACKAGE
    return path.startswith(_library_dirs())


def _format_frame(fr: traceback.FrameSummary) -> str:
    text = f"    File \"{fr.filename}\", line {fr.lineno}, in {fr.name}"
    if fr.line:
        text += f"\n      {fr.line.strip()}"
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
