"""Loss checks: the loss at initialisation, and overfitting one small batch."""
from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import nn

from .. import ops
from .._layout import LABEL
from ._common import (Batch, CheckResult, OptimizerSpec, assert_form, compute_loss,
                      first_tensor, fmt, looks_like_probabilities, make_optimizer,
                      preserved_state, split_batch, tensor_stats, timed)

_PROBABILITY_HINT = (
    "the model outputs look like probabilities (every row in [0, 1], summing to 1), but a "
    "cross-entropy style loss applies log_softmax itself: softmax applied twice? Return logits "
    "from the model (or pass expect_logits=False if loss_fn really takes probabilities).")


def _accuracy(outputs: torch.Tensor, targets) -> Optional[float]:
    """Fraction of ``argmax(outputs, 1) == targets`` when targets are int class indices
    ``(B, ...)`` matching ``outputs`` ``(B, C, ...)``; None otherwise."""
    if (not isinstance(targets, torch.Tensor) or targets.is_floating_point()
            or outputs.dim() != targets.dim() + 1 or outputs.shape[0] != targets.shape[0]):
        return None
    correct = (outputs.detach().argmax(dim=1) == targets).to(torch.float32)
    s = tensor_stats(correct)
    return s.sum / s.numel if s.numel else None


@timed
def initial_loss(model: nn.Module, batch: Batch, loss_fn: Callable, num_classes: int,
                 tolerance: float = 0.25, expect_logits: bool = True) -> CheckResult:
    """Check that the loss of the untrained model is about ``log(num_classes)``.

    At initialisation a classifier should be unsure: every class about equally likely, so the
    cross-entropy is ``-log(1/num_classes) = log(num_classes)``. Much higher means
    over-confident wrong logits (final layer initialised too large); much lower means the
    task leaks or the loss is not what you think.

    Args:
        model: the classifier, ``model(inputs)`` -> logits float ``(B, num_classes, ...)``.
        batch: ``(inputs, targets)``; targets int64 class indices ``(B, ...)``.
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar, a mean cross-entropy.
        num_classes: number of classes (>= 2).
        tolerance: allowed relative deviation ``|measured - expected| / expected``.
        expect_logits: also fail when the outputs look like softmax probabilities.
    Returns:
        :class:`CheckResult`; ``details``: ``expected``, ``measured``, ``relative_error``,
        ``logit_rms``, ``outputs_are_probabilities``.
    The model is run without gradients in its current train/eval mode; all state is restored.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"healthmon.checks.initial_loss: num_classes must be an int >= 2, "
                         f"got {num_classes!r}")
    inputs, targets = split_batch(batch)
    with preserved_state(model), torch.no_grad():
        outputs = model(inputs)
        loss = compute_loss(loss_fn, outputs, targets)
        logits = first_tensor(outputs)
        logit_stats = tensor_stats(logits)
        probabilities = expect_logits and looks_like_probabilities(logits)
        labels = (ops.label_record(targets, num_classes).tolist()
                  if isinstance(targets, torch.Tensor) and ops.unsupported_reason(
                      targets, ops.LABEL_DTYPES) is None else None)
    measured = float(loss)
    expected = math.log(num_classes)
    rel = abs(measured - expected) / expected if math.isfinite(measured) else math.inf
    details = dict(expected=expected, measured=measured, relative_error=rel,
                   logit_rms=logit_stats.rms, outputs_are_probabilities=probabilities)
    head = (f"initial loss {fmt(measured)}, expected about log({num_classes}) = {fmt(expected)} "
            f"(off by {rel:.0%}, tolerance {tolerance:.0%})")
    problems: List[str] = []
    if not math.isfinite(measured):
        problems.append("the loss is not finite at initialisation; "
                        f"outputs: {logit_stats.describe()}")
    elif rel > tolerance and measured > expected:
        problems.append(f"too high: the model is confidently wrong at init (logit rms "
                        f"{fmt(logit_stats.rms)}, absmax {fmt(logit_stats.absmax)}); "
                        "initialise the last layer smaller (e.g. zero weights and bias)")
    elif rel > tolerance:
        problems.append("too low for an untrained model: check that targets do not leak into "
                        "the inputs and that loss_fn is a mean cross-entropy over num_classes")
    if probabilities:
        problems.append(_PROBABILITY_HINT)
    if labels is not None and labels[LABEL["bad"]]:
        problems.append(f"{labels[LABEL['bad']]} target label(s) outside [0, {num_classes}) "
                        f"(labels range over [{labels[LABEL['min']]}, {labels[LABEL['max']]}], "
                        f"first bad at flat index {labels[LABEL['first_bad']]})")
        details["bad_labels"] = labels[LABEL["bad"]]
    ok = not problems
    report = ("ok: " if ok else "FAIL: ") + head
    if problems:
        report += "\n" + "\n".join("  - " + p for p in problems)
    return CheckResult("initial_loss", ok, report, details)


@timed
def overfit_batch(model: nn.Module, batch: Batch, loss_fn: Callable, steps: int = 150,
                  optimizer: OptimizerSpec = None, lr: float = 1e-2, max_ratio: float = 0.1,
                  near_zero: float = 0.05, allow_negative_loss: bool = False,
                  expect_logits: bool = True) -> CheckResult:
    """Train on one small batch for ``steps`` steps; the loss must fall close to zero.

    A model that cannot memorise 8 to 64 samples has a bug (a collapsed / linear stack,
    softmax applied twice, labels not aligned, a frozen or disconnected trunk, a learning
    rate far off). A loss that goes negative and keeps falling usually has the wrong sign.

    Args:
        model: any module; ``model(inputs)`` -> outputs for ``loss_fn``.
        batch: ``(inputs, targets)``, a few samples (the check trains on exactly this batch).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar float tensor.
        steps: optimisation steps.
        optimizer: None (Adam with ``lr``), an optimizer class or factory ``params -> Optimizer``
            (recommended), or an optimizer instance over the model's parameters (its state is
            restored afterwards).
        lr: learning rate of the default Adam.
        max_ratio: pass when ``final <= max_ratio * initial`` ...
        near_zero: ... or when ``final <= near_zero``.
        allow_negative_loss: losses that are legitimately negative (e.g. some likelihoods).
        expect_logits: mention softmax-twice when the outputs look like probabilities.
    Returns:
        :class:`CheckResult`; ``details``: ``losses`` (list of floats, one per step plus the
        final one), ``initial``, ``final``, ``min``, ``accuracy_before/after`` (classification).
    The model is trained in its current mode; parameters, buffers, grads, mode, RNG (and the
    optimizer's state when an instance is given) are restored afterwards.
    """
    inputs, targets = split_batch(batch)
    given = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    losses: List[float] = []
    acc_before = acc_after = None
    probabilities = False
    with preserved_state(model, given):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return CheckResult("overfit_batch", False,
                               "FAIL: the model has no parameter with requires_grad=True; "
                               "nothing can be trained", {})
        opt = make_optimizer(optimizer, params, lr)
        for step in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = compute_loss(loss_fn, outputs, targets)
            value = float(loss.detach())
            losses.append(value)
            if step == 0:
                acc_before = _accuracy(first_tensor(outputs), targets)
            if step == steps or not math.isfinite(value):
                acc_after = _accuracy(first_tensor(outputs), targets)
                probabilities = expect_logits and looks_like_probabilities(first_tensor(outputs))
                break
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
    initial, final = losses[0], losses[-1]
    finite = all(math.isfinite(v) for v in losses)
    details = dict(losses=losses, initial=initial, final=final,
                   min=min(losses) if finite else math.nan,
                   accuracy_before=acc_before, accuracy_after=acc_after, steps=len(losses) - 1)
    acc = ""
    if acc_before is not None and acc_after is not None:
        acc = f"; batch accuracy {acc_before:.0%} -> {acc_after:.0%}"
    head = f"loss {fmt(initial)} -> {fmt(final)} in {len(losses) - 1} steps{acc}"
    problems: List[str] = []
    if not finite:
        problems.append(f"the loss became non-finite at step {len(losses) - 1}: learning rate "
                        "too high, or an unstable op (log of 0, division by 0, exp overflow)")
    elif final < 0 and not allow_negative_loss:
        trend = "and kept falling without bound" if final < initial - 1.0 else ""
        problems.append(
            f"the loss went negative ({fmt(final)}) {trend}: the loss probably has the wrong "
            "sign (minimising -loss maximises the error"
            + (f"; batch accuracy fell to {acc_after:.0%}" if acc_after is not None else "")
            + "). Pass allow_negative_loss=True if negative values are legitimate.")
    elif final > initial:
        problems.append("the loss went UP while training on a single batch: wrong sign of the "
                        "loss, or a learning rate far too high")
    elif not (final <= max_ratio * initial or final <= near_zero):
        problems.append(
            f"the model cannot memorise one batch: the loss only fell to {final / initial:.0%} "
            f"of its initial value (need <= {max_ratio:.0%} or <= {fmt(near_zero)}); "
            "suspects: a missing nonlinearity (linear stack), softmax twice, a frozen or "
            "disconnected trunk, targets not aligned with inputs, a learning rate far off")
    if probabilities:
        problems.append(_PROBABILITY_HINT)
    ok = not problems
    report = ("ok: " if ok else "FAIL: ") + head
    if problems:
        report += "\n" + "\n".join("  - " + p for p in problems)
    return CheckResult("overfit_batch", ok, report, details)


@timed
def input_dependence(model: nn.Module, batch: Batch, loss_fn: Callable, steps: int = 100,
                     optimizer: OptimizerSpec = None, lr: float = 1e-2,
                     max_ratio: float = 0.5) -> CheckResult:
    """Check that the model uses its input: trained on the real batch it must reach a much
    lower loss than trained on the same batch with every input set to zero.

    With constant inputs the model can only learn the label distribution; with the real
    inputs it should memorise the batch. Equal losses mean the input does not reach the
    output (overwritten, detached into a constant, wrong tensor passed along).

    Args:
        model, batch, loss_fn, steps, optimizer, lr: as for :func:`overfit_batch` (run twice).
        max_ratio: pass when ``final_real <= max_ratio * final_constant``.
    Returns:
        :class:`CheckResult`; ``details``: ``real_final``, ``constant_final``.
    """
    inputs, targets = split_batch(batch)
    real = overfit_batch(model, (inputs, targets), loss_fn, steps=steps, optimizer=optimizer,
                         lr=lr, allow_negative_loss=True, expect_logits=False)
    constant = overfit_batch(model, (torch.zeros_like(inputs), targets), loss_fn, steps=steps,
                             optimizer=optimizer, lr=lr, allow_negative_loss=True,
                             expect_logits=False)
    r, c = real.details["final"], constant.details["final"]
    details = dict(real_final=r, constant_final=c, real_losses=real.details["losses"],
                   constant_losses=constant.details["losses"])
    head = (f"after {steps} steps: loss {fmt(r)} on the real inputs vs {fmt(c)} on all-zero "
            f"inputs")
    if not (math.isfinite(r) and math.isfinite(c)):
        return CheckResult("input_dependence", False,
                           "FAIL: " + head + "\n  - a loss is not finite", details)
    if r <= max_ratio * c or (c > 0 and r <= 1e-3 * c) or (c <= 0 and r < c):
        return CheckResult("input_dependence", True, "ok: " + head, details)
    return CheckResult(
        "input_dependence", False,
        "FAIL: " + head + f"\n  - the model does no better with its real inputs than with "
        f"constant ones (need <= {max_ratio:.0%}): the input does not reach the output "
        "(overwritten, multiplied by 0, detached into a constant, the wrong tensor used)",
        details)


assert_initial_loss = assert_form(initial_loss)
assert_input_dependence = assert_form(input_dependence)
assert_overfit_batch = assert_form(overfit_batch)
