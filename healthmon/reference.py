"""Pure-torch float64 reference of every native op.

These functions are the oracle of the tests and the fallback when the compiled extension
is not available (see :mod:`healthmon.ops`). They favour clarity over speed: each converts
its input to float64 / int64 and computes every statistic with plain torch ops.
Signatures and outputs match the native ops exactly (see ``csrc/schemas.cpp``).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from ._layout import LABEL, NUM_LABEL, NUM_STATS, STAT


def stats_ref(x: torch.Tensor) -> torch.Tensor:
    """Statistics of one tensor.

    Args:
        x: any shape, any floating / integer / bool dtype, any layout.
    Returns:
        float64 tensor of shape ``(NUM_STATS,)`` on ``x.device``, fields as in
        :data:`healthmon._layout.STATS_FIELDS`.
    """
    xd = x.detach().reshape(-1).to(torch.float64)
    nan = torch.isnan(xd)
    posinf = xd == math.inf
    neginf = xd == -math.inf
    finite_mask = torch.isfinite(xd)
    fin = xd[finite_mask]
    out = torch.zeros(NUM_STATS, dtype=torch.float64, device=x.device)
    out[STAT["numel"]] = xd.numel()
    out[STAT["nan"]] = nan.sum()
    out[STAT["posinf"]] = posinf.sum()
    out[STAT["neginf"]] = neginf.sum()
    out[STAT["zeros"]] = (xd == 0).sum()
    out[STAT["finite"]] = fin.numel()
    if fin.numel():
        out[STAT["min"]] = fin.min()
        out[STAT["max"]] = fin.max()
        out[STAT["sum"]] = fin.sum()
        out[STAT["sumsq"]] = (fin * fin).sum()
        out[STAT["absmax"]] = fin.abs().max()
    else:
        out[STAT["min"]] = math.nan
        out[STAT["max"]] = math.nan
    return out


def stats_into_ref(x: torch.Tensor, records: torch.Tensor, slot: int) -> None:
    """Write :func:`stats_ref` of ``x`` into row ``slot`` of ``records`` (float64, ``(N, NUM_STATS)``)."""
    records[slot].copy_(stats_ref(x))


def multi_stats_ref(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stats of each tensor of ``xs``: float64 ``(len(xs), NUM_STATS)``."""
    if not xs:
        return torch.zeros(0, NUM_STATS, dtype=torch.float64)
    return torch.stack([stats_ref(x) for x in xs])


def multi_stats_into_ref(xs: Sequence[torch.Tensor], records: torch.Tensor,
                         slots: Sequence[int]) -> None:
    """Write the stats of ``xs[i]`` into row ``slots[i]`` of ``records``."""
    for x, slot in zip(xs, slots):
        stats_into_ref(x, records, slot)


INT64_MAX = 2**63 - 1


def _labels_int64(target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``target`` as int64 (same shape) and a bool mask of the labels that do not fit int64.

    Only uint64 labels can overflow: one >= 2**63 saturates to ``INT64_MAX`` and is marked
    (``.to(torch.int64)`` would wrap it to a negative number, and 2**64 - 1 to -1, which could
    even pass as ``ignore_index``). torch implements few ops for uint64 (no comparison, no
    min / max), so its bits are reinterpreted as int64: the labels that overflow are exactly the
    ones that read as negative. Bool labels are 0 / 1 (any non-zero byte is True).
    """
    t = target.detach()
    if t.dtype == torch.uint64:
        t = t.view(torch.int64)
        over = t < 0
        return torch.where(over, torch.full_like(t, INT64_MAX), t), over
    return t.to(torch.int64), torch.zeros(t.shape, dtype=torch.bool, device=t.device)


def _bad_and_ignored(t: torch.Tensor, over: torch.Tensor, num_classes: int,
                     ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    ignored = (t == ignore_index) & ~over
    bad = (over | (t < 0) | (t >= num_classes)) & ~ignored
    return bad, ignored


def label_check_ref(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Range check of integer labels.

    Args:
        target: integer or bool tensor, any shape (e.g. ``(B,)`` or ``(B, H, W)``).
        num_classes: valid labels are ``0 <= t < num_classes``.
        ignore_index: labels equal to it are never bad.
    Returns:
        int64 tensor ``(NUM_LABEL,)`` on ``target.device``: numel, bad, ignored, min, max,
        first_bad (row-major index, -1 when none).

    A uint64 label >= 2**63 is always bad (it cannot equal any int64 ``ignore_index``) and is
    reported saturated to ``INT64_MAX`` in min / max, as the native kernels do.
    """
    t, over = _labels_int64(target)
    t, over = t.reshape(-1), over.reshape(-1)
    bad, ignored = _bad_and_ignored(t, over, num_classes, ignore_index)
    out = torch.zeros(NUM_LABEL, dtype=torch.int64, device=target.device)
    out[LABEL["numel"]] = t.numel()
    out[LABEL["bad"]] = bad.sum()
    out[LABEL["ignored"]] = ignored.sum()
    out[LABEL["first_bad"]] = -1
    if t.numel():
        out[LABEL["min"]] = t.min()
        out[LABEL["max"]] = t.max()
        where = torch.nonzero(bad)
        if where.numel():
            out[LABEL["first_bad"]] = where[0, 0]
    return out


def label_sanitize_ref(target: torch.Tensor, num_classes: int,
                       ignore_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`label_check_ref` plus an int64 copy of ``target`` (same shape, contiguous)
    with every bad label replaced by ``ignore_index``."""
    record = label_check_ref(target, num_classes, ignore_index)
    t, over = _labels_int64(target)
    bad, _ = _bad_and_ignored(t, over, num_classes, ignore_index)
    clean = torch.where(bad, torch.full_like(t, ignore_index), t).contiguous()
    return record, clean
