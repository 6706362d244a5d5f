"""`TensorStats` and the synchronous `stats()` entry point."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch

from . import ops
from ._layout import STATS_FIELDS


@dataclass(frozen=True)
class TensorStats:
    """Health statistics of one tensor (one pass of the fused kernel).

    Counts are ints; ``min``/``max`` are over finite values and NaN when there is none;
    ``sum``/``sumsq``/``absmax`` are over finite values (0 when there is none).
    """
    numel: int
    nan: int
    posinf: int
    neginf: int
    zeros: int
    finite: int
    min: float
    max: float
    sum: float
    sumsq: float
    absmax: float

    @classmethod
    def from_record(cls, record: Sequence[float]) -> "TensorStats":
        """Build from one record row (a float64 tensor of ``NUM_STATS`` values or a list)."""
        if isinstance(record, torch.Tensor):
            record = record.tolist()
        values = list(record)
        return cls(*(int(v) for v in values[:6]), *(float(v) for v in values[6:]))

    @property
    def mean(self) -> float:
        """Mean of the finite values (NaN when there is none)."""
        return self.sum / self.finite if self.finite else math.nan

    @property
    def norm(self) -> float:
        """L2 norm over the finite values."""
        return math.sqrt(self.sumsq)

    @property
    def rms(self) -> float:
        """Root mean square of the finite values (NaN when there is none)."""
        return math.sqrt(self.sumsq / self.finite) if self.finite else math.nan

    @property
    def nonfinite(self) -> int:
        """Count of NaN and ±Inf values."""
        return self.nan + self.posinf + self.neginf

    @property
    def has_nonfinite(self) -> bool:
        """True when any value is NaN or ±Inf."""
        return self.nonfinite > 0

    def as_dict(self) -> dict:
        """Field name -> value, plus ``norm`` and ``rms`` (for JSON records)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["norm"] = self.norm
        d["rms"] = self.rms
        return d

    def describe(self) -> str:
        """One line: non-finite counts out of numel and the finite range."""
        parts = []
        if self.nan:
            parts.append(f"{self.nan} NaN")
        if self.posinf:
            parts.append(f"{self.posinf} +Inf")
        if self.neginf:
            parts.append(f"{self.neginf} -Inf")
        bad = (", ".join(parts) + f" out of {self.numel} elements") if parts \
            else f"all {self.numel} elements finite"
        rng = (f"finite range [{self.min:.4g}, {self.max:.4g}], norm {self.norm:.4g}"
               if self.finite else "no finite values")
        return f"{bad}; {rng}"


assert tuple(f.name for f in fields(TensorStats)) == STATS_FIELDS

_NAN, _POSINF, _NEGINF, _ZEROS, _FINITE = (STATS_FIELDS.index(n) for n in
                                          ("nan", "posinf", "neginf", "zeros", "finite"))


def is_additive_mask(row: Sequence[float]) -> bool:
    """True when a record describes an additive attention mask: values only 0 and -inf
    (``nn.Transformer.generate_square_subsequent_mask``, HF extended masks use a finite
    minimum instead and are finite anyway): some -inf, some 0, every finite value 0
    (finite range [0, 0]), no NaN, no +inf. -inf next to nonzero finite values is not a
    mask (an overflow), nor is +inf.

    Args:
        row: one record row (``NUM_STATS`` floats, fields :data:`STATS_FIELDS`).
    """
    return (not row[_NAN] and not row[_POSINF] and row[_NEGINF] > 0
            and row[_ZEROS] > 0 and row[_ZEROS] == row[_FINITE])


def stats(tensor: torch.Tensor) -> TensorStats:
    """Synchronous fused statistics of one tensor.

    Args:
        tensor: any shape and layout, on any device; dtype float64/32/16, bfloat16, float8,
            an integer type or bool.
    Returns:
        :class:`TensorStats` (this call synchronises with the tensor's device).
    Raises:
        TypeError / ValueError: for non-tensors and unsupported tensors (complex, sparse,
            quantized, nested).
    """
    return TensorStats.from_record(ops.stats_record(tensor).cpu())
