"""Recording inside graphs that ``torch.compile`` traces.

While Dynamo traces a watched module's hooks (the module runs inside a compiled region), the
monitor records through these functions instead of its eager path: op calls on tensors and
constants only. Each site's slot and stack are found at trace time by functions marked
``torch._dynamo.assume_constant_result``, which Dynamo runs for real and bakes into the graph
as constants; nothing here reads or writes per-step Python state, so the monitor adds no guard,
no recompile and no graph break. Such records carry no per-step order list: the recorder finds
them by a written marker (see :mod:`healthmon.records`). They write with
``healthmon::record_to``, which names its buffer by a key instead of taking it as an
argument: a graph then neither mutates an input nor saves the buffer for its backward.

The functions take the monitor as their first argument and use its recorder (``_rec``), stack
table, names and parameter tables; this module imports nothing of the monitor.
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional

import torch

from . import compile_pass, dynamo_fix, ops
from .hooks import flat_tensors
from .owners import Owners
from .stacks import traced_stack

MARK = "_healthmon_recorded"  # attribute of a tensor recorded by compiled code
_LIVE: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()  # id -> monitor


def register(monitor) -> None:
    """Make ``monitor`` reachable from trace-time constants (by its id, weakly)."""
    _LIVE[id(monitor)] = monitor


# Dynamo does not guard on module hooks by default (``skip_nnmodule_hook_guards``), and it
# caches compiled code per code object, not per instance: an unwatched instance of a watched
# model's class (a teacher, an EMA copy made before ``watch()``, a model built twice) compiles
# code without the hooks, and the watched instance then runs that code and records nothing
# of its submodules. While a monitor is attached Dynamo guards on hooks (an empty hook dict
# becomes a length check), so each keeps code of its own; the setting the process had comes
# back when the last monitor goes.
_HOOK_GUARD_SAVED: list = []  # the setting before the first attached monitor, while any is


def _restore_hook_guards() -> None:
    if _HOOK_GUARD_SAVED:
        torch._dynamo.config.skip_nnmodule_hook_guards = _HOOK_GUARD_SAVED.pop()
        dynamo_fix.uninstall()
        compile_pass.uninstall()


_hook_guard_owners = Owners(on_collected=_restore_hook_guards)


def guard_hooks(monitor) -> None:
    """Attach time: while ``monitor`` is attached Dynamo guards on module hooks, its
    ``__dict__`` proxies survive our traced gradient hooks (:mod:`healthmon.dynamo_fix`)
    and Inductor merges a graph's small records (:mod:`healthmon.compile_pass`)."""
    if not _HOOK_GUARD_SAVED:
        _HOOK_GUARD_SAVED.append(torch._dynamo.config.skip_nnmodule_hook_guards)
        dynamo_fix.install()
        compile_pass.install()
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    _hook_guard_owners.add(monitor)


def unguard_hooks(monitor) -> None:
    """Detach time: the process's own setting back once no monitor is attached."""
    _hook_guard_owners.discard(monitor)
    if not _hook_guard_owners:
        _restore_hook_guards()


class TraceState:
    """Trace-time state of one monitor: per traced graph, how many times each module was
    called so far (a module called twice in one graph gets two sites), and the graph's
    number (a constant the nested-output marker compares with)."""

    def __init__(self):
        self.token = None
        self.number = 0  # traces seen so far: the current trace's number
        self.calls: Dict[int, int] = {}
        # the root's own hooks were traced (``model.compile()``, a compiled train step): its
        # forward calls are not seen on the host
        self.root_traced = False

    def _sync(self) -> None:
        try:
            from torch._guards import TracingContext
            token = id(TracingContext.try_get())
        except Exception:
            token = None
        if token != self.token:
            self.token, self.calls = token, {}
            self.number += 1

    def trace_number(self) -> int:
        self._sync()
        return self.number

    def call_index(self, module: int) -> int:
        self._sync()
        n = self.calls.get(module, 0)
        self.calls[module] = n + 1
        return n


# ----------------------------------------------------------------- traced recording

def _recordable(t: torch.Tensor) -> bool:
    return t.dtype in ops.STATS_DTYPES and t.layout == torch.strided


def record_forward(monitor_id: int, index: int, output) -> None:
    """Forward hook of watched module ``index`` of monitor ``id(monitor)`` while traced: its
    output tensors, and a traced gradient hook on each that requires grad. Takes the
    monitor's id, not the monitor: the hook of every module would otherwise reach the same
    object through a source of its own, and Dynamo guards each with a Python check."""
    if torch.compiler.is_exporting():
        return  # an exported program is for deployment: it carries no monitor
    call = _trace_call_const(monitor_id, index)
    token = _trace_number_const(monitor_id)  # a constant of the graph
    for role, t in flat_tensors(output, "output", []):
        if not _recordable(t):
            continue
        # a tensor returned by several nested modules is recorded once, for the innermost
        # (as in eager): traced code cannot keep a table of tensors, so the tensor carries a
        # marker (on graph outputs it stays: the eager hooks of a compiled root read it)
        if getattr(t, MARK, None) == token:
            continue
        setattr(t, MARK, token)
        grad = t.requires_grad and torch.is_grad_enabled()
        slot, bslot, key, bkey = _traced_site_const(monitor_id, index, "forward", role, call,
                                                    str(t.device), t.dtype, grad, None, False)
        torch.ops.healthmon.record_to(t.detach(), key, slot)
        if bslot >= 0:
            t.register_hook(_grad_hook(bkey, bslot))


def record_inputs(mon, args, kwargs) -> None:
    """Root pre-hook while traced: the model's input tensors (site ``<input>``)."""
    if torch.compiler.is_exporting():
        return
    _root_traced_const(id(mon))
    tensors = flat_tensors(args, "input", [])
    if kwargs:
        flat_tensors(kwargs, "input", tensors)
    for role, t in tensors:
        if not _recordable(t):
            continue
        slot, _, key, _ = _traced_site(mon, -1, "input", role, 0, str(t.device), t.dtype,
                                       False)
        torch.ops.healthmon.record_to(t.detach(), key, slot)


def record_param_grad(mon, pindex: int, param) -> None:
    """Post-accumulate-grad hook of parameter ``pindex`` traced by compiled autograd."""
    if torch.compiler.is_exporting():
        return
    grad = param.grad
    if grad is None:
        return
    slot, _, key, _ = _traced_site(mon, pindex, "grad", "", 0, str(grad.device), grad.dtype,
                                   False)
    torch.ops.healthmon.record_to(grad.detach(), key, slot)


def record_output_grad(mon, index: int, role: str, call: int, sid: int,
                       grad: torch.Tensor) -> None:
    """The gradient hook of an eager forward's output traced by compiled autograd: one
    ``record_to`` in the compiled backward (the pybind entry would break its graph). The
    site keeps the stack of the forward call that produced the output (``sid``)."""
    if torch.compiler.is_exporting() or not _recordable(grad):
        return
    slot, _, key, _ = _traced_site(mon, index, "backward", role, call, str(grad.device),
                                   grad.dtype, False, sid, True)
    torch.ops.healthmon.record_to(grad.detach(), key, slot)


def make_site(mon, module: int, phase: str, role: str, call: int, device: torch.device,
              dtype, grad: bool, sid: Optional[int] = None, in_backward: bool = False):
    """Trace time (run for real): the sites of one traced record; ``sid``: their stack
    when already known (else the traced frames'); ``in_backward``: traced from the
    backward pass (compiled autograd), so created in execution order.

    Returns:
        ``(slot, gradient slot or -1, buffer key, gradient buffer key or -1)``; keys index
        the record buffers as registered for ``healthmon::record_to``.
    """
    rec = mon._rec
    if mon._fast is not None:  # the eager fast path skips what compiled code recorded
        mon._fast.set_marker(MARK)
        if mon.config.sync:  # (sync mode checks compiled records at the Python hooks)
            mon._fast.set_enabled(False)
    if phase == "grad":  # module is a parameter index
        pindex = module
        module, _ = mon._param_records.sites[pindex]
        role = mon._param_records.grad_roles[pindex]
        # the stack of the module's forward call: kept by the eager hooks or by the traced
        # forward record
        sid = mon._mod_stack[module]
        if sid < 0:
            fwd = rec.sites.get((module, "forward", "output", 0, device))
            sid = fwd.sid if fwd is not None else -1
    elif sid is None:
        sid = mon._stacks.intern_summary(traced_stack())
        if module >= 0 and mon._mod_stack[module] < 0:
            mon._mod_stack[module] = sid  # the stack its parameters' records carry
    name = mon._names[module] if module >= 0 else "<input>"
    site = rec.site(module, name, phase, role, call, device, dtype, compiled=True, sid=sid,
                    traced_in_backward=in_backward)
    bslot, bkey = -1, -1
    if grad:
        bsite = rec.site(module, name, "backward", "grad_" + role, call, device, dtype,
                         compiled=True, sid=sid)
        bslot, bkey = bsite.slot, rec.tensor_key(bsite.buffer)
    return site.slot, bslot, rec.tensor_key(site.buffer), bkey


# ----------------------------------------------------------------- trace-time constants

@torch._dynamo.assume_constant_result
def _trace_call_const(monitor_id: int, index: int) -> int:
    mon = _LIVE.get(monitor_id)
    return mon._trace.call_index(index) if mon is not None else 0


@torch._dynamo.assume_constant_result
def _trace_number_const(monitor_id: int) -> int:
    mon = _LIVE.get(monitor_id)
    return mon._trace.trace_number() if mon is not None else 0


@torch._dynamo.assume_constant_result
def _root_traced_const(monitor_id: int) -> int:
    mon = _LIVE.get(monitor_id)
    if mon is not None:
        mon._trace.root_traced = True
    return 0


def _traced_site(mon, module: int, phase: str, role: str, call: int, device: str, dtype,
                 grad: bool, sid: Optional[int] = None, in_backward: bool = False):
    return _traced_site_const(id(mon), module, phase, role, call, device, dtype, grad, sid,
                              in_backward)


@torch._dynamo.assume_constant_result
def _traced_site_const(monitor_id: int, module: int, phase: str, role: str, call: int,
                       device: str, dtype, grad: bool, sid: Optional[int], in_backward: bool):
    """Runs for real while Dynamo traces (its result is a constant of the graph)."""
    return make_site(_LIVE[monitor_id], module, phase, role, call, torch.device(device),
                     dtype, grad, sid, in_backward)


def _grad_hook(key: int, slot: int):
    # ints only: a tensor the hook closed over would be saved by the compiled graph for its
    # backward, and several forwards feeding one backward would trip its version check
    def record_grad(grad):
        if grad is not None:
            torch.ops.healthmon.record_to(grad.detach(), key, slot)
        # the gradient itself, unchanged: compiled autograd traces a hook's result as the
        # new gradient (None would drop it), eager treats it like None
        return grad
    return record_grad
