"""Data checks: input scale, channel layout, constant channels, non-finite inputs."""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch

from ._common import (Batch, CheckResult, assert_form, fmt, per_channel_stats, std_of,
                      tensor_stats, timed)

# channel counts that usually mean "colour channels" (grey, RGB, RGBA)
_COLOUR_CHANNELS = (1, 2, 3, 4)


def _inputs(batch: Union[Batch, torch.Tensor]) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("healthmon.checks.input_ranges: expected a batch (inputs, targets) or an "
                    f"inputs tensor, got {type(batch).__name__}")


@timed
def input_ranges(batch: Union[Batch, torch.Tensor], channel_dim: int = 1,
                 expected_channels: Optional[int] = None, max_abs_mean: float = 3.0,
                 max_std: float = 5.0, min_std: float = 1e-6,
                 max_channels: int = 4096) -> CheckResult:
    """Check that the inputs are normalised, finite, laid out channel-first, not constant.

    Per channel (slice ``inputs.select(channel_dim, c)``; features for ``(B, F)`` inputs)
    the native statistics give mean, std, min and max. Flagged:

    - integer inputs (e.g. uint8 images not converted and scaled);
    - NaN / Inf values;
    - not normalised: a channel with ``|mean| > max_abs_mean`` or ``std > max_std``
      (e.g. pixels in [0, 255]; aim for mean ~0 and std ~1, or at least [0, 1]);
    - constant channels (``std <= min_std``: a dead sensor, a padding channel, a bug that
      broadcasts one value);
    - channels mixed up: 4-D / 5-D inputs whose ``channel_dim`` is large while the last
      dimension looks like colour channels (channel-last ``(B, H, W, C)`` given to a
      channel-first model), or ``shape[channel_dim] != expected_channels``.

    Args:
        batch: ``(inputs, targets)`` or the inputs tensor ``(B, C, ...)`` / ``(B, F)``.
        channel_dim: the channel dimension the model expects (1 for NCHW / NCL / (B, F)).
        expected_channels: number of channels the model expects (e.g. the first Conv's
            ``in_channels``), when known.
        max_abs_mean, max_std, min_std: thresholds described above.
        max_channels: above this many channels only whole-tensor statistics are computed.
    Returns:
        :class:`CheckResult`; ``details``: ``mean``, ``std`` (per channel lists), ``min``,
        ``max`` (whole tensor), and lists ``constant_channels``, ``unnormalised_channels``.
    """
    x = _inputs(batch)
    problems: List[str] = []
    notes: List[str] = []
    details: dict = dict(shape=tuple(x.shape), dtype=str(x.dtype))
    if not x.is_floating_point():
        problems.append(f"inputs have integer dtype {x.dtype}: convert to float and normalise "
                        "(e.g. x.float() / 255, then subtract the mean and divide by the std)")
    whole = tensor_stats(x)
    details.update(min=whole.min, max=whole.max, mean=whole.mean, std=std_of(whole))
    if whole.has_nonfinite:
        problems.append(f"inputs contain non-finite values: {whole.describe()}")
    if x.dim() >= 4 and channel_dim == 1:
        c, last = x.shape[1], x.shape[-1]
        if (last in _COLOUR_CHANNELS and c not in _COLOUR_CHANNELS
                and (expected_channels is None or expected_channels == last)):
            problems.append(
                f"channels mixed up? shape {tuple(x.shape)} looks channel-last (B, H, W, C="
                f"{last}) but the model expects channel-first (B, C, H, W): use "
                "x.permute(0, 3, 1, 2), not x.view/reshape")
    if expected_channels is not None and x.dim() >= 2 and x.shape[channel_dim] != expected_channels:
        problems.append(f"inputs have {x.shape[channel_dim]} channels along dim {channel_dim}, "
                        f"the model expects {expected_channels}: channels mixed up / wrong layout")
    constant, unnormalised = [], []
    if x.dim() >= 2 and 0 < x.shape[channel_dim] <= max_channels and x.shape[0] > 0:
        per = per_channel_stats(x, channel_dim)
        means = [s.mean for s in per]
        stds = [std_of(s) for s in per]
        details.update(channel_mean=means, channel_std=stds)
        constant = [c for c, sd in enumerate(stds) if not sd > min_std]
        unnormalised = [c for c, (m, sd) in enumerate(zip(means, stds))
                        if abs(m) > max_abs_mean or sd > max_std]
    elif whole.finite and (abs(whole.mean) > max_abs_mean or std_of(whole) > max_std):
        unnormalised = [-1]
    details.update(constant_channels=constant, unnormalised_channels=unnormalised)
    if unnormalised:
        which = ("the inputs" if unnormalised == [-1] else
                 f"{len(unnormalised)} channel(s) {unnormalised[:8]}")
        problems.append(
            f"not normalised: {which} have mean/std beyond |mean| <= {fmt(max_abs_mean)}, "
            f"std <= {fmt(max_std)} (whole batch: mean {fmt(whole.mean)}, std "
            f"{fmt(std_of(whole))}, range [{fmt(whole.min)}, {fmt(whole.max)}]); normalise "
            "to mean 0 / std 1 (or at least [0, 1])")
    if constant:
        shown = ", ".join(map(str, constant[:10])) + (", ..." if len(constant) > 10 else "")
        problems.append(f"{len(constant)} constant channel(s) along dim {channel_dim} (the same "
                        f"value for every sample and position): {shown}")
    if x.dim() >= 1 and x.shape[0] > 1 and whole.finite and std_of(whole) == 0:
        notes.append("every input value is identical")
    ok = not problems
    head = (f"ok: inputs {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}, mean "
            f"{fmt(whole.mean)}, std {fmt(std_of(whole))}, range [{fmt(whole.min)}, "
            f"{fmt(whole.max)}]" if ok else
            f"FAIL: {len(problems)} problem(s) with inputs {tuple(x.shape)}")
    lines = [head] + ["  - " + p for p in problems] + ["  note: " + n for n in notes]
    return CheckResult("input_ranges", ok, "\n".join(lines), details)


assert_input_ranges = assert_form(input_ranges)
