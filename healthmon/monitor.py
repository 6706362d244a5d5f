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
import itertools
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import distributed as _distributed
from . import labels, loss_site, ops
from . import rules as _rules
from ._layout import LABEL, NUM_LABEL
from .config import Config, resolve
from .errors import Anomaly
from .hooks import local_tensor, unsupported, walk
from .decode import Decoder
from .records import DeviceBuffer, Site, Step
from .stacks import StackTable

_WATCHED: "weakref.WeakKeyDictionary[nn.Module, Monitor]" = weakref.WeakKeyDictionary()


_FORWARD_TICKS = itertools.count(1)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() >= 0


class Monitor(Decoder):
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
        self._rules = _rules.Rules(cfg) if cfg is not None else None
        self.prefix = prefix
        self._forward_tick = 0
        self.auto = False  # created by healthmon run / watch_all: yields to explicit watch()
        self.anomalies: List[Anomaly] = []
        self.dropped_anomalies = 0
        self.skipped: Dict[str, int] = {}
        self.sinks = list(sinks)
        self.step_index = 0
        self._allow_inf = tuple(allow_inf)
        self._removed = not config.enabled
        self._handles: list = []
        self._modules: List[nn.Module] = []
        self._names: List[str] = []
        self._params: List[nn.Parameter] = []
        self._param_sites: List[Tuple[int, str]] = []  # (module index, parameter name)
        self._grad_roles: List[str] = []  # role of each parameter's ``grad`` records
        self._param_ids: set = set()
        self._sites: Dict[tuple, Site] = {}
        self._bufs: Dict[torch.device, DeviceBuffer] = {}
        self._stacks = StackTable()
        self._mod_stack: List[int] = []
        self._calls: List[int] = []
        self._seen: Dict[int, tuple] = {}  # id(tensor) -> (weakref, recorded fwd, hooked bwd)
        self._grad_queue: Dict[int, None] = {}
        self._callback_queued = False
        self._pending: Optional[Step] = None
        self._last_rows: List[Tuple[Site, list]] = []
        self._last_step: Optional[int] = None
        self._checked = 0
        self._opt_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._cur = Step(0, True)
        self._external_steps = False  # set_step() called: a trainer numbers the steps
        self._dist = None  # distributed.RankAgreement when torch.distributed is initialised
        _distributed.agree_settings(config)  # a collective on every rank, also when off
        if not config.enabled:
            return
        if config.log:
            self.sinks.append(_distributed.jsonl_sink(config.log))  # one file per rank
        self._attach(roots)
        self._dist = _distributed.attach(self)

    # ----------------------------------------------------------------- setup / teardown

    def _attach(self, roots: Sequence[nn.Module]) -> None:
        try:
            self._handles.append(roots[0].register_forward_pre_hook(
                self._root_pre_hook, with_kwargs=True))
            for r, root in enumerate(roots):
                self._add_modules(root, self.prefix if r == 0 else type(root).__name__)
            from torch.optim.optimizer import register_optimizer_step_post_hook
            self._handles.append(register_optimizer_step_post_hook(self._optimizer_hook))
        except Exception:
            self._detach()
            raise
        labels.install_loss_guard(self)
        loss_site.install(self)

    def _add_modules(self, root: nn.Module, prefix: str) -> None:
        """Hook ``root`` and its submodules not hooked yet (site names ``prefix.qualname``)."""
        new = []
        known = {id(m) for m in self._modules}
        for qual, mod in _distributed.named_modules(root):  # without wrapper prefixes
            if id(mod) in known:
                continue
            owner = _WATCHED.get(mod)
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
        for i in range(first, len(self._modules)):
            mod = self._modules[i]
            self._handles.append(mod.register_forward_hook(self._make_forward_hook(i)))
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in self._param_ids or not p.requires_grad:
                    continue
                self._param_ids.add(id(p))
                self._params.append(p)
                self._param_sites.append((i, pname))
                self._grad_roles.append(pname)
                self._handles.append(p.register_post_accumulate_grad_hook(
                    self._make_param_hook(len(self._params) - 1)))
            _WATCHED[mod] = self

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
        loss_site.uninstall(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod in self._modules:
            if _WATCHED.get(mod) is self:
                del _WATCHED[mod]

    def remove(self) -> None:
        """Remove every hook; the modules are left exactly as before. Records not yet
        decoded are decoded (anomalies added to ``anomalies``, never raised). Idempotent."""
        if self._removed:
            return
        try:
            self._end_step(apply_policy=False)
            self._decode_pending(apply_policy=False)
        finally:
            self._removed = True
            self._detach()
            self._seen.clear()
            self._grad_queue.clear()
            for sink in self.sinks:
                sink.close()

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
                f"{len(self._params)} parameters, {len(self._sites)} sites, "
                f"step {self.step_index}, {len(self.anomalies)} anomalies>")

    # ----------------------------------------------------------------- recording

    def _site(self, module: int, name: str, phase: str, role: str, call: int,
              device: torch.device, dtype: Optional[torch.dtype] = None) -> Site:
        key = (module, name, phase, role, call, device)
        site = self._sites.get(key)
        if site is None:
            buf = self._bufs.get(device)
            if buf is None:
                buf = self._bufs[device] = DeviceBuffer(device)
            allow = phase in ("forward", "input") and any(
                fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(f"{name}.{role}", pat)
                for pat in self._allow_inf)
            site = self._sites[key] = Site(name, phase, role, call, module, device,
                                            buf.new_slot(), allow, dtype)
        return site

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _record(self, t: torch.Tensor, module: int, name: str, phase: str, role: str,
                call: int, sid: int) -> None:
        reason = unsupported(t)
        if reason is not None:
            self._skip(reason)
            return
        self._record_ok(t, module, name, phase, role, call, sid)

    def _record_ok(self, t: torch.Tensor, module: int, name: str, phase: str, role: str,
                   call: int, sid: int) -> None:
        t = local_tensor(t)  # a DTensor's local shard (no communication)
        site = self._site(module, name, phase, role, call, t.device, t.dtype)
        ops.stats_into(t, self._bufs[t.device].records, site.slot)
        self._cur.order.append((site, sid))
        if self.config.sync:
            self._check_now(site, sid)

    def _root_pre_hook(self, module, args, kwargs=None):
        # kwargs=None: torch calls a hook removed during its module's call without them
        if self._removed or _in_backward():
            return None
        if self._dist is None and _distributed.initialized():  # initialised after watch()
            self._dist = _distributed.attach(self, agree=True)
        cur = self._cur
        if not self._external_steps and (cur.forward or cur.backward or cur.order):
            self._end_step()
            cur = self._cur
        cur.forward = True
        self._forward_tick = next(_FORWARD_TICKS)  # which model's step a loss belongs to
        if cur.active:
            sid = self._stacks.capture(1)
            for role, t in walk(args, "input"):
                self._record(t, -1, "<input>", "input", role, 0, sid)
            if kwargs:
                for role, t in walk(kwargs, "input"):
                    self._record(t, -1, "<input>", "input", role, 0, sid)
        return None

    def _make_forward_hook(self, index: int):
        def forward_hook(module, args, output):
            if self._removed or not self._cur.active:
                return None
            self._on_forward(index, output)
            return None
        return forward_hook

    def _on_forward(self, index: int, output) -> None:
        recompute = _in_backward()  # activation checkpointing re-runs forward in backward
        if recompute and self._calls[index]:
            # attribute to the original (last) call: its site and its forward stack
            call, sid = self._calls[index] - 1, self._mod_stack[index]
        else:
            call = self._calls[index]
            self._calls[index] = call + 1
            sid = self._stacks.capture(2)
            self._mod_stack[index] = sid
        name = self._names[index]
        grad_on = torch.is_grad_enabled()
        seen = self._seen
        for role, t in walk(output, "output"):
            entry = seen.get(id(t))
            if entry is not None and entry[0]() is not t:
                entry = None
            fwd_done = entry is not None and entry[1]
            bwd_done = entry is not None and entry[2]
            want_bwd = grad_on and t.requires_grad and not bwd_done
            if not fwd_done and not recompute or want_bwd:
                reason = unsupported(t)
                if reason is not None:
                    self._skip(reason)
                    continue
            if not fwd_done and not recompute:
                self._record_ok(t, index, name, "forward", role, call, sid)
            if want_bwd:
                t.register_hook(self._make_grad_hook(index, "grad_" + role, call, sid))
            if entry is None:
                seen[id(t)] = (weakref.ref(t), True, want_bwd)
            elif want_bwd or not fwd_done:
                seen[id(t)] = (entry[0], True, bwd_done or want_bwd)

    def _make_grad_hook(self, index: int, role: str, call: int, sid: int):
        def grad_hook(grad):
            if self._removed or grad is None:
                return None
            self._cur.backward = True
            self._record(grad, index, self._names[index], "backward", role, call, sid)
            return None
        return grad_hook

    def _make_param_hook(self, pindex: int):
        def param_hook(param):
            if self._removed or not self._cur.active:
                return None
            self._cur.backward = True
            if self.config.sync or self._dist is not None:
                # distributed: record now, before DDP's reducer (its hook runs after this
                # one) all-reduces the gradient in place in a bucket view
                module = self._param_sites[pindex][0]
                if param.grad is not None:
                    self._record(param.grad, module, self._names[module], "grad",
                                 self._grad_roles[pindex], 0, self._mod_stack[module])
                return None
            self._grad_queue[pindex] = None
            if not self._callback_queued:
                try:
                    torch.autograd.Variable._execution_engine.queue_callback(self._flush_grads)
                    self._callback_queued = True
                except RuntimeError:
                    self._flush_grads()
            return None
        return param_hook

    def _flush_grads(self) -> None:
        """Record the queued parameter gradients: one multi-tensor op per device."""
        self._callback_queued = False
        if not self._removed and self._grad_queue:
            self._record_param_tensors(
                "grad", ((i, self._params[i].grad) for i in self._grad_queue), None)
        self._grad_queue.clear()

    def _record_param_tensors(self, phase: str, items, sid: Optional[int]) -> None:
        """Record ``(parameter index, tensor)`` pairs (gradients or weights) as ``phase``
        sites with one multi-tensor op per device; ``sid`` None: the stack of each
        parameter's module forward call. DTensors (FSDP2) are recorded by their local shard."""
        groups: Dict[torch.device, Tuple[list, list]] = {}
        order = self._cur.order
        added = []
        for pindex, t in items:
            t = local_tensor(t)
            if t is None:
                continue
            reason = unsupported(t)
            if reason is not None:
                self._skip(reason)
                continue
            module, pname = self._param_sites[pindex]
            role = self._grad_roles[pindex] if phase == "grad" else pname
            site = self._site(module, self._names[module], phase, role, 0, t.device, t.dtype)
            xs, slots = groups.setdefault(t.device, ([], []))
            xs.append(t)
            slots.append(site.slot)
            added.append((site, self._mod_stack[module] if sid is None else sid))
        order.extend(added)
        for device, (xs, slots) in groups.items():
            ops.multi_stats_into(xs, self._bufs[device].records, slots)
        if self.config.sync:
            for site, site_sid in added:
                self._check_now(site, site_sid)

    def _check_loss_target(self, loss: str, input: torch.Tensor, target: torch.Tensor,
                           num_classes: int, ignore_index: int) -> Optional[torch.Tensor]:
        """Label check of one class-index loss call (called by the loss guard).

        Sync mode and CPU targets: checked now; a bad label is reported at the call (raises
        with ``on_anomaly="raise"``; otherwise the loss gets a sanitised target). Async on an
        accelerator: the fused kernel writes the record and an int64 copy of the target
        with bad labels replaced by ``ignore_index`` (no device assert can fire, no host
        sync); the record is decoded at the step boundary.

        Returns:
            the target the loss should use instead, or None to keep the user's.
        """
        cur = self._cur
        if self._removed or not cur.active or target.device != input.device:
            return None  # a device mismatch is torch's error to raise, unchanged
        call = cur.label_calls.get(loss, 0)
        cur.label_calls[loss] = call + 1
        sid = self._stacks.capture(2)
        site = self._site(-1, loss, "label", "target", call, target.device)
        meta = [tuple(target.shape), target.dtype, num_classes, ignore_index, False]
        cur.label_meta[site] = meta
        cur.order.append((site, sid))
        records = self._bufs[target.device].records
        # distributed: never raise on one rank alone (the others would hang in the next
        # collective); the record is agreed on at the step boundary like any other
        if self._dist is None and (self.config.sync or
                                   target.device.type in labels.SYNC_CHECK_DEVICES):
            record = ops.label_record(target, num_classes, ignore_index)
            records[site.slot, :NUM_LABEL].copy_(record)
            row = record.tolist()
            if not row[LABEL["bad"]]:
                return None
            meta[4] = True  # reported here, not again when the step is decoded
            stats = labels.LabelStats.from_record(
                row, *meta[:4], bad_values=labels.bad_values(target, num_classes, ignore_index,
                                                   start=row[LABEL["first_bad"]]))
            anomaly = labels.label_anomaly(stats, loss, self._stacks.frames(sid), cur.index)
            if self.config.sync and cur.anomaly is None:
                cur.anomaly = anomaly
            self._report(anomaly, True)
            return ops.label_sanitize(target, num_classes, ignore_index)[1]
        record, clean = ops.label_sanitize(target, num_classes, ignore_index)
        records[site.slot, :NUM_LABEL].copy_(record)
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
        self._record_param_tensors("param", ((i, p.detach()) for i, p in enumerate(self._params)),
                                   self._stacks.capture(2))

    def _optimizer_hook(self, optimizer, args, kwargs) -> None:
        if self._removed:
            return
        groups = optimizer.param_groups
        cached = self._opt_cache.get(optimizer)
        if cached is None or cached[0] != len(groups):
            ours = any(id(p) in self._param_ids for g in groups for p in g["params"])
            cached = self._opt_cache[optimizer] = (len(groups), ours)
        if cached[1] and not self._external_steps:
            self._end_step()

    # ----------------------------------------------------------------- step boundaries

    def step(self) -> None:
        """Explicit step boundary (optional: boundaries are found automatically)."""
        if not self._removed:
            self._end_step()

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
            self._end_step(next_index=global_step)

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

    def _end_step(self, apply_policy: bool = True, next_index: Optional[int] = None) -> None:
        cur = self._cur
        if not (cur.forward or cur.backward or cur.order):
            if next_index is not None:
                self.step_index = next_index
                self._cur = Step(next_index, next_index % self.config.every == 0)
            return
        if self._grad_queue:
            self._flush_grads()
        if cur.active and cur.backward and self._params:  # training steps only
            self._record_params()
        self.step_index = cur.index + 1 if next_index is None else next_index
        self._cur = Step(self.step_index, self.step_index % self.config.every == 0)
        self._calls = [0] * len(self._modules)
        self._seen = {}
        if not cur.order:
            return
        previous = self._pending
        self._pending = None
        if previous is not None:  # the host buffers are reused: decode first
            self._decode(previous, apply_policy)
        for buf in self._bufs.values():
            buf.copy_to_host()
        self._pending = cur
        if all(d.type == "cpu" for d in self._bufs):
            self._decode_pending(apply_policy)

    def _decode_pending(self, apply_policy: bool = True) -> None:
        step, self._pending = self._pending, None
        if step is not None:
            self._decode(step, apply_policy)

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
        on_anomaly: ``"raise"`` (default), ``"warn"`` or ``"log"``.
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
    if isinstance(allow_inf, str):
        allow_inf = (allow_inf,)
    config = resolve(every=every, sync=sync, on_anomaly=on_anomaly, log=log)
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"healthmon: prefix must be a str, got {type(prefix).__name__}")
    if warn is not None and not isinstance(warn, (bool, dict, _rules.WarnConfig)):
        raise TypeError(f"healthmon: warn must be True, False, None, a dict or a "
                        f"healthmon.WarnConfig, got {type(warn).__name__}")
    return Monitor((model,) + more_modules, config, allow_inf=allow_inf, sinks=sinks,
                   prefix=prefix or "", warn=warn)
