"""Shared pieces of the sanity checks: the result object, the state guard, batch handling.

A *batch* everywhere in :mod:`healthmon.checks` is a tuple ``(inputs, targets)``:

- ``inputs``: the tensor passed as ``model(inputs)``, batch dimension first, on the model's
  device (e.g. float32 ``(B, C, H, W)`` images or ``(B, F)`` features);
- ``targets``: whatever ``loss_fn(outputs, targets)`` takes (e.g. int64 ``(B,)`` class
  indices for :func:`torch.nn.functional.cross_entropy`).

``loss_fn(outputs, targets)`` must return a scalar (0-dim) floating tensor.
"""
from __future__ import annotations

import copy
import functools
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .. import ops
from ..stats import TensorStats, stats

Batch = Tuple[torch.Tensor, Any]
OptimizerSpec = Union[None, torch.optim.Optimizer, Callable[..., torch.optim.Optimizer]]


@dataclass
class CheckResult:
    """Outcome of one sanity check.

    Attributes:
        name: the check's function name, e.g. ``"overfit_batch"``.
        ok: True when nothing suspicious was found.
        report: human-readable, multi-line explanation (first line is a one-line summary).
        details: machine-readable numbers behind the report (check specific).
        seconds: wall time the check took.
    """
    name: str
    ok: bool
    report: str
    details: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def summary(self) -> str:
        """The first line of :attr:`report`."""
        return self.report.splitlines()[0] if self.report else ""

    def raise_if_failed(self) -> "CheckResult":
        """Raise ``AssertionError(report)`` when not ``ok``; return self otherwise."""
        if not self.ok:
            raise AssertionError(f"healthmon.checks.{self.name} failed:\n{self.report}")
        return self

    def __str__(self) -> str:
        return f"[{'ok' if self.ok else 'FAIL'}] {self.name}: {self.report}"


def timed(check: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
    """Decorator: fill ``CheckResult.seconds`` with the wall time of the check."""
    @functools.wraps(check)
    def wrapper(*args, **kwargs) -> CheckResult:
        start = time.perf_counter()
        result = check(*args, **kwargs)
        result.seconds = time.perf_counter() - start
        return result
    return wrapper


def assert_form(check: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
    """Make the pytest form of a check: same arguments, raises ``AssertionError`` with the
    report when the check fails, returns the :class:`CheckResult` when it passes."""
    @functools.wraps(check)
    def assert_check(*args, **kwargs) -> CheckResult:
        return check(*args, **kwargs).raise_if_failed()
    assert_check.__name__ = f"assert_{check.__name__}"
    assert_check.__qualname__ = assert_check.__name__
    assert_check.__doc__ = (f"Run :func:`{check.__name__}` and raise ``AssertionError`` with its "
                            f"report when it fails (for pytest).\n\n" + (check.__doc__ or ""))
    return assert_check


# --------------------------------------------------------------------------- state guard

@dataclass
class _SavedState:
    tensors: Dict[str, torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]
    requires_grad: Dict[str, bool]
    training: Dict[str, bool]
    cpu_rng: torch.Tensor
    cuda_rng: Optional[list]
    optimizer_state: Optional[dict]


def _named_state_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters(remove_duplicate=True):
        yield "param:" + name, p
    for name, b in model.named_buffers(remove_duplicate=True):
        if b is not None:
            yield "buffer:" + name, b


@contextmanager
def preserved_state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None):
    """Context manager: on exit, put back everything a check may change.

    Restored in place (tensor identities are kept, so optimizers holding the parameters
    still work): parameter and buffer values (e.g. BatchNorm running stats), ``.grad``
    of every parameter, ``requires_grad`` flags, the train/eval flag of every submodule,
    the torch CPU RNG state, the CUDA RNG state of every device (when CUDA is initialised),
    and the state dict of ``optimizer`` when one is given.
    """
    saved = _SavedState(
        tensors={n: t.detach().clone() for n, t in _named_state_tensors(model)},
        grads={n: (None if p.grad is None else p.grad.detach().clone())
               for n, p in model.named_parameters()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        training={n: m.training for n, m in model.named_modules()},
        cpu_rng=torch.get_rng_state(),
        cuda_rng=(torch.cuda.get_rng_state_all()
                  if torch.cuda.is_available() and torch.cuda.is_initialized() else None),
        optimizer_state=(copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None),
    )
    try:
        yield saved
    finally:
        with torch.no_grad():
            for name, t in _named_state_tensors(model):
                if name in saved.tensors:
                    t.copy_(saved.tensors[name])
        for name, p in model.named_parameters():
            if name in saved.requires_grad:
                p.requires_grad_(saved.requires_grad[name])
            if name in saved.grads:
                p.grad = saved.grads[name]
        for name, m in model.named_modules():
            if name in saved.training:
                m.training = saved.training[name]
        torch.set_rng_state(saved.cpu_rng)
        if saved.cuda_rng is not None:
            torch.cuda.set_rng_state_all(saved.cuda_rng)
        if optimizer is not None and saved.optimizer_state is not None:
            optimizer.load_state_dict(saved.optimizer_state)


# --------------------------------------------------------------------------- helpers

def split_batch(batch: Batch) -> Tuple[torch.Tensor, Any]:
    """Return ``(inputs, targets)`` from a batch tuple, with a clear error otherwise."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("healthmon.checks: a batch must be a tuple (inputs, targets), got "
                        f"{type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"healthmon.checks: inputs must be a tensor, got {type(inputs).__name__}")
    return inputs, targets


def first_tensor(outputs: Any) -> torch.Tensor:
    """The model output to check: the tensor itself, or the first tensor of a tuple/list/dict."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        for o in outputs:
            if isinstance(o, torch.Tensor):
                return o
    raise TypeError(f"healthmon.checks: cannot find a tensor in the model output "
                    f"({type(outputs).__name__})")


def compute_loss(loss_fn: Callable, outputs: Any, targets: Any) -> torch.Tensor:
    """``loss_fn(outputs, targets)`` checked to be a scalar floating tensor."""
    loss = loss_fn(outputs, targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.is_floating_point():
        raise TypeError("healthmon.checks: loss_fn(outputs, targets) must return a scalar "
                        f"floating tensor, got {type(loss).__name__}"
                        + (f" {loss.dtype} {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                           else ""))
    return loss.reshape(())


def make_optimizer(optimizer: OptimizerSpec, params, default_lr: float) -> torch.optim.Optimizer:
    """An optimizer over ``params``: ``optimizer`` itself when it is an instance, the result of
    ``optimizer(params)`` when it is a factory or an optimizer class, else Adam(default_lr)."""
    if optimizer is None:
        return torch.optim.Adam(params, lr=default_lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    raise TypeError("healthmon.checks: optimizer must be None, a torch.optim.Optimizer or a "
                    f"callable params -> Optimizer, got {type(optimizer).__name__}")


def tensor_stats(t: torch.Tensor) -> TensorStats:
    """Native fused statistics of ``t`` (synchronises; fine for a one-off check)."""
    return stats(t)


def many_stats(ts: Sequence[torch.Tensor]) -> list:
    """Native statistics of many tensors in one multi-tensor call: list of TensorStats."""
    ts = list(ts)
    if not ts:
        return []
    device = ts[0].device
    ts = [t if t.device == device else t.to(device) for t in ts]
    rows = ops.multi_stats(ts).cpu()
    return [TensorStats.from_record(row) for row in rows]


def per_channel_stats(x: torch.Tensor, channel_dim: int = 1) -> list:
    """Native statistics of every slice ``x.select(channel_dim, c)``: list of TensorStats."""
    return many_stats([x.select(channel_dim, c) for c in range(x.shape[channel_dim])])


def std_of(s: TensorStats) -> float:
    """Population standard deviation of the finite values described by ``s``."""
    if not s.finite:
        return math.nan
    mean = s.sum / s.finite
    return math.sqrt(max(s.sumsq / s.finite - mean * mean, 0.0))


def looks_like_probabilities(outputs: torch.Tensor, class_dim: int = 1,
                             atol: float = 1e-3) -> bool:
    """True when ``outputs`` (float ``(B, C, ...)``) has every value in [0, 1] and sums to 1
    over ``class_dim``: the output of a softmax, not logits."""
    if not outputs.is_floating_point() or outputs.dim() < 2 or outputs.shape[class_dim] < 2:
        return False
    s = tensor_stats(outputs)
    if s.has_nonfinite or s.min < 0.0 or s.max > 1.0:
        return False
    row_sums = outputs.detach().sum(dim=class_dim) - 1.0
    return tensor_stats(row_sums).absmax <= atol


def fmt(value: float) -> str:
    """Compact number for reports."""
    return f"{value:.4g}"
