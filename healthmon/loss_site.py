"""The loss as a site: the tensor(s) backward is called on, recorded every step.

While a monitor is live, ``torch.Tensor.backward`` and ``torch.autograd.backward`` are
wrapped (reference-counted by live monitors, like :func:`healthmon.labels.install_loss_guard`;
the last ``remove()`` restores the originals). Before the original runs, the wrapper hands
the tensors to the monitor whose root forward ran most recently in a step still open
(``Monitor._record_loss``): one native stats call per tensor into the monitor's buffer,
site ``<loss>``, phase ``loss``, with the stack of the backward call. So the loss comes
before the backward records of its step in execution order: a non-finite loss is the
step's first anomaly (an error, naming the line of ``loss.backward()``), a loss spike an
early warning (:mod:`healthmon.rules`).

Skipped: backward calls made inside a backward pass (reentrant checkpointing, double
backward through ``torch.autograd.backward``), calls while compiling, calls with no watched
forward in an open step. ``torch.autograd.grad`` is not wrapped (no loss-like contract).
"""
from __future__ import annotations

import threading
from typing import List

import torch

from .hooks import skip_when_eager
from .owners import Owners

_originals: dict = {}
_state = threading.local()  # depth: Tensor.backward calls torch.autograd.backward


def _owner():
    """The monitor whose root forward ran most recently in a step still open, in this
    thread (as for the label checks: :func:`healthmon.labels.owner_among`)."""
    from .labels import owner_among
    return owner_among(_owners)


def _tensors(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for t in obj if isinstance(t, torch.Tensor)]
    return []


@skip_when_eager  # run eagerly inside a compiled function (its backward is a graph break)
def _record(tensors) -> None:
    if getattr(_state, "depth", 0) or not _owners or torch.compiler.is_compiling() \
            or torch._C._current_graph_task_id() >= 0:
        return
    owner = _owner()
    if owner is None:
        return
    ts = _tensors(tensors)
    if ts:
        owner._record_loss(ts, owner._stacks.capture(2))  # the caller of backward


def _wrap_tensor_backward(original):
    def backward(self, *args, **kwargs):
        if _owners:
            _record(self)
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _state.depth -= 1
    backward.__wrapped__ = original
    backward.__name__, backward.__qualname__ = "backward", "Tensor.backward"
    backward.__doc__ = original.__doc__
    backward._healthmon_loss_site = True
    return backward


def _wrap_autograd_backward(original):
    def backward(tensors, *args, **kwargs):
        if _owners:
            _record(tensors)
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            return original(tensors, *args, **kwargs)
        finally:
            _state.depth -= 1
    backward.__wrapped__ = original
    backward.__name__ = backward.__qualname__ = "backward"
    backward.__doc__ = original.__doc__
    backward._healthmon_loss_site = True
    return backward


def _ours(fn) -> bool:
    return getattr(fn, "_healthmon_loss_site", False)


def _in_chain(fn) -> bool:
    """Whether one of our wrappers is anywhere in ``fn``'s ``__wrapped__`` chain (another
    wrapper may sit on top of it; one that restored what was below ours removed it)."""
    for _ in range(32):
        if fn is None:
            return False
        if _ours(fn):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


def install(monitor) -> None:
    """Record ``monitor``'s losses (reference-counted per monitor)."""
    if monitor in _owners:
        return
    if not _owners:
        # a wrapper left in place by an uninstall under someone else's wrapper is reused
        if not _in_chain(torch.Tensor.backward):
            _originals["tensor"] = torch.Tensor.backward
            torch.Tensor.backward = _wrap_tensor_backward(torch.Tensor.backward)
        if not _in_chain(torch.autograd.backward):
            _originals["autograd"] = torch.autograd.backward
            torch.autograd.backward = _wrap_autograd_backward(torch.autograd.backward)
    _owners.add(monitor)


def uninstall(monitor) -> None:
    """Undo :func:`install`; the last monitor restores the originals. When another
    library wrapped backward on top of ours meanwhile, ours stays in its chain as a
    pass-through (no owners: it records nothing) rather than breaking that wrapper."""
    if monitor not in _owners:
        return
    _owners.discard(monitor)
    if not _owners:
        _restore_originals()


def _restore_originals() -> None:
    if "tensor" in _originals and _ours(torch.Tensor.backward):
        torch.Tensor.backward = _originals.pop("tensor")
    if "autograd" in _originals and _ours(torch.autograd.backward):
        torch.autograd.backward = _originals.pop("autograd")


# live monitors, oldest first (weakly: see healthmon.owners)
_owners = Owners(on_collected=_restore_originals)


def installed() -> bool:
    """Whether a live monitor records losses (the wrappers are in place and owned)."""
    return bool(_owners) and _ours(torch.Tensor.backward)
