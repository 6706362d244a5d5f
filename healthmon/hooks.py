"""Finding the tensors in module inputs / outputs, with a role name for each, and the plain
tensors the kernels read for each of them (:func:`record_parts`).

:func:`walk` yields ``(role, tensor)`` for every tensor inside tensors, tuples, lists,
dicts (``ModelOutput`` is an ``OrderedDict``), dataclasses and namedtuples, to a bounded
depth and count; everything else (None, ints, custom objects) is skipped. Role names:
``output`` for a lone tensor, ``output[1]``, ``output.logits``, ``output[0].hidden``.
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import ops
from .owners import Owners

MAX_DEPTH = 4
MAX_TENSORS = 256


def walk(obj, prefix: str, max_tensors: int = MAX_TENSORS) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(role, tensor)`` for each tensor in ``obj`` (depth-first, container order)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
        return
    budget = [max_tensors]
    yield from _walk(obj, prefix, 0, budget)


def _walk(obj, role: str, depth: int, budget) -> Iterator[Tuple[str, torch.Tensor]]:
    if budget[0] <= 0:
        return
    if isinstance(obj, torch.Tensor):
        budget[0] -= 1
        yield role, obj
        return
    if depth >= MAX_DEPTH or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return
    if isinstance(obj, (tuple, list)):
        fields = getattr(obj, "_fields", None)  # namedtuple
        for i, item in enumerate(obj):
            name = f"{role}.{fields[i]}" if fields and i < len(fields) else f"{role}[{i}]"
            yield from _walk(item, name, depth + 1, budget)
    elif isinstance(obj, dict):
        for key, item in obj.items():
            yield from _walk(item, f"{role}.{key}", depth + 1, budget)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name, None), f"{role}.{f.name}", depth + 1, budget)


def local_tensor(t):
    """The tensor the kernels read for ``t``: a DTensor's local shard (``to_local()``, no
    communication; FSDP2 parameters and gradients are DTensors), else ``t`` itself."""
    if t is not None and type(t) is not torch.Tensor and _is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


PLAIN = (torch.Tensor, torch.nn.Parameter)  # what ``type(t) in PLAIN`` lets through


def unsupported(t: torch.Tensor):
    """Why the monitor skips ``t`` (None when it can record it); never synchronises.
    A DTensor is judged by its local shard, which is what the monitor records."""
    if type(t) in PLAIN and t.layout is torch.strided and t.dtype in ops.STATS_DTYPES \
            and not t.is_meta and not t.is_nested:
        return None  # the common case, decided in a few attribute reads (hot path)
    t = local_tensor(t)
    if t.device.type == "meta":
        return "meta tensors have no data"
    reason = ops.unsupported_reason(t)
    if reason is None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        # tensor subclasses (FakeTensor, DTensor, ...) may not dispatch to the kernels
        if "Fake" in type(t).__name__:
            return "fake tensors have no data"
    return reason


def flat_tensors(obj, prefix: str, out: list, depth: int = 0) -> list:
    """``walk`` for traced code: appends ``(role, tensor)`` to ``out`` without a generator
    (tensors, tuples / lists / namedtuples and dicts; what Dynamo traces without a break)."""
    if isinstance(obj, torch.Tensor):
        out.append((prefix, obj))
    elif depth < MAX_DEPTH and isinstance(obj, (tuple, list)):
        fields = getattr(obj, "_fields", None)
        for i, item in enumerate(obj):
            name = f"{prefix}.{fields[i]}" if fields and i < len(fields) else f"{prefix}[{i}]"
            flat_tensors(item, name, out, depth + 1)
    elif depth < MAX_DEPTH and isinstance(obj, dict):
        for key, item in obj.items():
            flat_tensors(item, f"{prefix}.{key}", out, depth + 1)
    return out


# --------------------------------------------------------------------------- hook objects
#
# The monitor's hooks live in the user's module and parameter hook dicts, so they travel
# with the user's copies: ``copy.deepcopy(model)`` (EMA, teacher models) and
# ``torch.save(model)`` (a whole-model pickle). A copy must carry nothing that could fire:
# every hook object deep-copies and pickles to an :class:`Inert` stub, which does nothing
# and removes itself from the copy's hook dict the first time it is called. A hook also
# checks that it is called for the module it was made for (a shallow ``copy.copy`` shares
# the dicts).


class Inert:
    """What a healthmon hook becomes in a copy or a pickle of the user's model."""

    __slots__ = ()

    def __call__(self, owner=None, *args, **kwargs):
        _drop_from(owner, self)
        return None

    def __reduce__(self):
        return (Inert, ())


def _drop_from(owner, hook) -> None:
    for attr in ("_forward_hooks", "_forward_pre_hooks", "_post_accumulate_grad_hooks"):
        hooks = getattr(owner, attr, None) if owner is not None else None
        if not hooks:
            continue
        for key in [k for k, h in hooks.items() if h is hook]:
            del hooks[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                          "_forward_pre_hooks_with_kwargs"):
                getattr(owner, extra, {}).pop(key, None)


class OwnedHook:
    """Base of the monitor's hook objects: a target check, copies become :class:`Inert`."""

    __slots__ = ("monitor", "target", "index")

    def __init__(self, monitor, target, index: int):
        self.monitor, self.target, self.index = monitor, weakref.ref(target), index

    def __deepcopy__(self, memo):
        return Inert()

    def __copy__(self):
        return Inert()

    def __reduce__(self):
        return (Inert, ())


class ForwardHook(OwnedHook):
    """Forward hook of watched module ``index``: records its outputs (the common case in
    C++, ``monitor._fast``; see :mod:`healthmon.fastpath`). ``traced``: the record function
    while Dynamo traces the hook (:func:`healthmon.traced.record_forward`)."""

    __slots__ = ("fast", "traced", "ids")

    def __init__(self, monitor, target, index: int, traced):
        super().__init__(monitor, target, index)
        self.fast = monitor._fast.forward if monitor._fast is not None else None
        # what the traced path reads: a function and ints, which Dynamo guards in C++; the
        # weak reference call and the monitor object (reached from every module's hook) were
        # two Python guards per module, evaluated on every compiled call
        self.traced, self.ids = traced, (id(target), id(monitor))

    def __call__(self, module, args, output):
        if torch.compiler.is_compiling():  # a constant while traced
            if id(module) == self.ids[0]:  # else a shallow copy of the module: not ours
                self.traced(self.ids[1], self.index, output)
            return None
        if module is not self.target():
            return Inert.__call__(self, module)  # a shallow copy of the module: not ours
        if self.fast is not None and self.fast(self.index, output):
            return None
        self.monitor._on_forward(self.index, output)
        return None


class ReplayableForwardHook(OwnedHook):
    """Sync mode's forward hook (registered ``with_kwargs``): while the outputs are checked,
    the call (module, args, kwargs) is at hand for the drill-down's replay, and released
    when the hook returns (no reference outlives it). The common case takes the C++ fast
    path as in :class:`ForwardHook` (on the CPU, where it checks the record too)."""

    __slots__ = ("fast",)

    def __init__(self, monitor, target, index: int):
        super().__init__(monitor, target, index)
        self.fast = monitor._fast.forward if monitor._fast is not None else None

    def __call__(self, module, args, kwargs, output):
        if module is not self.target():
            return Inert.__call__(self, module)
        mon = self.monitor
        drill = mon._drill
        if drill is None or torch.compiler.is_compiling():
            mon._on_forward(self.index, output)
            return None
        drill.forward_call(module, args, kwargs, output, self.index == 0)
        try:
            if self.fast is None or not self.fast(self.index, output):
                mon._on_forward(self.index, output)
        finally:
            drill.forward_done()
        return None


class RootPreHook(OwnedHook):
    """Forward pre-hook of the root module: step boundary (eager), records the inputs."""

    __slots__ = ()

    def __call__(self, module, args, kwargs=None):
        if module is not self.target():
            return Inert.__call__(self, module)
        self.monitor._on_root_forward(module, args, kwargs)
        return None


class ParamHook(OwnedHook):
    """Post-accumulate-grad hook of watched parameter ``index`` (the C++ hooks of
    :mod:`healthmon.fastpath` hold it weakly). It holds its monitor weakly too: torch keeps
    a parameter's Python post-accumulate hooks in C++, out of the garbage collector's sight,
    so a strong reference would make model and monitor a cycle never collected (the model's
    forward hooks keep the monitor alive while the model is)."""

    __slots__ = ("__weakref__",)

    def __init__(self, monitor, target, index: int):
        super().__init__(weakref.ref(monitor), target, index)

    def __call__(self, param):
        if param is not self.target():
            return Inert.__call__(self, param)
        mon = self.monitor()
        if mon is not None:
            mon._on_param_grad(self.index, param)
        return None


def _untraced_frames() -> None:
    # Called from eager code (a compiled root module's own hooks run in torch's eager
    # _call_impl under the compile context), Dynamo would compile each hook call as a frame
    # of its own: one extra graph per hook. Skipped frames still get inlined into a graph
    # when a traced module calls them.
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # a torch without these: the hooks are compiled like user code
        return
    for fn in untraced_codes:
        # SKIP this frame and the frames it calls (the monitor's eager hook path)
        set_code_exec_strategy(fn.__code__, FrameExecStrategy(FrameAction.SKIP,
                                                              FrameAction.SKIP))


untraced_codes = [ForwardHook.__call__, RootPreHook.__call__, ParamHook.__call__,
                  ReplayableForwardHook.__call__, Inert.__call__]


def skip_when_eager(fn):
    """Mark ``fn`` (a hook called from torch's eager code) as never compiled as a frame."""
    untraced_codes.append(fn)
    _untraced_frames()
    untraced_codes.remove(fn)
    return fn


_untraced_frames()


class GradHook:
    """Pre-hook of a module output's autograd node: records the output's gradient (eager).
    ``site``: the gradient site, handed over when known (the monitor keeps it per module
    for the common single-tensor output), else looked up on the first call. ``part``: the
    output's index in a flat tuple output (-1: not one), for the C++ fast path. Lives on
    the autograd graph of one step only (never in a module's hook dict)."""

    __slots__ = ("monitor", "index", "role", "call", "sid", "output_nr", "site", "part")

    def __init__(self, monitor, index: int, role: str, call: int, sid: int,
                 output_nr: int = 0, site=None, part: int = -1):
        self.monitor, self.index, self.role, self.call, self.sid = monitor, index, role, call, sid
        self.output_nr, self.site, self.part = output_nr, site, part

    def __call__(self, grad_outputs):
        grad = grad_outputs[self.output_nr]
        if grad is not None:
            self.monitor._on_grad(self, grad)
        return None


skip_when_eager(GradHook.__call__)


class OptimizerHooks:
    """One global pre- and post-step hook pair for every live monitor: torch iterates its
    global hook dicts in ``step()``, so a monitor created or removed in one thread while
    another thread steps must not change them (installed by the first monitor, removed
    with the last). Calls each monitor's ``_optimizer_pre_hook`` / ``_optimizer_hook``."""

    def __init__(self):
        # weakly (see healthmon.owners); the hooks stay installed when the last monitor is
        # collected instead of removed (torch may be iterating its hook dict then)
        self.monitors = Owners()
        self.handles: list = []
        self.lock = threading.Lock()

    def add(self, mon) -> None:
        with self.lock:
            if not self.handles:
                from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                                   register_optimizer_step_pre_hook)
                self.handles = [register_optimizer_step_pre_hook(self.pre),
                                register_optimizer_step_post_hook(self.post)]
            self.monitors.add(mon)  # copy on write: hooks iterate a snapshot

    def discard(self, mon) -> None:
        with self.lock:
            if mon not in self.monitors:
                return
            self.monitors.discard(mon)
            if not self.monitors:
                for h in self.handles:
                    h.remove()
                self.handles = []

    def pre(self, optimizer, args, kwargs):
        changed = False
        for mon in self.monitors:
            result = mon._optimizer_pre_hook(optimizer, args, kwargs)
            if result is not None:  # a wrapped closure
                args, kwargs = result
                changed = True
        return (args, kwargs) if changed else None

    def post(self, optimizer, args, kwargs) -> None:
        for mon in self.monitors:
            mon._optimizer_hook(optimizer, args, kwargs)


OPTIMIZER_HOOKS = OptimizerHooks()


MAX_SUBCLASS_DEPTH = 4


def record_parts(t: torch.Tensor, role: str, _depth: int = 0
                 ) -> Tuple[List[Tuple[str, torch.Tensor]], Optional[str]]:
    """The plain tensors the monitor records for ``t``, each with its role, or a skip reason.

    * a plain tensor or parameter: ``[(role, t)]``;
    * a DTensor: its local shard under the same role (no communication);
    * a traceable ``__torch_dispatch__`` wrapper subclass (``__tensor_flatten__``: TwoTensor,
      float8 / NF4 training tensors, ...): each inner tensor in its own row, role
      ``role.<attr>`` (``output.a``, ``output.b``), nested subclasses flattened in turn. Handing
      the wrapper itself to a kernel would run the op once per inner tensor into one row (the
      last one would win, a NaN in the first would never be seen);
    * a ``__torch_dispatch__`` subclass that cannot be flattened: skipped, with the reason.

    Returns:
        ``(parts, None)``, or ``([], reason)`` when ``t`` is not recorded (the reason goes to
        ``Monitor.skipped``). Never synchronises; keeps no reference.
    """
    if type(t) in PLAIN or _is_dtensor(t):
        reason = unsupported(t)
        return ([], reason) if reason is not None else ([(role, local_tensor(t))], None)
    if is_traceable_wrapper_subclass(t):
        if _depth >= MAX_SUBCLASS_DEPTH:
            return [], f"tensor subclass nested deeper than {MAX_SUBCLASS_DEPTH} levels"
        attrs, _ = t.__tensor_flatten__()
        parts: List[Tuple[str, torch.Tensor]] = []
        for attr in attrs:
            inner, reason = record_parts(getattr(t, attr), f"{role}.{attr}", _depth + 1)
            if reason is not None:
                return [], f"{type(t).__name__}.{attr}: {reason}"
            parts.extend(inner)
        return parts, None
    if getattr(type(t), "__torch_dispatch__", None) is not torch.Tensor.__torch_dispatch__ \
            and "Fake" not in type(t).__name__:
        return [], (f"tensor subclass {type(t).__name__} overrides __torch_dispatch__ without "
                    "__tensor_flatten__: its data cannot be read (define __tensor_flatten__)")
    reason = unsupported(t)
    return ([], reason) if reason is not None else ([(role, t)], None)
