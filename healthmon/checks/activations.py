"""Activation checks: dead / saturated units, and whether the model is nonlinear at all."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ._common import (Batch, CheckResult, assert_form, first_tensor, fmt, many_stats,
                      preserved_state, tensor_stats, timed)

# Activations whose output is exactly 0 on the negative side: a unit that is 0 for every
# sample of the batch is dead (no gradient flows through it).
ZERO_ACTIVATIONS: Tuple[Type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Threshold)
# Bounded activations: an output within `saturation` of a bound has a vanishing gradient.
# (lower bound, upper bound)
SATURATING_ACTIVATIONS: Dict[Type[nn.Module], Tuple[float, float]] = {
    nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0), nn.Hardsigmoid: (0.0, 1.0),
    nn.Softsign: (-1.0, 1.0), nn.Hardtanh: (-1.0, 1.0),
}
WATCHED = ZERO_ACTIVATIONS + tuple(SATURATING_ACTIVATIONS) + (nn.GELU, nn.SiLU, nn.ELU,
                                                              nn.LeakyReLU, nn.Softplus, nn.Mish)


def _inputs_of(batch_or_inputs: Union[Batch, torch.Tensor]) -> torch.Tensor:
    if isinstance(batch_or_inputs, torch.Tensor):
        return batch_or_inputs
    if isinstance(batch_or_inputs, (tuple, list)) and batch_or_inputs \
            and isinstance(batch_or_inputs[0], torch.Tensor):
        return batch_or_inputs[0]
    raise TypeError("healthmon.checks: expected inputs (a tensor) or a batch (inputs, targets)")


def _bounds(module: nn.Module) -> Optional[Tuple[float, float]]:
    if isinstance(module, nn.Hardtanh):  # also ReLU6 (0, 6)
        return (float(module.min_val), float(module.max_val))
    for cls, bounds in SATURATING_ACTIVATIONS.items():
        if isinstance(module, cls):
            return bounds
    return None


@timed
def dead_units(model: nn.Module, batch: Union[Batch, torch.Tensor], max_dead: float = 0.5,
               max_saturated: float = 0.5, saturation: float = 0.01,
               layers: Optional[Sequence[str]] = None) -> CheckResult:
    """Per activation layer: fraction of exactly-zero outputs, of dead units (channels that
    are zero for every sample and position) and of saturated outputs.

    Forward hooks on the activation *modules* (:data:`WATCHED`, or the modules named in
    ``layers``) record native statistics of their outputs during one forward pass without
    gradients; the hooks are removed afterwards. Functional activations (``F.relu``) are not
    seen: pass the surrounding modules in ``layers`` or use ``nn.ReLU`` modules.

    Args:
        model: any module.
        batch: ``(inputs, targets)`` or just the inputs tensor ``(B, ...)``.
        max_dead: fail when a layer has more than this fraction of dead units.
        max_saturated: fail when more than this fraction of a bounded activation's outputs
            lie within ``saturation`` of a bound (e.g. sigmoid < 0.01 or > 0.99).
        saturation: distance to a bound counted as saturated.
        layers: qualified module names to watch instead of the activation modules.
    Returns:
        :class:`CheckResult`; ``details["layers"]``: {name: {"zero_fraction",
        "dead_units", "units", "dead_fraction", "saturated_fraction"}}.
    """
    inputs = _inputs_of(batch)
    modules = dict(model.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"healthmon.checks.dead_units: no module named {missing}")
        watched = {n: modules[n] for n in layers}
    else:
        watched = {n: m for n, m in modules.items() if isinstance(m, WATCHED)}
    found: Dict[str, dict] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            out = first_tensor(output).detach()
            if not out.is_floating_point() or out.numel() == 0:
                return
            s = tensor_stats(out)
            unit_dim = 1 if out.dim() >= 2 else 0
            units = out.shape[unit_dim] if out.dim() else 1
            # one multi-tensor stats call: zeros per unit over batch and positions
            per_unit = many_stats([out.select(unit_dim, u) for u in range(units)]) \
                if out.dim() else [s]
            dead = sum(1 for u in per_unit if u.zeros == u.numel)
            entry = dict(zero_fraction=s.zeros / s.numel, units=units, dead_units=dead,
                         dead_fraction=dead / max(units, 1), saturated_fraction=0.0,
                         kind=type(module).__name__)
            bounds = _bounds(module)
            if bounds is not None:
                low, high = bounds
                near = (out <= low + saturation) | (out >= high - saturation)
                entry["saturated_fraction"] = tensor_stats(near).sum / s.numel
            key = name if name not in found else f"{name}#{len(found)}"
            found[key] = entry
        return hook

    try:
        with preserved_state(model), torch.no_grad():
            for name, module in watched.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            model(inputs)
    finally:
        for h in handles:
            h.remove()
    if not watched:
        return CheckResult(
            "dead_units", True,
            "ok (nothing to check): no activation modules (ReLU, Sigmoid, Tanh, GELU, ...) in "
            "the model. If it uses functional activations pass layers=[...]; if it has none, "
            "a stack of Linear/Conv layers collapses to ONE linear map (see nonlinearity)",
            dict(layers={}))
    lines, bad = [], []
    for name, e in found.items():
        flags = []
        if e["dead_fraction"] > max_dead:
            flags.append(f"DEAD {e['dead_units']}/{e['units']} units")
        if e["saturated_fraction"] > max_saturated:
            flags.append(f"SATURATED {e['saturated_fraction']:.0%}")
        if flags:
            bad.append(name)
        lines.append(f"  {name or '<model>'} ({e['kind']}): zeros {e['zero_fraction']:.0%}, "
                     f"dead units {e['dead_units']}/{e['units']}, saturated "
                     f"{e['saturated_fraction']:.0%}" + (" <- " + ", ".join(flags) if flags
                                                         else ""))
    ok = not bad
    head = (f"ok: {len(found)} activation layer(s), none dead or saturated" if ok else
            f"FAIL: {len(bad)} layer(s) with mostly dead or saturated units: {', '.join(bad)} "
            "(check the init / bias, the learning rate, the input scale)")
    return CheckResult("dead_units", ok, "\n".join([head] + lines), dict(layers=found))


@timed
def nonlinearity(model: nn.Module, batch: Union[Batch, torch.Tensor],
                 tolerance: float = 1e-4) -> CheckResult:
    """Check that the model is not an affine map of its input (missing activations).

    For pairs of different samples ``a, b`` of the batch, an affine model satisfies
    ``f((a + b) / 2) == (f(a) + f(b)) / 2``. A stack of Linear/Conv layers without an
    activation between them (or with every activation removed) is affine, so it is only as
    expressive as one linear layer. Runs in eval mode (dropout off; BatchNorm with running
    stats is affine and does not count as nonlinear).

    Args:
        model: ``model(inputs)`` -> tensor ``(B, ...)``; samples processed independently.
        batch: ``(inputs, targets)`` or inputs, floating ``(B, ...)`` with ``B >= 2``.
        tolerance: relative residual below which the model counts as affine.
    Returns:
        :class:`CheckResult`; ``details``: ``relative_residual`` =
        ``rms(f(mid) - mid(f)) / rms(f(a) - f(b))``.
    """
    inputs = _inputs_of(batch)
    if not inputs.is_floating_point() or inputs.dim() == 0 or inputs.shape[0] < 2:
        raise ValueError("healthmon.checks.nonlinearity: need floating inputs (B >= 2, ...)")
    with preserved_state(model), torch.no_grad():
        model.eval()
        a = inputs
        b = inputs.roll(1, dims=0)
        fa, fb = first_tensor(model(a)), first_tensor(model(b))
        fmid = first_tensor(model((a + b) / 2))
        residual = tensor_stats(fmid - (fa + fb) / 2).rms
        spread = tensor_stats(fa - fb).rms
    rel = residual / spread if spread > 0 else 0.0
    details = dict(relative_residual=rel, residual_rms=residual, output_spread_rms=spread)
    if spread == 0:
        return CheckResult("nonlinearity", False,
                           "FAIL: the output is the same for every sample: the model ignores "
                           "its input (constant output)", details)
    if rel <= tolerance:
        return CheckResult(
            "nonlinearity", False,
            f"FAIL: the model is an affine map of its input (relative residual {fmt(rel)} <= "
            f"{fmt(tolerance)}): f((a+b)/2) == (f(a)+f(b))/2. An activation is missing between "
            "the Linear/Conv layers, so the whole stack collapses to one linear layer",
            details)
    return CheckResult("nonlinearity", True,
                       f"ok: the model is nonlinear in its input (relative residual "
                       f"{fmt(rel)})", details)


assert_dead_units = assert_form(dead_units)
assert_nonlinearity = assert_form(nonlinearity)
