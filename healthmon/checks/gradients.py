"""Gradient checks: samples must not mix across the batch; every parameter must learn."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ._common import (Batch, CheckResult, OptimizerSpec, assert_form, compute_loss,
                      first_tensor, fmt, make_optimizer, many_stats, preserved_state,
                      split_batch, timed)

# Layers whose training-mode output legitimately depends on the other samples of the batch.
BATCH_STAT_LAYERS = (nn.modules.batchnorm._BatchNorm,)


@timed
def batch_independence(model: nn.Module, inputs: torch.Tensor,
                       samples: Optional[Sequence[int]] = None,
                       tolerance: float = 0.0, seed: int = 0) -> CheckResult:
    """Check that output ``i`` depends on input ``i`` only (no mixing across the batch).

    For each checked sample ``i``, a random projection of ``model(inputs)[i]`` is
    back-propagated to the inputs; the gradient must be nonzero at sample ``i`` and exactly
    zero at every other sample. A ``view``/``reshape`` where a ``permute``/``transpose`` was
    meant (e.g. ``x.view(C, B, -1)`` of a ``(B, C, H, W)`` tensor) fails this.

    BatchNorm-like layers (:data:`BATCH_STAT_LAYERS`) mix samples by design in training mode,
    so they are switched to eval mode for the check (and reported); other modules keep their
    mode. Dropout in train mode is fine (per-sample masks).

    Args:
        model: ``model(inputs)`` -> tensor ``(B, ...)`` (or a tuple/dict: its first tensor).
        inputs: floating tensor ``(B, ...)`` with ``B >= 2`` on the model's device.
        samples: indices to check (default: first and last).
        tolerance: largest |gradient| at another sample still counted as zero
            (0: exact; raise a little for models with intended cross-sample numerics).
        seed: seed of the random projection.
    Returns:
        :class:`CheckResult`; ``details``: ``leaks`` {i: [other samples with gradient]},
        ``self_grad_norm`` {i: norm}, ``eval_layers`` (names switched to eval).
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        raise TypeError("healthmon.checks.batch_independence: inputs must be a floating tensor "
                        "(B, ...); for integer inputs (token ids) check an embedding output")
    batch_size = inputs.shape[0] if inputs.dim() else 0
    if batch_size < 2:
        raise ValueError("healthmon.checks.batch_independence: need a batch of at least 2 "
                         f"samples, got shape {tuple(inputs.shape)}")
    samples = list(samples) if samples is not None else sorted({0, batch_size - 1})
    generator = torch.Generator(device="cpu").manual_seed(seed)
    leaks, self_norm, eval_layers = {}, {}, []
    with preserved_state(model):
        for name, module in model.named_modules():
            if isinstance(module, BATCH_STAT_LAYERS) and module.training:
                module.eval()
                eval_layers.append(name or type(module).__name__)
        x = inputs.detach().clone().requires_grad_(True)
        outputs = first_tensor(model(x))
        if outputs.dim() == 0 or outputs.shape[0] != batch_size:
            return CheckResult("batch_independence", False,
                               f"FAIL: the output has shape {tuple(outputs.shape)}; expected the "
                               f"batch dimension {batch_size} first", {})
        for i in samples:
            weights = torch.randn(outputs[i].shape, generator=generator).to(outputs)
            (grad,) = torch.autograd.grad((outputs[i] * weights).sum(), x, retain_graph=True,
                                          allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(x)
            per_sample = many_stats([grad[j] for j in range(batch_size)])
            self_norm[i] = per_sample[i].norm
            leaks[i] = [j for j, s in enumerate(per_sample)
                        if j != i and (s.absmax > tolerance or s.has_nonfinite)]
    bad = {i: js for i, js in leaks.items() if js}
    dead = [i for i, n in self_norm.items() if n == 0.0]
    details = dict(leaks=leaks, self_grad_norm=self_norm, eval_layers=eval_layers,
                   samples=samples)
    lines: List[str] = []
    if bad:
        for i, js in bad.items():
            shown = ", ".join(map(str, js[:8])) + (", ..." if len(js) > 8 else "")
            lines.append(f"  - output of sample {i} has a nonzero gradient with respect to "
                         f"the inputs of {len(js)} other sample(s): {shown}")
        lines.append("  the model mixes samples across the batch: look for a view()/reshape() "
                     "where permute()/transpose() was meant, or a reduction over dim 0")
    if dead:
        lines.append(f"  - output of sample(s) {dead} does not depend on its own input at all "
                     "(zero gradient): is the input used? is the output constant?")
    if eval_layers:
        lines.append(f"  note: {len(eval_layers)} batch-statistics layer(s) switched to eval "
                     f"mode for this check: {', '.join(eval_layers[:6])}"
                     + (", ..." if len(eval_layers) > 6 else ""))
    ok = not bad and not dead
    if ok:
        head = (f"ok: outputs of samples {samples} depend only on their own inputs")
    elif bad:
        head = "FAIL: samples are mixed across the batch"
    else:
        head = "FAIL: an output does not depend on its own input"
    return CheckResult("batch_independence", ok, "\n".join([head] + lines), details)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in patterns)


@timed
def parameters_update(model: nn.Module, batch: Batch, loss_fn: Callable,
                      optimizer: OptimizerSpec = None, lr: float = 1e-3,
                      expect_frozen: Iterable[str] = ()) -> CheckResult:
    """One training step; name every parameter that got no gradient, a zero gradient, a
    non-finite gradient, or did not change.

    Args:
        model: any module.
        batch: ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar float tensor.
        optimizer: None (Adam with ``lr``: every parameter with a nonzero gradient moves), an
            optimizer class or factory ``params -> Optimizer``, or your optimizer instance
            (then parameters missing from it are reported; its state is restored).
        lr: learning rate of the default Adam.
        expect_frozen: names (or module prefixes, e.g. ``"backbone"``) of parameters that are
            meant to stay frozen; they are not reported.
    Returns:
        :class:`CheckResult`; ``details``: lists of parameter names ``no_grad``,
        ``zero_grad``, ``nonfinite_grad``, ``frozen``, ``unchanged``, ``not_in_optimizer``.
    All parameters are considered (frozen ones are temporarily given ``requires_grad=True``
    to tell "frozen by mistake" from "disconnected"); everything is restored afterwards.
    """
    inputs, targets = split_batch(batch)
    expect_frozen = list(expect_frozen)
    named = list(model.named_parameters())
    given = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    found = {k: [] for k in ("no_grad", "zero_grad", "nonfinite_grad", "frozen", "unchanged",
                             "not_in_optimizer", "frozen_but_connected")}
    with preserved_state(model, given):
        frozen = {n for n, p in named if not p.requires_grad}
        trainable = [p for n, p in named if p.requires_grad]
        opt = make_optimizer(optimizer, trainable, lr) if trainable else None
        in_opt = ({id(p) for g in opt.param_groups for p in g["params"]}
                  if opt is not None else set())
        before = [p.detach().clone() for _, p in named]
        for _, p in named:  # to see whether frozen parameters are connected to the loss
            p.requires_grad_(True)
            p.grad = None
        loss = compute_loss(loss_fn, model(inputs), targets)
        loss.backward()
        frozen_grads = {n: p.grad for n, p in named if n in frozen}
        for n, p in named:
            if n in frozen:
                p.grad = None
                p.requires_grad_(False)
        grads = [(n, p.grad) for n, p in named if p.grad is not None]
        grad_stats = dict(zip([n for n, _ in grads], many_stats([g for _, g in grads])))
        if opt is not None:
            opt.step()
        diffs = many_stats([p.detach() - b for (_, p), b in zip(named, before)])
        for (n, p), d in zip(named, diffs):
            if n in frozen:
                if _matches(n, expect_frozen):
                    continue
                found["frozen"].append(n)
                g = frozen_grads.get(n)
                if g is not None:
                    found["frozen_but_connected"].append(n)
                continue
            s = grad_stats.get(n)
            if s is None:
                found["no_grad"].append(n)
            elif s.has_nonfinite:
                found["nonfinite_grad"].append(n)
            elif s.zeros == s.numel:
                found["zero_grad"].append(n)
            if id(p) not in in_opt:
                found["not_in_optimizer"].append(n)
            if d.zeros == d.numel and not _matches(n, expect_frozen):
                found["unchanged"].append(n)
    # a parameter with no / zero gradient obviously does not change: report it once
    explained = set(found["no_grad"]) | set(found["zero_grad"]) | set(found["nonfinite_grad"])
    found["unchanged"] = [n for n in found["unchanged"] if n not in explained]
    messages = {
        "no_grad": "got NO gradient (not connected to the loss: layer defined but not used, "
                   "output discarded, or .detach()/.data/no_grad in the forward)",
        "zero_grad": "got an all-zero gradient (dead path: e.g. dead ReLUs, a multiplication "
                     "by zero, a masked-out branch)",
        "nonfinite_grad": "got NaN/Inf in its gradient",
        "frozen": "has requires_grad=False and did not change (frozen by mistake? pass "
                  "expect_frozen=[...] if intended)",
        "not_in_optimizer": "has a gradient but is not in the optimizer (optimizer built "
                            "before the layer was added?)",
        "unchanged": "did not change after the optimizer step although it has a gradient "
                     "(learning rate 0 or too small for its magnitude?)",
    }
    lines = []
    for key, message in messages.items():
        names = found[key]
        if names:
            shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10
                                             else "")
            lines.append(f"  - {len(names)} parameter(s) {message}: {shown}")
    if found["frozen_but_connected"]:
        lines.append("    (the frozen ones do lie on the loss path: with requires_grad=True "
                     "they would get a gradient)")
    ok = not lines
    total = len(named)
    head = (f"ok: all {total} parameter tensors got a nonzero gradient and changed "
            f"(loss {fmt(float(loss.detach()))})" if ok else
            f"FAIL: {sum(len(found[k]) for k in messages)} problem(s) among {total} "
            "parameter tensors")
    return CheckResult("parameters_update", ok, "\n".join([head] + lines), found)


assert_batch_independence = assert_form(batch_independence)
assert_parameters_update = assert_form(parameters_update)
