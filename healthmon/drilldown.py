"""Sync mode: name the exact operation (and its line) behind the first anomaly of a step.

When sync mode sees the first bad record of a step, :meth:`Drilldown.explain` searches for
the first operation, in execution order, whose output holds a NaN or a not-allowed ±Inf,
and attaches it to the anomaly as an :class:`~healthmon.errors.Operation` (op name, the
user's line, a summary of its inputs). Nothing runs per op while the run is healthy: the
faulty computation is *replayed* once, on the spot, where its inputs are at hand.

Mechanisms (the options, and why these):

* **Forward, inside a module** (custom forwards, stock layers): the forward hook of the
  module whose output is bad hands over ``(module, args, kwargs)``; the module is re-run on
  clones of them under a ``TorchDispatchMode`` that checks every aten op's outputs and
  captures the Python stack at the first bad one. Dispatch level (not function level) so the
  op inside a stock layer is named (``aten::native_layer_norm``). The replay runs under
  ``no_grad``, ``torch.random.fork_rng`` (the user's RNG stream is not advanced), with the
  module's buffers saved and restored (BatchNorm running stats) and the monitor's own hooks
  off. Alternatives rejected: a dispatch mode on every step (per-op cost while healthy: the
  ``anomaly`` variant of ``bench/overhead.py`` shows what per-op checking costs), and
  ``detect_anomaly`` (NaN only, per-op cost, backward only).
* **Bad input at entry** (an in-place op on a module's input: the module that mutated it is
  not the one whose output shows it, e.g. ``x.sqrt_()`` returned as is, then blamed on the
  next module): when the first bad op of the module replay consumed an input that was
  already bad, the whole *root* forward is replayed instead, from the root's inputs. The
  root pre-hook keeps **weak references** to those inputs (no lifetime change: the caller
  holds them for the whole forward) and the RNG state at the start of the forward (one
  small copy per step), so the replay sees the same dropout masks.
* **Backward, inside the model** (``sqrt`` at 0, ``torch.where`` over a division by zero):
  the root forward is replayed with grad on clones of its inputs, under a
  ``TorchFunctionMode`` that maps every autograd node created to the stack of the forward
  line that created it; then ``torch.autograd.grad`` runs over that fresh graph with an
  upstream gradient of ones and a post-hook on every node: the first node whose output
  gradients are non-finite while its incoming ones are finite is the blow-up. Its saved
  tensors (``_saved_self``, ``_saved_other``, ``_saved_result``) explain it ("sqrt backward
  at 0"). The real graph cannot serve: by the time a gradient hook sees the bad gradient,
  the node that produced it has run and released its saved tensors, and forcing
  ``retain_graph=True`` would keep every activation alive until the user drops the loss.
  Limit: upstream ones instead of the real upstream gradient (a blow-up that only a
  particular upstream value triggers is missed).
* **Code outside modules** (the loss; seed 002: ``y = model(x) / div; y[div > 0]``): sync
  mode wraps ``torch.Tensor.backward`` / ``torch.autograd.backward`` (reference-counted,
  uninstalled by the last monitor; separate from any other backward wrapper). Before the
  real backward the wrapper walks the loss-side autograd nodes (from the loss down to the
  root outputs' nodes, found by ``id``: the output tensors themselves may be gone, as in
  ``model(x) / div``) and reads the saved input of the few node kinds whose derivative can
  blow up (:data:`_RISKS`: a division's divisor at 0, log at 0, sqrt at 0, pow < 1 at 0,
  ...). Only a flagged node costs more: ``torch.autograd.grad(loss, root output edges,
  retain_graph=True)`` over the loss side (nothing is retained past the real backward,
  which follows and frees the graph as usual) and, when those gradients are bad, a
  post-hook per loss-side node names the first bad one with its saved inputs. Its *line* is
  not recorded by autograd (only ``detect_anomaly`` does, per op), so it is a best guess:
  the last line between the model call and the ``backward()`` call, in the function that
  called it, that holds the op's token (``/`` for ``DivBackward0``); the report marks it.
  Options measured and rejected: running that probe on every backward (the whole loss-side
  backward twice per step: +15 % on a tiny MLP step on this machine); forcing
  ``retain_graph=True`` on the real backward (keeps every activation alive until the user
  drops the loss: a lifetime change); a function mode over the loss code (per-op cost).
* **A watched loss module** (``watch(model, loss_module)``) consumed the bad gradient: its
  forward hook keeps weak references to its arguments, and the module is replayed forward
  + backward like the model (exact lines). Arguments passed as temporaries
  (``crit(model(x), y != 0)``) are gone by then: the loss probe answers instead.

Limits: ops inside ``torch.compile``-d regions are replayed eagerly (the replay may differ
from the compiled kernels, e.g. fused casts) and nothing runs while Dynamo traces;
non-deterministic ops (scatter-add on GPU, data-dependent shapes) may not reproduce;
in-place chains that modify the *root* inputs cannot be replayed from them; the backward
replay uses ones as the upstream gradient and runs outside the forward's autocast; user
hooks on the replayed modules run again during the replay; loss code in a helper function
gets the op and its inputs but the line shown is the ``backward()`` call; loss-side ops
outside :data:`_RISKS` are not named; no search under ``torch.distributed`` (a replay could
run a collective on one rank only).
"""
from __future__ import annotations

import collections
import linecache
import re
import sys
import traceback
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.autograd.graph import GradientEdge
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import Operation
from .hooks import walk
from .owners import Owners
from .stacks import _is_machinery

_PACKAGE_DIR = __file__[:-len("drilldown.py")]
# torch's own mode-dispatch layers: never the op's caller
_MODE_FILES = ("/torch/utils/_python_dispatch.py", "/torch/overrides.py",
               "/torch/_ops.py", "/torch/utils/_contextlib.py", "/torch/_compile.py",
               "/torch/_dynamo/eval_frame.py")
MAX_NODES = 100_000
_CUDA = torch.cuda.is_available()
PROBE_NODES = 2_000  # loss-side nodes walked per backward (sync mode); beyond: no probe


# ----------------------------------------------------------------------------- small helpers

def _float_tensors(obj) -> List[torch.Tensor]:
    return [t for _, t in walk(obj, "x") if t.is_floating_point() or t.is_complex()]


def _nonfinite(t: torch.Tensor, allow_inf: bool) -> bool:
    """Host-synchronising check (replay only)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return False
    if allow_inf:
        return bool(torch.isnan(t).any())
    return not bool(torch.isfinite(t).all())


def _count(mask: torch.Tensor) -> int:
    return int(mask.sum())


def _n(k: int, word: str) -> str:
    """``1 zero``, ``3 zeros``."""
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _describe(t: torch.Tensor) -> str:
    """``shape (4, 8), 2 NaN, 1 zeros, range [-1, 3]`` of one tensor."""
    if not t.is_floating_point():
        return f"shape {tuple(t.shape)} {t.dtype}"
    x = t.detach()
    parts = [f"shape {tuple(x.shape)}"]
    nan, inf = _count(torch.isnan(x)), _count(torch.isinf(x))
    if nan:
        parts.append(f"{nan} NaN")
    if inf:
        parts.append(f"{inf} Inf")
    zeros = _count(x == 0)
    if zeros:
        parts.append(f"{zeros} zeros")
    fin = x[torch.isfinite(x)]
    if fin.numel():
        parts.append(f"range [{fin.min().item():.4g}, {fin.max().item():.4g}]")
    return ", ".join(parts)


def _frames_until(stop_code) -> List[traceback.FrameSummary]:
    """The Python stack from the replay entry (excluded) to the caller of the mode, outermost
    first; healthmon's own frames and torch's module-call machinery dropped."""
    frame = sys._getframe(2)
    out = []
    while frame is not None and frame.f_code is not stop_code:
        code = frame.f_code
        name = code.co_filename.replace("\\", "/")
        if not name.startswith(_PACKAGE_DIR) and not _is_machinery(name) and \
                not name.endswith(_MODE_FILES):
            out.append(traceback.FrameSummary(code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    out.reverse()
    return out


def _clone(obj, grad: bool):
    """Clones of every tensor in ``obj`` (tuples, lists, dicts); other objects as they are.
    ``grad``: leaves that required grad require grad again (for a backward replay)."""
    if isinstance(obj, torch.Tensor):
        c = obj.detach().clone()
        if grad and obj.requires_grad and c.is_floating_point():
            c.requires_grad_(True)
        return c
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_clone(o, grad) for o in obj)
    if isinstance(obj, list):
        return [_clone(o, grad) for o in obj]
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: _clone(v, grad) for k, v in obj.items()}
    return obj


def _weak(obj):
    """``obj`` with every tensor replaced by a weak reference (None: not representable)."""
    if isinstance(obj, torch.Tensor):
        return ("t", weakref.ref(obj))
    if isinstance(obj, (tuple, list)) and not hasattr(obj, "_fields"):
        items = [_weak(o) for o in obj]
        return None if any(i is None for i in items) else (type(obj).__name__, items)
    if isinstance(obj, dict) and type(obj) is dict:
        items = {k: _weak(v) for k, v in obj.items()}
        return None if any(v is None for v in items.values()) else ("dict", items)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return ("v", obj)
    return None  # an object that may hold tensors: not kept (no lifetime change)


def _strong(w):
    """Inverse of :func:`_weak`; raises LookupError when a tensor has been freed."""
    kind, val = w
    if kind == "t":
        t = val()
        if t is None:
            raise LookupError("an input of the model has been freed since its forward")
        return t
    if kind == "v":
        return val
    if kind == "dict":
        return {k: _strong(v) for k, v in val.items()}
    items = [_strong(v) for v in val]
    return tuple(items) if kind == "tuple" else items


# ----------------------------------------------------------------------------- summaries

_LOG_OPS = {"log", "log2", "log10", "log_", "log2_", "log10_", "xlogy"}


def forward_summary(name: str, inputs: List[torch.Tensor], out: List[torch.Tensor],
                    allow_inf: bool) -> str:
    """Why forward op ``name`` (``aten::log``) produced a non-finite value, from its inputs
    (taken before the op ran; float tensors) and outputs. Plain words, one line."""
    base = name.split("::")[-1].split(".")[0]
    short = base.rstrip("_")
    bad_in = [(i, t) for i, t in enumerate(inputs) if t.is_floating_point() and
              _nonfinite(t, allow_inf)]
    if bad_in:
        i, t = bad_in[0]
        return (f"its input {i} already held non-finite values ({_describe(t)}): the bad "
                f"value came in from before this computation")
    x = inputs[0] if inputs else None
    if x is not None and short in ("log", "log2", "log10"):
        zeros, neg = _count(x == 0), _count(x < 0)
        what = [_n(zeros, "zero")] if zeros else []
        what += [_n(neg, "negative value")] if neg else []
        return f"{short} received {' and '.join(what) or 'no zeros'} ({_describe(x)})"
    if x is not None and short == "log1p":
        return f"log1p received {_count(x <= -1)} values <= -1 ({_describe(x)})"
    if x is not None and short in ("sqrt", "rsqrt"):
        neg = _count(x < 0)
        zero = f" and {_count(x == 0)} zeros" if short == "rsqrt" else ""
        return f"{short} received {neg} negative values{zero} ({_describe(x)})"
    if short in ("div", "true_divide", "floor_divide", "remainder", "fmod", "reciprocal"):
        d = inputs[-1] if short != "reciprocal" else x
        if d is not None and d.numel() == 1 and len(inputs) == 1 and short != "reciprocal":
            d = None
        if d is not None:
            zeros = _count(d == 0)
            both = ""
            if short != "reciprocal" and len(inputs) >= 2 and zeros:
                n = inputs[0]
                try:
                    both = f" ({_count((n == 0) & (d == 0))} of them 0/0)"
                except RuntimeError:
                    both = ""
            return f"divisor has {_n(zeros, 'zero')}{both} (divisor {_describe(d)})"
    if short in ("pow",) and x is not None:
        return f"pow of {_describe(x)}: negative base with a fractional exponent, or 0 to a " \
               f"negative power, or overflow"
    if short in ("native_layer_norm", "layer_norm", "native_batch_norm", "batch_norm",
                 "_native_batch_norm_legit", "native_group_norm", "group_norm") and x is not None:
        return f"normalization of {_describe(x)}: zero variance with eps=0 divides by 0, or " \
               f"the input is too large for the variance in {x.dtype}"
    if out and all(torch.isfinite(t).all() for t in inputs if t.is_floating_point()):
        o = out[0]
        nan = _count(torch.isnan(o)) if o.is_floating_point() else 0
        inf = _count(torch.isinf(o)) if o.is_floating_point() else 0
        ins = "; ".join(f"input {i}: {_describe(t)}" for i, t in enumerate(inputs[:3]))
        why = f"overflow in {o.dtype} (largest finite {torch.finfo(o.dtype).max:.3g})" \
            if inf and not nan and o.is_floating_point() else "invalid arithmetic"
        return f"finite inputs gave {nan} NaN and {inf} Inf: {why}; {ins}"
    return "; ".join(f"input {i}: {_describe(t)}" for i, t in enumerate(inputs[:3]))


def backward_summary(node) -> str:
    """Why autograd node ``node`` (``SqrtBackward0``) produced a non-finite gradient, from
    its saved tensors (``_saved_self``, ``_saved_other``, ``_saved_result``)."""
    name = node.name()
    saved = {}
    for attr in dir(node):
        if attr.startswith("_saved_") and not attr.endswith("_raw"):
            try:
                v = getattr(node, attr)
            except RuntimeError:  # released
                continue
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                saved[attr[len("_saved_"):]] = v.detach()
    op = re.sub(r"Backward\d*$", "", name).lower()
    if op == "sqrt" and "result" in saved:
        z = _count(saved["result"] == 0)
        return (f"sqrt backward at 0: {z} outputs of sqrt are 0, where its derivative "
                f"1/(2*sqrt(x)) is infinite")
    if op in ("div", "reciprocal") and ("other" in saved or "result" in saved):
        d = saved.get("other", saved.get("self"))
        if d is not None:
            return (f"divisor has {_n(_count(d == 0), 'zero')}: the derivative of a / b is 1/b "
                    f"(a gradient of 0 through a division by 0 is still NaN, e.g. the "
                    f"untaken branch of torch.where); divisor {_describe(d)}")
    if op in ("log", "log2", "log10") and "self" in saved:
        return f"log backward at 0: {_count(saved['self'] == 0)} inputs of log are 0 " \
               f"(derivative 1/x)"
    if op == "pow" and "self" in saved:
        return f"pow backward: {_count(saved['self'] == 0)} zero bases (x**p with p < 1 has " \
               f"an infinite derivative at 0); base {_describe(saved['self'])}"
    if op in ("atan2", "acos", "asin") and "self" in saved:
        return f"{op} backward at the edge of its domain; input {_describe(saved['self'])}"
    if not saved:
        return "finite incoming gradient gave a non-finite gradient (no saved inputs to show)"
    return "finite incoming gradient gave a non-finite gradient; saved " + "; ".join(
        f"{k}: {_describe(v)}" for k, v in saved.items())


# ----------------------------------------------------------------------------- modes

_UNINITIALIZED = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
                  "aten::new_empty_strided", "aten::empty_permuted", "aten::resize_",
                  "aten::resize_as_"}


class _FirstBadOp(TorchDispatchMode):
    """Checks each aten op's outputs; remembers the first non-finite one (replay only)."""

    def __init__(self, allow_inf: bool, stop_code):
        super().__init__()
        self.allow_inf, self.stop_code = allow_inf, stop_code
        self.found: Optional[Tuple[str, str, list]] = None  # (op, summary, frames)
        self.inherited = False  # its inputs were already bad: the cause is upstream

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is not None:
            return func(*args, **kwargs)
        ins = _float_tensors((args, kwargs))
        if func._schema.is_mutable:  # in-place: keep what it received
            ins = [t.clone() for t in ins]
        out = func(*args, **kwargs)
        if func._schema.name in _UNINITIALIZED:
            return out  # uninitialised memory may read as NaN: not a result
        outs = _float_tensors(out)
        if any(_nonfinite(t, self.allow_inf) for t in outs):
            name = func._schema.name  # aten::div (the overload would only add noise)
            self.inherited = any(_nonfinite(t, self.allow_inf) for t in ins)
            self.found = (name, forward_summary(name, ins, outs, self.allow_inf),
                          _frames_until(self.stop_code))
        return out


class _NodeOrigins(TorchFunctionMode):
    """Maps each autograd node created during the replay to the forward stack that made it."""

    def __init__(self, stop_code):
        super().__init__()
        self.stop_code = stop_code
        self.origin: Dict[Any, list] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for _, t in walk(out, "x"):
            node = t.grad_fn
            if node is not None and node not in self.origin:
                self.origin[node] = _frames_until(self.stop_code)
        return out


def _graph_nodes(roots, stop_ids=frozenset(), limit: int = MAX_NODES) -> list:
    """Autograd nodes reachable from ``roots`` (breadth first), at most ``limit``; nodes
    whose ``id`` is in ``stop_ids`` are neither listed nor walked below."""
    seen, order = set(), []
    todo = collections.deque(n for n in roots if n is not None)
    while todo and len(order) < limit:
        node = todo.popleft()
        if node in seen:
            continue
        seen.add(node)
        if id(node) in stop_ids:
            continue  # the model's side of a loss graph: neither hooked nor walked
        order.append(node)
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                todo.append(nxt)
    return order


def first_bad_node(outputs, grads, inputs, keep: bool, stop_ids=frozenset()):
    """Run ``torch.autograd.grad(outputs, inputs, grads)`` with a post-hook on every node
    and return the first node (in execution order) whose output gradients are non-finite
    while its incoming gradients are finite, or None.

    Args:
        outputs, grads: lists of tensors (same length; grads may hold None for ones).
        inputs: tensors or ``GradientEdge`` to differentiate with respect to (non-empty).
        keep: retain the graph (for the real loss graph, freed by the real backward).
        stop_ids: ``id`` of nodes not to hook nor walk below (the model's side of a loss
            graph).
    """
    found = []

    def make(node):
        def hook(grad_inputs, grad_outputs):
            if found:
                return None
            if any(g is not None and _nonfinite(g, False) for g in grad_inputs) and \
                    not any(g is not None and _nonfinite(g, False) for g in grad_outputs):
                found.append((node, backward_summary(node)))
            return None
        return hook

    nodes = _graph_nodes([o.grad_fn for o in outputs], stop_ids)
    handles = [n.register_hook(make(n)) for n in nodes]
    try:
        torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    del keep  # the replay graph is ours; the real graph is freed by the real backward
    return found[0] if found else None


# ----------------------------------------------------------------------------- replays

class _Quiet:
    """The monitor's hooks off, the model's buffers restored, the RNG forked (and set)."""

    def __init__(self, monitor, module: torch.nn.Module, rng):
        self.monitor, self.module, self.rng = monitor, module, rng

    def __enter__(self):
        self.removed = self.monitor._removed
        self.tick = self.monitor._forward_tick
        self.monitor._removed = True  # every healthmon hook returns at once
        _STATE.replaying += 1
        self.buffers = [(b, b.detach().clone()) for b in self.module.buffers()]
        devices = []
        if self.rng is not None and self.rng[1]:
            devices = [d for d, _ in self.rng[1]]
        self.fork = torch.random.fork_rng(devices=devices, enabled=True)
        self.fork.__enter__()
        if self.rng is not None:
            torch.set_rng_state(self.rng[0])
            for d, s in self.rng[1]:
                torch.cuda.set_rng_state(s, d)
        return self

    def __exit__(self, *exc):
        try:
            self.fork.__exit__(*exc)
            with torch.no_grad():
                for b, saved in self.buffers:
                    b.copy_(saved)
        finally:
            self.monitor._removed = self.removed
            self.monitor._forward_tick = self.tick
            _STATE.replaying -= 1
        return False


def _replay_forward(monitor, module, args, kwargs, allow_inf, rng=None):
    """Re-run ``module(*args, **kwargs)`` on clones under :class:`_FirstBadOp`."""
    args, kwargs = _clone(args, False), _clone(kwargs, False)
    mode = _FirstBadOp(allow_inf, _replay_forward.__code__)
    with _Quiet(monitor, module, rng), torch.no_grad(), mode:
        module(*args, **kwargs)
    return mode


def _replay_backward(monitor, module, args, kwargs, rng=None):
    """Re-run the forward with grad on clones (mapping nodes to lines), then backward with
    ones; returns ``(node, summary, frames)`` or None."""
    args, kwargs = _clone(args, True), _clone(kwargs, True)
    origins = _NodeOrigins(_replay_backward.__code__)
    with _Quiet(monitor, module, rng):
        with torch.enable_grad(), origins:
            out = module(*args, **kwargs)
        outs = [t for _, t in walk(out, "output") if t.requires_grad and t.grad_fn is not None]
        leaves = [p for p in module.parameters() if p.requires_grad]
        leaves += [t for t in _float_tensors((args, kwargs)) if t.requires_grad]
        if not outs or not leaves:
            return None
        hit = first_bad_node(outs, [torch.ones_like(o) for o in outs], leaves, keep=False)
        if hit is None:
            return None
        node, summary = hit
        return node.name(), summary, origins.origin.get(node, [])


# ----------------------------------------------------------------------------- loss graph

# source tokens of an op as people write it (``a / b``, ``torch.div(a, b)``, ``x.log()``)
_TOKENS = {"Div": r"(?<!/)/(?!/)|\bdiv_?\(|divide\(", "Log": r"\blog(2|10|1p)?_?\(",
           "Sqrt": r"\bsqrt_?\(", "Pow": r"\*\*|\bpow_?\(", "Reciprocal": r"reciprocal|1\s*/",
           "Exp": r"\bexp_?\(", "Rsqrt": r"\brsqrt_?\(", "Where": r"\bwhere\("}


def _guess_line(node_name: str, frame, lower: Optional[int] = None
                ) -> List[traceback.FrameSummary]:
    """Best guess of the forward line of a loss-side node: the last line up to ``frame``'s
    current line, in its function and not above ``lower`` (the line that called the model,
    when it is in the same function), holding the op's token."""
    token = _TOKENS.get(re.sub(r"Backward\d*$", "", node_name))
    if token is None or frame is None:
        return []
    code = frame.f_code
    first = code.co_firstlineno if code.co_name != "<module>" else 1
    if lower is not None:
        first = max(first, lower)
    for lineno in range(frame.f_lineno, first - 1, -1):  # ``(model(x) / d).backward()``
        text = linecache.getline(code.co_filename, lineno)
        src = text.split("#")[0]
        if re.search(token, src):
            return [traceback.FrameSummary(code.co_filename, lineno, code.co_name)]
    return []


# Loss-side nodes whose derivative blows up at a point of their saved input: name ->
# (saved attribute, test). Only these are checked before backward (one read each); a
# flagged node triggers the full gradient probe, which confirms it.
_RISKS = {
    "DivBackward0": ("_saved_other", lambda t: t == 0),
    "ReciprocalBackward0": ("_saved_result", torch.isinf),
    "LogBackward0": ("_saved_self", lambda t: t <= 0),
    "Log2Backward0": ("_saved_self", lambda t: t <= 0),
    "Log10Backward0": ("_saved_self", lambda t: t <= 0),
    "Log1PBackward0": ("_saved_self", lambda t: t <= -1),
    "SqrtBackward0": ("_saved_result", lambda t: t == 0),
    "RsqrtBackward0": ("_saved_self", lambda t: t <= 0),
    "PowBackward0": ("_saved_self", None),  # x ** p at 0 with p < 1: see _risky
    "PowBackward1": ("_saved_self", lambda t: t <= 0),
    "AcosBackward0": ("_saved_self", lambda t: t.abs() >= 1),
    "AsinBackward0": ("_saved_self", lambda t: t.abs() >= 1),
    "LinalgVectorNormBackward0": ("_saved_result", lambda t: t == 0),
    "NormBackward1": ("_saved_result", lambda t: t == 0),
}


def _risky(node) -> bool:
    """Whether a loss-side node's saved input sits where its derivative is not finite (or
    holds non-finite values). One small read per node of the kinds in :data:`_RISKS`."""
    risk = _RISKS.get(node.name())
    if risk is None:
        return False
    try:
        t = getattr(node, risk[0])
    except (AttributeError, RuntimeError):
        return True  # unreadable: let the probe decide
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return False
    test = risk[1]
    if test is None:  # PowBackward0: x ** p is smooth at 0 for p >= 1 (x ** 2 of a ReLU)
        p = getattr(node, "_saved_exponent", 0)
        test = (lambda x: x == 0) if isinstance(p, (int, float)) and p < 1 else \
            (lambda x: torch.zeros_like(x, dtype=torch.bool))
    return bool((test(t) | ~torch.isfinite(t)).any())


class _State:
    replaying = 0
    depth = 0  # nesting of the backward wrappers (Tensor.backward -> autograd.backward)
    originals: dict = {}


def _restore_originals() -> None:
    if _STATE.originals:
        torch.Tensor.backward = _STATE.originals.pop("tensor")
        torch.autograd.backward = _STATE.originals.pop("autograd")


_STATE = _State()
# Drilldown objects of live sync monitors, oldest first (weakly: see healthmon.owners)
_STATE.owners = Owners(on_collected=_restore_originals)


def _owner():
    for d in reversed(_STATE.owners):
        if d.monitor._cur.forward and not d.monitor._removed:
            return d
    return None


def _probe(tensors, grad_tensors, frame) -> None:
    if _STATE.replaying or torch.compiler.is_compiling():
        return
    owner = _owner()
    if owner is not None:
        try:
            owner.probe_loss(tensors, grad_tensors, frame)
        except Exception as e:  # noqa: BLE001 - a failed probe must never break backward
            owner.loss_note = f"the loss-side probe failed ({type(e).__name__}: {e})"


def _caller_frame():
    """The frame that called ``backward()``: the first one above healthmon's own wrappers
    (the loss-site wrapper may sit on top of this one)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.replace("\\", "/").startswith(
            _PACKAGE_DIR):
        frame = frame.f_back
    return frame


def _wrap_tensor_backward(original):
    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        outer = not _STATE.depth
        if outer and inputs is None:
            _probe([self], [gradient], _caller_frame())
        _STATE.depth += 1
        try:
            return original(self, gradient, retain_graph, create_graph, inputs)
        finally:
            _STATE.depth -= 1
            if outer:
                _clear_pending()
    backward.__wrapped__ = original
    backward.__doc__ = original.__doc__
    backward._healthmon_drilldown = True
    return backward


def _wrap_autograd_backward(original):
    def backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False,
                 grad_variables=None, inputs=None):
        outer = not _STATE.depth  # Tensor.backward calls this one: probe once
        if outer and inputs is None and grad_variables is None:
            ts = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
            gs = grad_tensors
            gs = [gs] if isinstance(gs, torch.Tensor) or gs is None else list(gs)
            if len(gs) < len(ts):
                gs = gs + [None] * (len(ts) - len(gs))
            _probe(ts, gs, _caller_frame())
        _STATE.depth += 1
        try:
            return original(tensors, grad_tensors, retain_graph, create_graph,
                            grad_variables, inputs)
        finally:
            _STATE.depth -= 1
            if outer:
                _clear_pending()
    backward.__wrapped__ = original
    backward.__doc__ = original.__doc__
    backward._healthmon_drilldown = True
    return backward


def _clear_pending() -> None:
    for d in _STATE.owners:
        d.loss_op = None
        d.loss_note = ""


def install(drill: "Drilldown") -> None:
    """Wrap ``torch.Tensor.backward`` and ``torch.autograd.backward`` for ``drill``
    (reference-counted; the last :func:`uninstall` restores the originals)."""
    if drill in _STATE.owners:
        return
    if not _STATE.originals:
        _STATE.originals["tensor"] = torch.Tensor.backward
        _STATE.originals["autograd"] = torch.autograd.backward
        torch.Tensor.backward = _wrap_tensor_backward(torch.Tensor.backward)
        torch.autograd.backward = _wrap_autograd_backward(torch.autograd.backward)
    _STATE.owners.add(drill)


def uninstall(drill: "Drilldown") -> None:
    """Undo :func:`install` for ``drill``."""
    if drill not in _STATE.owners:
        return
    _STATE.owners.discard(drill)
    if not _STATE.owners:
        _restore_originals()


def installed() -> bool:
    """Whether the drill-down's backward wrappers are in place (anywhere in the chain)."""
    fn = torch.Tensor.backward
    for _ in range(32):
        if fn is None:
            return False
        if getattr(fn, "_healthmon_drilldown", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


# ----------------------------------------------------------------------------- per monitor

class Drilldown:
    """The sync-mode drill-down state of one monitor: the current module call, weak
    references to the root call's inputs, the loss-side finding of the current backward."""

    def __init__(self, monitor):
        self.monitor = monitor
        self.call: Optional[tuple] = None  # (module, args, kwargs) during its forward hook
        self.root: Optional[tuple] = None  # (module, weak args, weak kwargs, rng, frames)
        self.root_edges: frozenset = frozenset()  # (id(grad_fn), output_nr) of root outputs
        self.loss_op: Optional[Operation] = None
        self.loss_note = ""
        # other top-level watched modules (a loss module): weak refs to their last call
        self.extra_calls: Dict[int, tuple] = {}
        self._tops: Tuple[int, frozenset] = (-1, frozenset())

    # --- what the hooks hand over (sync mode only) ---------------------------------------

    def root_call(self, module, args, kwargs, frames_sid: int) -> None:
        """Root pre-hook: weak references to the inputs and the RNG state (one small copy)."""
        wa, wk = _weak(args), _weak(kwargs or {})
        if wa is None or wk is None:
            self.root = None
            return
        cuda = sorted({t.device for t in _float_tensors((args, kwargs)) if t.is_cuda},
                      key=str) if _CUDA else []
        rng = (torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in cuda])
        self.root = (module, wa, wk, rng, frames_sid)
        self.root_edges = frozenset()
        self.extra_calls = {}

    def forward_call(self, module, args, kwargs, output, is_root: bool) -> None:
        """Forward hook: the current call (cleared by :meth:`forward_done`)."""
        self.call = (module, args, kwargs)
        if is_root:  # ids only: the outputs' lifetime is the user's (see probe_loss)
            self.root_edges = frozenset((id(t.grad_fn), t.output_nr)
                                        for _, t in walk(output, "output")
                                        if t.grad_fn is not None)
        elif id(module) in self._top_modules():  # a watched loss module: weak refs
            wa, wk = _weak(args), _weak(kwargs or {})
            if wa is not None and wk is not None:
                self.extra_calls[id(module)] = (module, wa, wk)

    def _top_modules(self) -> frozenset:
        """ids of the watched modules, other than the root, that no watched module contains
        (modules passed to ``watch(model, loss_module)``); cached per module count."""
        mods = self.monitor._modules
        if self._tops[0] != len(mods):
            inner = {id(c) for m in mods for c in m.children()}
            self._tops = (len(mods), frozenset(id(m) for m in mods[1:] if id(m) not in inner))
        return self._tops[1]

    def forward_done(self) -> None:
        self.call = None

    # --- the search ---------------------------------------------------------------------

    def explain(self, site, anomaly) -> None:
        """Attach the exact operation to ``anomaly`` (the first of its step), or say in
        ``anomaly.drilldown`` why it could not be named. Never raises."""
        if self.monitor._dist is not None:
            anomaly.drilldown = ("not searched under torch.distributed (a replay could run a "
                                 "collective on one rank only)")
            return
        if torch.compiler.is_compiling():
            return
        try:
            if site.phase == "forward":
                self._explain_forward(site, anomaly)
            elif site.phase in ("backward", "grad"):
                self._explain_backward(anomaly)
            elif site.phase == "input":
                anomaly.drilldown = "the model's input was already bad: nothing to replay"
        except Exception as e:  # noqa: BLE001 - the report must still be raised
            anomaly.drilldown = f"the replay failed ({type(e).__name__}: {e})"

    def _root_args(self):
        module, wa, wk, rng, sid = self.root
        return module, _strong(wa), _strong(wk), rng, self.monitor._stacks.frames(sid)

    def _explain_forward(self, site, anomaly) -> None:
        mon = self.monitor
        notes = []
        if self.call is not None and site.module >= 0 and \
                mon._modules[site.module] is self.call[0]:
            module, args, kwargs = self.call
            mode = _replay_forward(mon, module, args, kwargs, site.allow_inf)
            if mode.found is not None and not mode.inherited:
                op, summary, frames = mode.found
                anomaly.operation = Operation(op, "forward", summary, anomaly.stack + frames,
                                              how=f"replay of {anomaly.site} "
                                              f"[{type(module).__name__}] forward")
                return
            notes.append("its input was already bad when it was called" if mode.inherited
                         else "the replay of its forward gave finite outputs")
        if self.root is not None:
            try:
                module, args, kwargs, rng, stack = self._root_args()
            except LookupError as e:
                notes.append(str(e))
            else:
                mode = _replay_forward(mon, module, args, kwargs, site.allow_inf, rng)
                if mode.found is not None and not mode.inherited:
                    op, summary, frames = mode.found
                    anomaly.operation = Operation(
                        op, "forward", summary, stack + frames,
                        how="replay of the model's whole forward (" + "; ".join(notes) + ")"
                        if notes else "replay of the model's whole forward")
                    return
                notes.append("the model's input was already bad" if mode.inherited else
                             "a replay of the model's forward gave finite values "
                             "(non-deterministic op, or an in-place op on the model's input)")
        anomaly.drilldown = "not found: " + "; ".join(notes or ["nothing to replay"])

    def _explain_backward(self, anomaly) -> None:
        mon = self.monitor
        blamed = mon._names.index(anomaly.site) if anomaly.site in mon._names else -1
        extra = self.extra_calls.get(id(mon._modules[blamed])) if blamed >= 0 else None
        if extra is not None:  # a watched loss module consumed it: replay that module
            try:
                module, args, kwargs = extra[0], _strong(extra[1]), _strong(extra[2])
            except LookupError:
                pass
            else:
                hit = _replay_backward(mon, module, args, kwargs)
                if hit is not None:
                    name, summary, frames = hit
                    anomaly.operation = Operation(
                        name, "backward", summary, anomaly.stack + frames,
                        how=f"replay of {anomaly.site} forward + backward")
                    return
        if self.loss_op is not None:
            anomaly.operation = self.loss_op
            return
        notes = [self.loss_note] if self.loss_note else []
        if self.root is None:
            anomaly.drilldown = "not found: " + "; ".join(notes + ["no root forward to replay"])
            return
        try:
            module, args, kwargs, rng, stack = self._root_args()
        except LookupError as e:
            anomaly.drilldown = f"not found: {e}"
            return
        hit = _replay_backward(self.monitor, module, args, kwargs, rng)
        if hit is None:
            anomaly.drilldown = "not found: " + "; ".join(notes + [
                "a replay of the model's forward and backward (ones as the upstream "
                "gradient) stayed finite; the cause may be the real upstream gradient"])
            return
        name, summary, frames = hit
        anomaly.operation = Operation(name, "backward", summary, stack + frames,
                                      how="replay of the model's forward + backward")

    def probe_loss(self, tensors, grad_tensors, frame) -> None:
        """Before the real backward: gradients of the loss w.r.t. the root outputs through
        the loss-side graph only (kept for the real backward, which frees it)."""
        if not self.root_edges:
            return
        roots = [(t, g) for t, g in zip(tensors, grad_tensors)
                 if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        if not roots:
            return
        # The root outputs' tensors may be gone (``model(x) / div``), their nodes are not:
        # find them in the loss graph by id and differentiate w.r.t. their gradient edges.
        stop = {nid for nid, _ in self.root_edges}
        outs = []
        risky = False
        for node in _graph_nodes([t.grad_fn for t, _ in roots], stop, PROBE_NODES):
            for nxt, nr in node.next_functions:
                if nxt is not None and (id(nxt), nr) in self.root_edges:
                    edge = GradientEdge(nxt, nr)
                    if all(e.node is not nxt or e.output_nr != nr for e in outs):
                        outs.append(edge)
            if not risky:
                risky = _risky(node)
        if not outs or not risky:
            return  # healthy: a walk of the loss-side nodes, no gradient computed
        ts = [t for t, _ in roots]
        gs = [g if g is not None else torch.ones_like(t) for t, g in roots]
        mon = self.monitor
        removed = mon._removed
        mon._removed = True  # our gradient hooks on the outputs must not record twice
        _STATE.replaying += 1
        try:
            got = torch.autograd.grad(ts, outs, gs, retain_graph=True, allow_unused=True)
            if not any(g is not None and _nonfinite(g, False) for g in got):
                return
            hit = first_bad_node(ts, gs, outs, keep=True, stop_ids=stop)
        finally:
            mon._removed = removed
            _STATE.replaying -= 1
        if hit is None:
            return  # the loss side is fine: the bad gradient comes from inside the model
        node, summary = hit
        lower = None
        if self.root is not None and frame is not None:  # the line that called the model
            code = frame.f_code
            for fr in self.monitor._stacks.frames(self.root[4]):
                if fr.filename == code.co_filename and fr.name == code.co_name:
                    lower = fr.lineno
        guess = _guess_line(node.name(), frame, lower)
        how = ("gradient probe of the code between the model's output and backward() "
               "(outside the watched modules)")
        if not guess and frame is not None:  # no line: say where backward was called
            guess = [traceback.FrameSummary(frame.f_code.co_filename, frame.f_lineno,
                                            frame.f_code.co_name)]
            how += "; its forward line is unknown, shown: the backward() call"
        self.loss_op = Operation(node.name(), "backward", summary, guess, how=how,
                                 certain=False)
