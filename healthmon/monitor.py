"""``healthmon.watch(model)``: the always-on monitor.

What is recorded, per monitored step, into one preallocated float64 record buffer per
device (one row per *site*; a site is ``(module, phase, role, call)`` and the buffer grows
only with the number of sites, never with steps):

* ``input``    the model's inputs (root forward pre-hook), site ``<input>``;
* ``forward``  every module call's output tensors (forward hook; containers walked);
  a tensor returned by several nested modules is recorded once, for the innermost;
* ``backward`` the gradient of every module call's output tensors (a tensor hook
  registered on the output in the forward hook);
* ``grad``     every parameter gradient after accumulation
  (``register_post_accumulate_grad_hook``). The hook only queues the parameter; an autograd
  engine callback queued by the first such hook runs when the backward pass ends and
  records all queued ``p.grad`` with one ``ops.multi_stats_into`` call per device. At that
  point every gradient is alive (before any optimizer step or ``zero_grad``) and the monitor
  keeps no reference to any gradient (it holds the model's parameters only).
* ``param``    every parameter at the end of a training step (after the optimizer's update
  when the boundary is its step hook), one multi-tensor op per device; steps without a
  backward (evaluation) skip it.
* ``label``    class-index targets of ``cross_entropy`` / ``nll_loss`` calls (see
  :mod:`healthmon.labels`).

In async mode (default) hooks only launch the native op (no host sync). At a step
boundary the buffer is copied to (pinned) host memory and the previous step is decoded
(on CPU: the current step, immediately): the first anomaly in execution order is reported
(``raise`` / ``warn`` / ``log``), later ones of the step are its consequences. In sync mode
each record is checked in its hook and the error raised there.

Step boundaries: the next forward call of the (first) root module (outside a backward
pass, so checkpoint recomputation does not count), ``mon.step()``, the step of any optimizer
that holds a watched parameter (one global ``register_optimizer_step_post_hook``, filtered
per optimizer), ``mon.check()`` and leaving the ``with`` block.

Attribution of backward anomalies: the gradient of module M's output is produced by the
backward of whatever consumed that output. When the first non-finite gradient of a step
follows a finite gradient record of another module C (backward runs in reverse order, so C
is the consumer just downstream), the anomaly names C with role ``grad_input`` and carries
C's forward stack; when it is the first gradient of the step, it names M with role
``grad_output`` (the gradient arrived bad from code outside the watched modules, e.g. the
loss) and carries M's forward stack.
With torch.distributed initialised, ranks agree at every decoded step (one small
all-reduce) and parameter gradients are recorded in their hook: see
:mod:`healthmon.distributed`.
"""
from __future__ import annotations

import fnmatch
import threading
import time
import weakref
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from . import alerts, decode
from . import distributed as _distributed
from . import drilldown, fastpath, labels, loss_site, native_rules, ops, traced
from . import rules as _rules
from ._layout import LABEL
from .actions import Reporter, UpdateSkipper
from .config import Config, resolve
from .errors import Anomaly
from .hooks import (OPTIMIZER_HOOKS, PLAIN, ForwardHook, GradHook, ParamHook,
                    ReplayableForwardHook, RootPreHook, local_tensor, record_parts, unsupported,
                    walk)
from .param_records import ParamRecords
from .records import PHASE_RANK, Recorder, Site, Step, execution_key, merge_order
from .sinks import call_sinks
from .summary import format_summary

# module -> weak reference to the monitor watching it (both weak: a model dropped without
# remove() is collected with its monitor)
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
MAX_FORWARDS_PER_SEGMENT = 64  # training forwards of one step before a segment is decoded
_FORWARD_TICKS = [0]


def _has_compiled_code(modules, root: nn.Module) -> bool:
    """Whether Dynamo holds compiled code for a forward of ``modules`` (``torch.compile(m)``
    compiles ``forward``, or for a ``torch.nn`` class such as ``nn.Sequential`` a wrapper
    frame every such compiled module shares; ``m.compile()`` compiles
    ``Module._call_impl``)."""
    try:
        from torch._dynamo import external_utils
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return False
    codes = {type(m).forward.__code__ for m in modules
             if hasattr(type(m).forward, "__code__")}
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in modules):
        codes.add(nn.Module._call_impl.__code__)
    try:
        if type(root).__module__.startswith("torch.nn."):
            codes.add(external_utils.wrap_inline(_has_compiled_code).__code__)
        return any(_debug_get_cache_entry_list(code) for code in codes)
    except Exception:  # private API: never break watch()
        return False


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() >= 0


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _cached(sites: List[Optional[Site]], call: int) -> Optional[Site]:
    return sites[call] if call < len(sites) else None


def _cache(sites: List[Optional[Site]], call: int, site: Site) -> None:
    while len(sites) <= call:
        sites.append(None)
    sites[call] = site


def _passes_through(module: nn.Module) -> bool:
    """A plain ``nn.Sequential`` (not a subclass, no hooks of its own) returns its last
    module's output, which that module's own hook records: a hook of its own would only
    cost a call per step (a third of all hook calls in a stack of Sequential blocks)."""
    return type(module) is nn.Sequential and len(module) > 0 and not module._forward_hooks \
        and not module._forward_pre_hooks


class Monitor:
    """Watches modules' inputs, outputs, gradients and parameter gradients.

    Create it with :func:`watch`. Attributes: ``anomalies`` (list of Anomaly, oldest
    first), ``config`` (resolved options), ``step_index`` (current step), ``skipped``
    (reason -> count of tensors that could not be recorded).
    """

    def __init__(self, roots: Sequence[nn.Module], config: Config,
                 allow_inf: Sequence[str] = (), sinks: Sequence = (), prefix: str = "",
                 warn=None):
        self.config = config
        self.warnings: List[Anomaly] = []  # early warnings (severity "warning"), oldest first
        cfg = _rules.resolve_warn(warn, config.warn)
        self._rules = native_rules.create(cfg) if cfg is not None else None
        self._rules_cadence = _rules.Cadence(cfg.budget if cfg is not None else 1.0)
        self.prefix = prefix
        self._forward_tick = 0
        self._forward_thread: Optional[int] = None
        self.auto = False  # created by healthmon run / watch_all: yields to explicit watch()
        # remove every hook when a HealthError is raised (the trainer callbacks: the error
        # ends training wherever it is raised, e.g. from inside optimizer.step())
        self.remove_on_raise = False
        self.sinks = list(sinks)
        self._reporter = Reporter(config.on_anomaly, self.sinks, self._release_on_raise)
        self.anomalies: List[Anomaly] = self._reporter.anomalies
        self.skipped: Dict[str, int] = {}
        self._skipper = UpdateSkipper(config.max_skips)
        # on_anomaly="skip": the steps whose update was dropped
        self.skipped_steps: List[int] = self._skipper.steps
        self.step_index = 0
        self._allow_inf = tuple(allow_inf)
        self._removed = not config.enabled
        self._handles: list = []
        self._modules: List[nn.Module] = []
        self._names: List[str] = []
        self._rec = Recorder(64, self._site_allows_inf)
        self._trace = traced.TraceState()
        self._mod_stack: List[int] = []
        self._param_records = ParamRecords(self._rec, self._names, self._mod_stack, self._skip)
        self._calls: List[int] = []
        # module -> [site of its call-k single-tensor "output" / its "grad_output"]
        self._fwd_cache: List[List[Optional[Site]]] = []
        self._bwd_cache: List[List[Optional[Site]]] = []
        self._seen: Dict[int, tuple] = {}  # id(tensor) -> (weakref, recorded fwd, hooked bwd)
        self._input_sid = -1  # the stack of the last root forward (its capture's hint)
        self._input_cache: List[Optional[Site]] = []  # call -> site of a lone input tensor
        self._grad_queue: Dict[int, None] = {}
        self._callback_queued = False
        self._pending: Optional[Step] = None
        self._last_rows = decode.LazyRows([], {})  # the last decoded step's rows
        self._view_memo = decode.ViewMemo()  # a compiled step's merged order, reused
        self._last_step: Optional[int] = None
        self._checked = 0
        self._opt_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._opt_stepped = False  # an optimizer holding watched parameters has stepped
        self._cur = Step(0, True)
        self._fast = None  # healthmon._C.FastPath, or None (no extension, switched off)
        self._param_hooks = None  # healthmon._C.ParamGradHooks (with the fast path)
        self._param_hook_objs: List[ParamHook] = []  # what the C++ hooks call / hand over
        self._external_steps = False  # set_step() called: a trainer numbers the steps
        self._dist = None  # distributed.RankAgreement when torch.distributed is initialised
        self._drill: Optional[drilldown.Drilldown] = None  # sync mode: exact-op search
        _distributed.agree_settings(config)  # a collective on every rank, also when off
        if not config.enabled:
            return
        # the eager hot path in C++ (csrc/fast_path.cpp); in sync mode it checks CPU
        # records itself and hands a flagged one to _check_now
        self._fast = fastpath.create(self)
        self._param_hooks = fastpath.create_param_hooks(self) if self._fast is not None else None
        if config.log:
            self.sinks.append(_distributed.jsonl_sink(config.log))  # one file per rank
        self._attach(roots)
        self._dist = _distributed.attach(self)
        self._set_param_hook_mode()  # step 0 too (later: at each step's start)

    @property
    def _stacks(self):
        return self._rec.stacks

    @property
    def _sites(self):
        return self._rec.sites

    def _site_allows_inf(self, name: str, phase: str, role: str) -> bool:
        return phase in ("forward", "input") and any(
            fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(f"{name}.{role}", pat)
            for pat in self._allow_inf)

    # ----------------------------------------------------------------- setup / teardown

    def _attach(self, roots: Sequence[nn.Module]) -> None:
        if self.config.sync:
            self._drill = drilldown.Drilldown(self)
            drilldown.install(self._drill)
        try:
            self._handles.append(roots[0].register_forward_pre_hook(
                RootPreHook(self, roots[0], 0), with_kwargs=True))
            for r, root in enumerate(roots):
                self._add_modules(root, self.prefix if r == 0 else type(root).__name__)
            OPTIMIZER_HOOKS.add(self)
            traced.guard_hooks(self)
        except Exception:
            self._detach()
            raise
        # rows for every module output, output gradient and parameter (and its gradient)
        # from the start: the buffers do not grow (move) once a graph captured them
        self._rec.capacity = 2 * len(self._modules) + len(self._param_records) + 64
        labels.install_loss_guard(self)
        loss_site.install(self)
        self._warn_if_compiled(roots[0])

    def _warn_if_compiled(self, root: nn.Module) -> None:
        """Hooks added after a module's compiled code ran are not seen by that code
        (Dynamo does not guard on module hooks): when compiled code of a watched module
        exists, reset Dynamo's caches (the next call recompiles with the hooks) and say so,
        instead of silently recording nothing."""
        if not _has_compiled_code(self._modules, root):
            return
        import warnings
        warnings.warn(
            "healthmon: watch() was called after compiled code (torch.compile) of this "
            "model's modules already ran (this model, or another instance of the same "
            "classes: Dynamo caches code per class and does not guard on hooks); that code "
            "would not see the monitor's hooks, so healthmon reset Dynamo's caches "
            "(torch._dynamo.reset()): the next compiled call recompiles, with the monitor. "
            "To avoid the recompile, call healthmon.watch(model) before the first call of "
            "any compiled model of these classes.", RuntimeWarning, stacklevel=4)
        torch._dynamo.reset()

    def _add_modules(self, root: nn.Module, prefix: str) -> None:
        """Hook ``root`` and its submodules not hooked yet (site names ``prefix.qualname``)."""
        new = []
        known = {id(m) for m in self._modules}
        for qual, mod in _distributed.named_modules(root):  # without wrapper prefixes
            if id(mod) in known:
                continue
            ref = _WATCHED.get(mod)
            owner = ref() if ref is not None else None
            if owner is not None and owner is not self and owner.auto and not self.auto:
                owner.remove()  # healthmon run / watch_all: the script's own watch() wins
                owner = None
            if owner is not None and owner is not self:
                raise RuntimeError(
                    f"healthmon: {type(mod).__name__} module is already watched by another "
                    "monitor; call its remove() (or leave its `with` block) before watching "
                    "again")
            known.add(id(mod))
            new.append((".".join(p for p in (prefix, qual) if p) or "<model>", mod))
        first = len(self._modules)
        for name, mod in new:
            self._modules.append(mod)
            self._names.append(name)
            self._mod_stack.append(-1)
            self._calls.append(0)
            self._fwd_cache.append([])
            self._bwd_cache.append([])
        for i in range(first, len(self._modules)):
            mod = self._modules[i]
            if i and _passes_through(mod):
                pass  # its output is its last module's, recorded by that module's hook
            elif self._drill is None:
                self._handles.append(mod.register_forward_hook(
                    ForwardHook(self, mod, i, traced.record_forward)))
            else:  # sync mode: the call's arguments are at hand for a replay
                self._handles.append(mod.register_forward_hook(
                    ReplayableForwardHook(self, mod, i), with_kwargs=True))
            for pname, p in mod.named_parameters(recurse=False):
                pindex = self._param_records.add(i, pname, p)
                if pindex is None:
                    continue
                hook = ParamHook(self, p, pindex)
                if self._param_hooks is None or type(p) is not nn.Parameter:
                    # (FSDP2 calls a sharded DTensor parameter's Python hooks itself)
                    self._handles.append(p.register_post_accumulate_grad_hook(hook))
                else:  # in C++: no Python call per parameter per backward
                    fastpath.install_param_hook(self, p, hook)
            _WATCHED[mod] = weakref.ref(self)

    def add(self, module: nn.Module, prefix: Optional[str] = None) -> None:
        """Watch one more module (e.g. a loss module created later) in this monitor: same
        steps, same execution order. Its sites are named ``prefix.qualname`` (default
        prefix: its class name). Its calls are not step boundaries.

        Raises:
            TypeError: not an ``nn.Module``.
            RuntimeError: it (or a submodule) is watched by another monitor.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"healthmon: Monitor.add expects an nn.Module, got "
                            f"{type(module).__name__}")
        if self._removed:
            return
        self._add_modules(module, type(module).__name__ if prefix is None else prefix)

    def _detach(self) -> None:
        labels.uninstall_loss_guard(self)
        loss_site.uninstall(self)  # installed after the drill-down's wrapper: undone first
        if self._drill is not None:
            drilldown.uninstall(self._drill)
        OPTIMIZER_HOOKS.discard(self)
        traced.unguard_hooks(self)
        if self._param_hooks is not None:
            self._param_hooks.remove()  # each slot back to what it held (the user's hooks)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in self._param_records.params:  # torch leaves {} behind: restore it
            if not getattr(p, "_post_accumulate_grad_hooks", None):
                try:
                    p._post_accumulate_grad_hooks = None
                except (AttributeError, RuntimeError):
                    pass
        for mod in self._modules:
            ref = _WATCHED.get(mod)
            if ref is not None and ref() is self:
                del _WATCHED[mod]

    def _release(self) -> None:
        """Remove the hooks without decoding anything more (the error path)."""
        if self._removed:
            return
        self._removed = True
        self._detach()
        self._rec.release()
        if self._fast is not None:
            self._fast.disable()
        self._seen.clear()
        self._grad_queue.clear()
        call_sinks(self.sinks, "close")

    def remove(self) -> None:
        """Remove every hook; the modules are left exactly as before. Records not yet
        decoded are decoded (anomalies added to ``anomalies``, never raised). Idempotent."""
        if self._removed:
            return
        try:
            self._end_step(apply_policy=False)
            self._decode_pending(apply_policy=False)
        finally:
            self._release()

    @property
    def active(self) -> bool:
        """False for an inert (``HEALTHMON=off``) or removed monitor."""
        return not self._removed

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._removed:
            try:
                self.check()
            finally:
                self.remove()
        else:
            self.remove()

    def __repr__(self) -> str:
        state = "off" if not self.config.enabled else ("removed" if self._removed else
                                                       ("sync" if self.config.sync else "async"))
        return (f"<healthmon.Monitor {state}: {len(self._modules)} modules, "
                f"{len(self._param_records)} parameters, {len(self._sites)} sites, "
                f"step {self.step_index}, {len(self.anomalies)} anomalies>")

    # ----------------------------------------------------------------- recording (eager)

    def _site(self, module: int, name: str, phase: str, role: str, call: int,
              device: torch.device, dtype=None) -> Site:
        return self._rec.site(module, name, phase, role, call, device, dtype)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _record(self, t: torch.Tensor, module: int, name: str, phase: str, role: str,
                call: int, sid: int) -> Optional[Site]:
        """Record ``t`` (a subclass: one row per inner tensor); returns its site, or None
        (skipped, or several rows)."""
        parts, reason = record_parts(t, role)  # subclasses: one row per inner tensor
        if reason is not None:
            self._skip(reason)
            return None
        site = None
        for part_role, part in parts:
            site = self._record_ok(part, module, name, phase, part_role, call, sid)
        return site if len(parts) == 1 else None

    def _record_ok(self, t: torch.Tensor, module: int, name: str, phase: str, role: str,
                   call: int, sid: int, site: Optional[Site] = None) -> Site:
        if site is None:
            t = local_tensor(t)  # a DTensor's local shard (no communication)
            site = self._site(module, name, phase, role, call, t.device, t.dtype)
        ops.record_unchecked(t, site.buffer.records, site.slot)
        self._cur.order.append((site, sid))
        if self.config.sync:
            self._check_now(site, sid)
        return site

    def _on_root_forward(self, module, args, kwargs) -> None:
        if self._removed:
            return
        if _is_compiling():
            traced.record_inputs(self, args, kwargs)
            return
        if _in_backward():
            return
        if self._dist is None and _distributed.initialized():  # initialised after watch()
            self._dist = _distributed.attach(self, agree=True)
            self._set_param_hook_mode()
        cur = self._cur
        # a root forward after a backward is a step boundary until an optimizer has stepped
        # (then the optimizer's steps are the steps); evaluation forwards never are
        training = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        if training and not self._external_steps and not self._opt_stepped and cur.backward:
            self._end_step()
            cur = self._cur
        elif cur.forward and (not training or (not cur.backward and
                                               cur.forwards >= MAX_FORWARDS_PER_SEGMENT)):
            # an evaluation batch inside a step (validation loops), or many forwards before
            # the step's backward (a forward-only loop with grad on): the records so far are
            # decoded as a segment of the same step, so call numbers (and sites) do not grow
            # with the number of forwards. A few forwards before one backward (a policy
            # called once per environment step) are calls 0, 1, ... of one step.
            self._end_step(next_index=cur.index)
            cur = self._cur
        cur.forwards += 1
        cur.forward = True
        cur.train = cur.train or training
        _FORWARD_TICKS[0] += 1
        self._forward_tick = _FORWARD_TICKS[0]  # which model's step a loss belongs to
        self._forward_thread = threading.get_ident()
        if cur.active:
            sid = self._input_sid = self._stacks.capture(2, self._input_sid)
            if self._drill is not None:  # weak references + RNG state, for a replay
                self._drill.root_call(module, args, kwargs, sid)
            # the n-th forward of the step is call n of its inputs, as of every module
            call = cur.forwards - 1
            if not kwargs and len(args) == 1 and type(args[0]) in PLAIN:
                self._input_tensor(args[0], call, sid)  # the common case: one tensor
                return
            for role, t in walk(args, "input"):
                self._record(t, -1, "<input>", "input", role, call, sid)
            if kwargs:
                for role, t in walk(kwargs, "input"):
                    self._record(t, -1, "<input>", "input", role, call, sid)

    def _input_tensor(self, t: torch.Tensor, call: int, sid: int) -> None:
        """The root's call ``call`` in the step took one plain tensor (role ``input[0]``, as
        :func:`~healthmon.hooks.walk` names it): its site is cached per call."""
        site = _cached(self._input_cache, call)
        if site is None or site.device != t.device or site.dtype != t.dtype or \
                t.layout is not torch.strided or t.is_nested:
            site = self._record(t, -1, "<input>", "input", "input[0]", call, sid)
            if site is not None:
                _cache(self._input_cache, call, site)
            return
        self._record_ok(t, -1, "", "", "", 0, sid, site)

    def _on_forward(self, index: int, output) -> None:
        if self._removed:
            return
        if _is_compiling():
            traced.record_forward(id(self), index, output)
            return
        if not self._cur.active:
            return
        if self.config.sync and self._rec.has_compiled:
            self._check_compiled_now(("input", "forward"))  # a compiled body ran before
        recompute = _in_backward()  # activation checkpointing re-runs forward in backward
        if recompute and self._calls[index]:
            # attribute to the original (last) call: its site and its forward stack
            call, sid = self._calls[index] - 1, self._mod_stack[index]
        else:
            call = self._calls[index]
            self._calls[index] = call + 1
            sid = self._stacks.capture(2, self._mod_stack[index])
            self._mod_stack[index] = sid
        if type(output) in PLAIN and not recompute:
            self._forward_tensor(index, call, output, sid)  # the common case: one tensor
            return
        name = self._names[index]
        grad_on = torch.is_grad_enabled()
        seen = self._seen
        # a flat tuple's items: the fast path takes them from the next step on (by index)
        items = {id(item): i for i, item in enumerate(output)} \
            if type(output) is tuple and self._fast is not None and not recompute else None
        marked = self._rec.has_compiled  # items compiled code recorded carry its marker
        for role, t in walk(output, "output"):
            if marked and type(t) is torch.Tensor and hasattr(t, traced.MARK):
                continue  # recorded (and its gradient hooked) by the inner compiled module
            entry = seen.get(id(t))
            if entry is not None and entry[0]() is not t:
                entry = None
            fwd_done = entry is not None and entry[1]
            bwd_done = entry is not None and entry[2]
            want_bwd = grad_on and t.requires_grad and t.grad_fn is not None and not bwd_done
            if not fwd_done and not recompute or want_bwd:
                reason = unsupported(t)
                if reason is not None:
                    self._skip(reason)
                    continue
            part = items.get(id(t), -1) if items else -1
            if not fwd_done and not recompute:
                site = self._record(t, index, name, "forward", role, call, sid)
                if part >= 0 and site is not None and type(t) in PLAIN:
                    fastpath.prime_forward(self, index, call, site, sid, part, len(output))
            if want_bwd:
                t.grad_fn.register_prehook(GradHook(self, index, "grad_" + role, call, sid,
                                                     t.output_nr, part=part))
            if entry is None:
                seen[id(t)] = (weakref.ref(t), True, want_bwd)
            elif want_bwd or not fwd_done:
                seen[id(t)] = (entry[0], True, bwd_done or want_bwd)

    def _forward_tensor(self, index: int, call: int, t: torch.Tensor, sid: int) -> None:
        """The common case: call ``call`` of a module in the step returned one plain
        tensor (after a first time, the C++ fast path does this)."""
        if self._rec.has_compiled and type(t) is torch.Tensor and hasattr(t, traced.MARK):
            return  # recorded by the compiled code that produced it
        seen = self._seen
        key = id(t)
        entry = seen.get(key)
        if entry is not None and entry[0]() is t:
            if entry[2] or not (t.requires_grad and t.grad_fn is not None and
                                torch.is_grad_enabled()):
                return  # an inner module returned the same tensor: recorded there
            return self._on_forward_general(index, t, sid)
        site = _cached(self._fwd_cache[index], call)
        if site is None or site.device != t.device or site.dtype != t.dtype:
            reason = unsupported(t)
            if reason is not None:
                self._skip(reason)
                return
            site = self._site(index, self._names[index], "forward", "output", call,
                              t.device, t.dtype)
            _cache(self._fwd_cache[index], call, site)
        elif t.layout is not torch.strided or t.is_nested:
            self._skip(unsupported(t) or "unsupported layout")
            return
        self._record_ok(t, index, "", "", "", 0, sid, site)
        # a leaf (a module returning its own parameter) gets no hook: one would pile up per
        # step on a tensor that lives forever; its gradient is recorded as a ``grad``
        fn = t.grad_fn
        want_bwd = fn is not None and torch.is_grad_enabled()
        if want_bwd:  # a node pre-hook: cheaper than Tensor.register_hook, same gradient
            fn.register_prehook(GradHook(self, index, "grad_output", call, sid, t.output_nr,
                                          _cached(self._bwd_cache[index], call)))
        seen[key] = (weakref.ref(t), True, want_bwd)
        if self._fast is not None:
            fastpath.prime_forward(self, index, call, site, sid)

    def _on_forward_general(self, index: int, t, sid: int) -> None:
        # an inner module recorded this tensor's forward without a gradient hook
        t.grad_fn.register_prehook(GradHook(self, index, "grad_output", 0, sid, t.output_nr))
        entry = self._seen[id(t)]
        self._seen[id(t)] = (entry[0], True, True)

    def _on_grad(self, hook: GradHook, grad) -> None:
        if self._removed or grad is None:
            return
        if _is_compiling():  # compiled autograd traces this hook of an eager forward
            traced.record_output_grad(self, hook.index, hook.role, hook.call, hook.sid, grad)
            return
        self._cur.backward = True
        if type(grad) not in PLAIN:  # a subclass: one row per inner tensor
            self._record(grad, hook.index, self._names[hook.index], "backward", hook.role,
                         hook.call, hook.sid)
            return
        site = hook.site
        if site is None or site.device != grad.device or site.dtype != grad.dtype:
            reason = unsupported(grad)
            if reason is not None:
                self._skip(reason)
                return
            grad = local_tensor(grad)
            site = hook.site = self._site(hook.index, self._names[hook.index], "backward",
                                          hook.role, hook.call, grad.device, grad.dtype)
            if hook.role == "grad_output":
                # the next steps' hooks start with it
                _cache(self._bwd_cache[hook.index], hook.call, site)
                if self._fast is not None:
                    fastpath.prime_backward(self, hook.index, hook.call, site)
            elif hook.part >= 0 and self._fast is not None:  # an item of a tuple output
                fastpath.prime_backward(self, hook.index, hook.call, site, hook.part)
        self._record_ok(grad, 0, "", "", "", 0, hook.sid, site)

    def _grad_fallback(self, index: int, call: int, part: int, sid: int,
                       grad: torch.Tensor) -> None:
        """A gradient the C++ hook of a fast-path output (item ``part`` of a tuple, -1: a
        single tensor) does not record itself (a new dtype or device, a subclass): the
        Python path, as if its hook had been ours."""
        if part < 0:
            hook = GradHook(self, index, "grad_output", call, sid, 0,
                             _cached(self._bwd_cache[index], call))
        else:
            hook = GradHook(self, index, f"grad_output[{part}]", call, sid, part=part)
        self._on_grad(hook, grad)

    def _on_param_grad(self, pindex: int, param) -> None:
        if self._removed:
            return
        if _is_compiling():  # compiled autograd traces this hook
            traced.record_param_grad(self, pindex, param)
            return
        if not self._cur.active:
            return
        self._cur.backward = True
        if self.config.sync and self._rec.has_compiled:
            self._check_compiled_now(("input", "forward", "backward", "grad"))
        if self.config.sync or self._dist is not None:
            # distributed: record now, before DDP's reducer (its hook runs after this
            # one) all-reduces the gradient in place in a bucket view
            module = self._param_records.sites[pindex][0]
            if param.grad is not None:
                self._record(param.grad, module, self._names[module], "grad",
                             self._param_records.grad_roles[pindex], 0, self._mod_stack[module])
            return
        self._grad_queue[pindex] = None
        if not self._callback_queued:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._flush_grads)
                self._callback_queued = True
            except RuntimeError:
                self._flush_grads()

    def _set_param_hook_mode(self) -> None:
        # the C++ hooks only note a gradient when all the Python hook would do is queue it
        if self._param_hooks is not None:
            self._param_hooks.set_queue(self._cur.active and not self.config.sync and
                                        self._dist is None)

    def _flush_param_grads(self, pindexes: List[int]) -> None:
        """The C++ hooks' end of a backward: parameters ``pindexes`` have new gradients."""
        if self._removed:
            return
        self._cur.backward = True
        self._record_param_batch("grad", pindexes, None)

    def _flush_pending_grads(self) -> None:
        """Parameter gradients not recorded yet: the Python hooks' queue (its callback did
        not run) and the C++ hooks' notes of a backward that failed before its end."""
        if self._grad_queue:
            self._flush_grads()
        if self._param_hooks is not None:
            left = self._param_hooks.take_pending()
            if left:
                self._flush_param_grads(left)

    def _flush_grads(self) -> None:
        """Record the queued parameter gradients: one multi-tensor op per device."""
        self._callback_queued = False
        if not self._removed and self._grad_queue:
            self._record_param_batch("grad", list(self._grad_queue), None)
        self._grad_queue.clear()

    def _record_param_batch(self, phase: str, pindexes: List[int],
                            sid: Optional[int]) -> None:
        """Record parameters ``pindexes``' gradients (phase ``grad``) or values (``param``)
        into the open step (:class:`~healthmon.param_records.ParamRecords`)."""
        order = self._cur.order
        first = self._param_records.record(phase, pindexes, sid, order,
                                           planned=self._fast is not None)
        if self.config.sync:  # (async: no copy of the entries)
            for site, site_sid in order[first:]:
                self._check_now(site, site_sid)

    def _check_loss_target(self, loss: str, input: torch.Tensor, target: torch.Tensor,
                           num_classes: int, ignore_index: int,
                           role: str = "target") -> Optional[torch.Tensor]:
        """Label check of one class-index loss call (called by the loss guard).

        Sync mode and CPU targets: checked now; a bad label is reported at the call (raises
        with ``on_anomaly="raise"``; otherwise the loss gets a sanitised target). Async on an
        accelerator: the fused kernel writes the record and an int64 copy of the target
        with bad labels replaced by ``ignore_index`` (no device assert can fire, no host
        sync); the record is decoded at the step boundary.

        ``role``: ``"target"`` (losses) or ``labels.INDEX_ROLE`` (embedding indices).

        Returns:
            the target the loss should use instead, or None to keep the user's.
        """
        cur = self._cur
        if self._removed or not cur.active or target.device != input.device:
            return None  # a device mismatch is torch's error to raise, unchanged
        call = cur.label_calls.get(loss, 0)
        cur.label_calls[loss] = call + 1
        sid = self._stacks.capture(2)
        site = self._site(-1, loss, "label", role, call, target.device)
        meta = [tuple(ops.physical(target).shape), target.dtype, num_classes, ignore_index, False]
        cur.label_meta[site] = meta
        cur.order.append((site, sid))
        records = site.buffer.records
        # distributed: never raise on one rank alone (the others would hang in the next
        # collective); the record is agreed on at the step boundary like any other
        if self._dist is None and (self.config.sync or
                                   target.device.type in labels.SYNC_CHECK_DEVICES):
            record = ops.label_record(target, num_classes, ignore_index)
            ops.store_record(records, site.slot, record)  # also under torch.func transforms
            row = ops.physical(record).tolist()
            if not row[LABEL["bad"]]:
                return None
            meta[4] = True  # reported here, not again when the step is decoded
            stats = labels.LabelStats.from_record(
                row, *meta[:4], bad_values=labels.bad_values(target, num_classes, ignore_index,
                                                   start=row[LABEL["first_bad"]]))
            anomaly = labels.label_anomaly(stats, loss, self._stacks.frames(sid), cur.index,
                                           role=role)
            if self.config.sync and cur.anomaly is None:
                cur.anomaly = anomaly
            self._reporter.report(anomaly, True)
            return ops.label_sanitize(target, num_classes, ignore_index)[1]
        record, clean = ops.label_sanitize(target, num_classes, ignore_index)
        ops.store_record(records, site.slot, record)
        return clean

    def _record_loss(self, tensors: Sequence[torch.Tensor], sid: int) -> None:
        """Record the tensor(s) backward is about to run on (called by
        :mod:`healthmon.loss_site` before the original backward): site ``<loss>``, phase
        ``loss``, role ``value`` (``value[i]`` for several), call = n-th backward of the step.
        Same native op and buffer as every record; sync mode checks it here (a non-finite
        loss raises at the ``backward()`` line). Keeps no reference to the tensors."""
        cur = self._cur
        if self._removed or not cur.active:
            return
        call = cur.label_calls.get("<loss>", 0)  # per-step call counter, like the labels'
        cur.label_calls["<loss>"] = call + 1
        for i, t in enumerate(tensors):
            self._record(t.detach(), -1, "<loss>", "loss",
                         "value" if len(tensors) == 1 else f"value[{i}]", call, sid)

    def _record_params(self) -> None:
        """Phase ``param``: every watched parameter as the step ends (after the optimizer's
        update when the boundary is its step hook): one multi-tensor op per device.
        Diverging weights show here before they poison the next forward."""
        self._record_param_batch("param", list(range(len(self._param_records))),
                                 self._stacks.capture(2))

    def _optimizer_owns(self, optimizer) -> bool:
        groups = optimizer.param_groups
        cached = self._opt_cache.get(optimizer)
        if cached is None or cached[0] != len(groups):
            ids = self._param_records.ids
            ours = any(id(p) in ids for g in groups for p in g["params"])
            cached = self._opt_cache[optimizer] = (len(groups), ours)
        return cached[1]

    def _optimizer_pre_hook(self, optimizer, args, kwargs):
        """Before the update: on CPU the step's records so far (gradients included) are
        decoded now, so a bad gradient raises before it reaches the weights. With
        ``on_anomaly="skip"`` (any device: one host sync per step on an accelerator) a step
        with an anomaly gets no update: see :meth:`_skip_update`. A ``closure`` (Lightning,
        LBFGS: forward and backward run inside ``step()``) is wrapped so the check runs
        after it, still before the update."""
        if self._removed or not self._optimizer_owns(optimizer):
            return None
        closure = kwargs.get("closure", args[0] if args else None)
        if callable(closure):
            def checked_closure():
                result = closure()
                self._before_update(optimizer)
                return result
            if "closure" in kwargs:
                return args, dict(kwargs, closure=checked_closure)
            return (checked_closure,) + tuple(args[1:]), kwargs
        self._before_update(optimizer)
        return None

    def _check_compiled_now(self, phases) -> None:
        """Sync mode with compiled code: compiled records cannot be checked inside the
        graph, so they are checked at the next eager hook (the compiled root's own hooks,
        a parameter's gradient hook, the optimizer step), in execution order."""
        cur = self._cur
        checked = cur.compiled_checked
        todo = [s for s in self._rec.sites.values()
                if s.compiled and s.phase in phases and s not in checked]
        if not todo:
            return
        rows = {}
        for site in sorted(todo, key=execution_key):
            buf = site.buffer
            if buf not in rows:
                rows[buf] = buf.records[:, 0].tolist()
            if rows[buf][site.slot] < 0:
                continue  # not written in this step
            checked.add(site)
            self._check_now(site, site.sid)

    def _before_update(self, optimizer) -> None:
        if self._removed:
            return
        if self.config.sync and self._rec.has_compiled:
            self._check_compiled_now(tuple(PHASE_RANK))
        self._flush_pending_grads()
        cur = self._cur
        skip = self.config.on_anomaly == "skip"
        if (cur.order or self._rec.has_compiled) and (
                skip or self._pending is None and
                all(b.device.type == "cpu" for b in self._rec.buffers.values())):
            if self._pending is not None:
                self._decode_pending()  # the previous step first: host buffers are shared
            self._decode_partial(cur)
        if skip and self._dist is not None:
            self._skip_update_agreed(optimizer, cur)
        elif skip:
            self._skip_update(optimizer, cur)

    def _skip_update_agreed(self, optimizer, cur: Step) -> None:
        """``skip`` under torch.distributed: every rank judges its own records of the step
        so far (one host read; on an accelerator one sync) and one MAX all-reduce tells
        every rank whether some rank is bad, so all ranks skip the same updates (their
        weights stay identical). The anomaly itself is reported at the step boundary
        through the usual rank agreement."""
        self._rec.copy_to_host()
        self._rec.wait()
        hosts = self._rec.host_tensors()
        flagged = self._rec.flagged(hosts)
        order = merge_order(cur.order, self._rec.compiled_written(hosts)) \
            if self._rec.has_compiled else cur.order
        bad = 0
        for site, _ in order:
            if site.slot in flagged[site.buffer]:
                row = hosts[site.buffer][site.slot].tolist()
                if (row[1] if site.phase == "label" else decode.is_bad(site, row)):
                    bad = 1
                    break
        flag = torch.tensor([bad], dtype=torch.int64, device=self._dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                     group=self._dist.group)
        if not flag.item():
            self._skipper.healthy()
            return
        last = self.anomalies[-1] if self.anomalies else Anomaly(
            site="<step>", phase="grad", role="", step=cur.index, kind="nan", stats=None)
        self._skipper.skip(optimizer, cur.index, last, everywhere=True)

    def _skip_update(self, optimizer, cur: Step) -> None:
        """``on_anomaly="skip"``: a step holding an anomaly gets no update (see
        :class:`~healthmon.actions.UpdateSkipper`)."""
        if cur.anomaly is None:
            self._skipper.healthy()
        else:
            self._skipper.skip(optimizer, cur.index, cur.anomaly)

    def _optimizer_hook(self, optimizer, args, kwargs) -> None:
        if self._removed or not self._optimizer_owns(optimizer):
            return
        self._opt_stepped = True
        # a training step, even when its backward was compiled (no eager hook saw it): the
        # updated weights are recorded as the step ends
        self._cur.backward = True
        if not self._external_steps:
            self._end_step(force=True)

    # ----------------------------------------------------------------- step boundaries

    def step(self) -> None:
        """Explicit step boundary (optional: boundaries are found automatically)."""
        if not self._removed:
            self._end_step(force=True)

    def set_step(self, global_step: int) -> None:
        """Let a trainer number the steps (the Lightning / HF callbacks call this at the
        start of every training batch with the trainer's global step).

        From the first call on, root forwards and optimizer steps are no longer step
        boundaries: a call with a new number ends the current step (its records are decoded
        and the policy applied) and starts step ``global_step``; a call with the current
        number does nothing (gradient accumulation: micro-batches share one step).

        Raises:
            TypeError: ``global_step`` is not an int.
        """
        if isinstance(global_step, bool) or not isinstance(global_step, int):
            raise TypeError(f"healthmon: set_step expects an int, got "
                            f"{type(global_step).__name__}")
        if self._removed:
            return
        self._external_steps = True
        if global_step != self._cur.index:
            self._end_step(next_index=global_step, force=True)

    def check(self) -> List[Anomaly]:
        """Close the current step, wait for its records (synchronises) and apply the policy.

        Returns:
            the anomalies found since the previous ``check()``.
        Raises:
            HealthError: with ``on_anomaly="raise"``, for a new anomaly not raised yet.
        """
        if not self._removed:
            self._end_step()
            self._decode_pending()
            if self._dist is not None:
                self._dist.flush()  # the agreement still in flight (CUDA)
        new = self.anomalies[self._checked:]
        self._checked = len(self.anomalies)
        return new

    def _new_step(self, index: int) -> None:
        self.step_index = index
        self._cur = Step(index, index % self.config.every == 0)
        self._rec.set_active(self._cur.active)
        self._calls = [0] * len(self._modules)
        self._seen = {}
        if self._fast is not None:
            self._fast.begin_step(self._cur.order, self._calls, self._seen, self._cur,
                                  self._cur.active and not (self._rec.has_compiled and
                                                            self.config.sync))
        if self._param_hooks is not None:
            self._set_param_hook_mode()
            self._param_hooks.verify()  # a slot replaced by an assignment: wrapped again

    def _end_step(self, apply_policy: bool = True, next_index: Optional[int] = None,
                  force: bool = False) -> None:
        """End the current step. ``force``: a step ended for sure (an optimizer step,
        ``step()``, ``set_step()``), even when only compiled code (which leaves no trace on
        the host) recorded in it; otherwise a step with no eager activity is not a step."""
        cur = self._cur
        compiled = self._rec.has_compiled and force
        if compiled and cur.active and not (cur.forward or cur.backward or cur.order):
            # nothing eager in the step: did compiled code record? On the CPU the rows say
            # so without a copy (``mon.step()`` right after the optimizer's step ends
            # nothing, as in eager); an accelerator's rows are not read here (a sync), nor
            # those of a step the cadence skips (compiled code records nothing then)
            rows = self._rec.cpu_rows()
            compiled = rows is None or self._rec.any_compiled_written(rows)
        if not (cur.forward or cur.backward or cur.order or compiled):
            if next_index is not None:
                self._new_step(next_index)
            return
        self._flush_pending_grads()
        if cur.active and cur.backward and len(self._param_records):  # training steps only
            self._record_params()
        self._new_step(cur.index + 1 if next_index is None else next_index)
        if not cur.order and not compiled:
            return
        previous = self._pending
        self._pending = None
        if previous is not None:  # the host buffers are reused: decode first
            self._decode(previous, apply_policy)
        self._rec.copy_to_host()
        self._rec.start_step()
        self._pending = cur
        if all(b.device.type == "cpu" for b in self._rec.buffers.values()):
            self._decode_pending(apply_policy)

    def _decode_pending(self, apply_policy: bool = True) -> None:
        step, self._pending = self._pending, None
        if step is not None:
            self._decode(step, apply_policy)

    # ----------------------------------------------------------------- decode / actions

    def _release_on_raise(self) -> None:
        if self.remove_on_raise:  # a trainer callback: the error leaves the loop
            self._release()

    def _judge_context(self) -> decode.Context:
        return decode.Context(self._rec, self._modules, self.config.sync,
                              self._dist.rank if self._dist is not None else None)

    def _decode_partial(self, step: Step) -> None:
        """CPU, before the optimizer's update: judge the records of the open step so far
        and apply the policy now (a bad gradient raises before it reaches the weights).
        The step's final decode reports only what came after."""
        if self.config.sync or self._dist is not None or (
                step.decoded >= len(step.order) and not self._rec.has_compiled):
            return
        hosts = self._rec.cpu_rows()  # CPU: judged in place; the step's final decode copies
        if hosts is None:
            self._rec.copy_to_host()
            self._rec.wait()
            hosts = self._rec.host_tensors()
        judged = decode.judge(step, hosts, self._judge_context(), partial=True)
        if judged is not None and judged.first is not None:
            step.anomaly = judged.first  # later records of the step are its consequences
            step.partial_reported = True
            self._reporter.report(judged.first, True)

    def _decode(self, step: Step, apply_policy: bool) -> None:
        """The step boundary's host side: judge the step's rows (:func:`decode.judge`),
        keep them as the step's view (``records()``, the sinks, the next anomaly's "last
        healthy record"), run the early-warning rules, then agree (distributed) and apply
        the policy to the first anomaly."""
        self._rec.wait()
        hosts = self._rec.host_tensors()
        judged = decode.judge(step, hosts, self._judge_context())
        if judged is None:
            return  # nothing ran in this step
        first, view = judged
        # an accelerator's pinned host buffer is reused at the next boundary: keep a copy
        kept = {b: h if b.device.type == "cpu" else h.clone() for b, h in hosts.items()}
        self._rec.keep_healthy(kept)
        if view is None:  # healthy, with compiled records: ordered only if read
            eager, rec = step.order, self._rec
            memo = self._view_memo
            view = lambda: memo.merged(eager, rec.compiled_written(kept))  # noqa: E731
        self._last_rows = decode.LazyRows(view, kept)
        self._last_step = step.index
        if self.sinks:
            call_sinks(self.sinks, "write_step", step.index, decode.row_dicts(self._last_rows))
        rank = self._dist.rank if self._dist is not None else None
        if self._rules is not None and self._rules_cadence.due():
            # early warnings (none in a step with an anomaly), within their time budget
            t0 = time.perf_counter()
            # (the step's whole order for the sites' stacks: the judged order leaves out
            # what the healthy path never reads)
            alerts.issue(self._rules.evaluate_view(step.index, self._last_rows.sites(), kept),
                         step.order, step.index, self._stacks.frames, self.warnings,
                         self.sinks, rank, self._modules)
            self._rules_cadence.spent(time.perf_counter() - t0)
        if self._dist is not None and apply_policy:  # every rank takes the same branch
            self._dist.settle(step.index, first, reported=self.config.sync)
        elif first is not None and not self.config.sync and not step.partial_reported:
            self._reporter.report(first, apply_policy)

    def _check_now(self, site: Site, sid: int) -> None:
        """Sync mode: judge the record just written and report it if bad (raises here)."""
        row = site.buffer.records[site.slot].tolist()
        cur = self._cur
        if not decode.is_bad(site, row):
            site.last_healthy = row
            if site.phase == "backward":
                cur.prev_bwd = (site, sid)
            return
        anomaly = decode.make_anomaly(site, row, sid, cur.index,
                                      cur.prev_bwd if cur.anomaly is None else None,
                                      self._judge_context())
        if cur.anomaly is not None:
            cur.anomaly.consequences.append(anomaly)
            return
        cur.anomaly = anomaly
        if self._drill is not None:  # the exact op and line (a replay, first anomaly only)
            self._drill.explain(site, anomaly)
        self._reporter.report(anomaly, self._dist is None)  # distributed: at the boundary

    # ----------------------------------------------------------------- inspection

    @property
    def dropped_anomalies(self) -> int:
        """Anomalies not kept in ``anomalies`` (its length is bounded)."""
        return self._reporter.dropped

    def records(self) -> List[dict]:
        """Rows of the last decoded step, in execution order (see :mod:`healthmon.sinks`)."""
        return decode.row_dicts(self._last_rows)

    def summary(self, width: Optional[int] = None, limit: Optional[int] = None) -> str:
        """Per-site table of the last decoded step (worst first), plus skipped tensors."""
        if not self.config.enabled:
            return "healthmon is off (HEALTHMON=off): nothing recorded"
        head = f"healthmon: step {self._last_step}" if self._last_step is not None \
            else "healthmon: no step decoded yet (call mon.check())"
        text = head + "\n" + format_summary(self.records(), width=width, limit=limit)
        if self.warnings:
            text += "\n" + alerts.format_warnings(self.warnings)
        if self.skipped:
            text += "\nskipped (not recorded): " + "; ".join(
                f"{n} x {reason}" for reason, n in sorted(self.skipped.items()))
        return text

    @property
    def last_step(self) -> Optional[int]:
        """Step number of the rows ``records()`` returns (None before the first decode)."""
        return self._last_step

    @property
    def num_sites(self) -> int:
        return len(self._sites)

    def buffer_bytes(self) -> int:
        """Bytes of the device record buffers (bounded by the number of sites)."""
        return self._rec.nbytes()


def watch(model: nn.Module, *more_modules: nn.Module, every: Optional[int] = None,
          sync: Optional[bool] = None, on_anomaly: Optional[str] = None, log=None,
          allow_inf: Sequence[str] = (), sinks: Sequence = (),
          prefix: Optional[str] = None, warn=None) -> Monitor:
    """Watch ``model`` (and ``more_modules``, e.g. a loss module) for NaN / Inf.

    Args:
        model: the root module; its forward calls are step boundaries, its inputs are
            recorded as site ``<input>``.
        more_modules: further modules (their sites are prefixed with their class name).
        every: monitor one step in ``every`` (default ``HEALTHMON_EVERY`` or 1).
        sync: check inside each hook and raise there (default ``HEALTHMON=sync``).
        on_anomaly: ``"raise"`` (default), ``"warn"``, ``"log"`` or ``"skip"`` (a step
            with an anomaly does not update the weights; raises after
            ``HEALTHMON_MAX_SKIPS`` consecutive skips, default 3).
        log: path of a JSONL log (default ``HEALTHMON_LOG``).
        allow_inf: fnmatch patterns of sites (or ``site.role``) whose forward outputs /
            inputs may hold ±Inf (attention masks); NaN is never allowed.
        sinks: objects with ``write_step(step, rows)`` / ``write_anomaly(anomaly)`` /
            ``close()`` (see :mod:`healthmon.sinks`).
        prefix: prefix of ``model``'s site names (``"generator"`` gives
            ``generator.conv1``), to tell apart models watched by separate monitors.
        warn: early warnings (:mod:`healthmon.rules`): None/True (default thresholds),
            False (off), a ``healthmon.WarnConfig`` or a dict of its fields.
            ``HEALTHMON_WARN=off`` wins.
    Returns:
        the :class:`Monitor` (a context manager). With ``HEALTHMON=off`` it is inert: no
        hooks at all.
    Raises:
        TypeError: ``model`` or ``more_modules`` not ``nn.Module``.
        ValueError: invalid option or ``HEALTHMON*`` value.
        RuntimeError: a module is already watched by a live monitor.
        RankMismatchError: with torch.distributed initialised, the settings differ between
            ranks (raised on every rank; see :mod:`healthmon.distributed`).
    """
    for m in (model,) + more_modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"healthmon.watch expects torch.nn.Module objects, got "
                            f"{type(m).__name__}")
    config = resolve(every=every, sync=sync, on_anomaly=on_anomaly, log=log,
                     allow_inf=allow_inf)  # merged with HEALTHMON_ALLOW_INF
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"healthmon: prefix must be a str, got {type(prefix).__name__}")
    if warn is not None and not isinstance(warn, (bool, dict, _rules.WarnConfig)):
        raise TypeError(f"healthmon: warn must be True, False, None, a dict or a "
                        f"healthmon.WarnConfig, got {type(warn).__name__}")
    mon = Monitor((model,) + more_modules, config, allow_inf=config.allow_inf, sinks=sinks,
                  prefix=prefix or "", warn=warn)
    traced.register(mon)
    return mon
