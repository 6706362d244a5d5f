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
import logging
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import distributed as _distributed
from . import labels, ops
from ._layout import LABEL, NUM_LABEL, NUM_STATS
from .config import Config, resolve
from .errors import Anomaly, HealthError
from .hooks import local_tensor, unsupported, walk
from .stacks import StackTable
from .stats import TensorStats

_log = logging.getLogger("healthmon")
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, Monitor]" = weakref.WeakKeyDictionary()
MAX_ANOMALIES = 1000


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() >= 0


class _Site:
    __slots__ = ("name", "phase", "role", "call", "module", "device", "slot", "allow_inf",
                 "last_healthy")

    def __init__(self, name, phase, role, call, module, device, slot, allow_inf):
        self.name, self.phase, self.role, self.call = name, phase, role, call
        self.module, self.device, self.slot, self.allow_inf = module, device, slot, allow_inf
        self.last_healthy = None


class _DeviceBuffer:
    """Record rows of one device, and their host copy."""

    def __init__(self, device: torch.device, capacity: int = 64):
        self.device = device
        self.records = torch.zeros(capacity, NUM_STATS, dtype=torch.float64, device=device)
        self.used = 0
        self.host: Optional[torch.Tensor] = None
        self.event = None

    def new_slot(self) -> int:
        if self.used == self.records.shape[0]:
            grown = torch.zeros(2 * self.used, NUM_STATS, dtype=torch.float64,
                                device=self.device)
            grown[:self.used].copy_(self.records)
            self.records = grown
        self.used += 1
        return self.used - 1

    def copy_to_host(self) -> None:
        n = self.used
        if self.device.type == "cpu":
            self.host = self.records[:n].clone()
            return
        if self.host is None or self.host.shape[0] < n:
            self.host = torch.empty(self.records.shape[0], NUM_STATS, dtype=torch.float64,
                                    pin_memory=True)
        self.host[:n].copy_(self.records[:n], non_blocking=True)
        self.event = torch.cuda.Event() if self.device.type == "cuda" else None
        if self.event is not None:
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class _Step:
    __slots__ = ("index", "active", "order", "forward", "backward", "anomaly", "prev_bwd",
                 "label_calls", "label_meta")

    def __init__(self, index: int, active: bool):
        self.index, self.active = index, active
        self.order: List[Tuple[_Site, int]] = []  # (site, stack id) in execution order
        self.forward = False   # a root forward ran in this step
        self.backward = False  # a gradient arrived in this step
        self.anomaly: Optional[Anomaly] = None  # sync mode: first anomaly of the step
        self.prev_bwd = None   # sync mode: last healthy backward record (site, stack id)
        self.label_calls: Dict[str, int] = {}  # loss name -> calls so far
        self.label_meta: Dict[_Site, list] = {}  # [shape, dtype, classes, ignore, reported]


class Monitor:
    """Watches modules' inputs, outputs, gradients and parameter gradients.

    Create it with :func:`watch`. Attributes: ``anomalies`` (list of Anomaly, oldest
    first), ``config`` (resolved options), ``step_index`` (current step), ``skipped``
    (reason -> count of tensors that could not be recorded).
    """

    def __init__(self, roots: Sequence[nn.Module], config: Config,
                 allow_inf: Sequence[str] = (), sinks: Sequence = (), prefix: str = ""):
        self.config = config
        self.prefix = prefix
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
        self._sites: Dict[tuple, _Site] = {}
        self._bufs: Dict[torch.device, _DeviceBuffer] = {}
        self._stacks = StackTable()
        self._mod_stack: List[int] = []
        self._calls: List[int] = []
        self._seen: Dict[int, tuple] = {}  # id(tensor) -> (weakref, recorded fwd, hooked bwd)
        self._grad_queue: Dict[int, None] = {}
        self._callback_queued = False
        self._pending: Optional[_Step] = None
        self._last_rows: List[Tuple[_Site, list]] = []
        self._last_step: Optional[int] = None
        self._checked = 0
        self._opt_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._cur = _Step(0, True)
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
              device: torch.device) -> _Site:
        key = (module, name, phase, role, call, device)
        site = self._sites.get(key)
        if site is None:
            buf = self._bufs.get(device)
            if buf is None:
                buf = self._bufs[device] = _DeviceBuffer(device)
            allow = phase in ("forward", "input") and any(
                fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(f"{name}.{role}", pat)
                for pat in self._allow_inf)
            site = self._sites[key] = _Site(name, phase, role, call, module, device,
                                            buf.new_slot(), allow)
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
        site = self._site(module, name, phase, role, call, t.device)
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
        if cur.forward or cur.backward or cur.order:
            self._end_step()
            cur = self._cur
        cur.forward = True
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
        if self._removed or not self._grad_queue:
            self._grad_queue.clear()
            return
        groups: Dict[torch.device, Tuple[list, list]] = {}
        for pindex in self._grad_queue:
            g = local_tensor(self._params[pindex].grad)
            if g is None:
                continue
            reason = unsupported(g)
            if reason is not None:
                self._skip(reason)
                continue
            module = self._param_sites[pindex][0]
            site = self._site(module, self._names[module], "grad", self._grad_roles[pindex], 0,
                              g.device)
            xs, slots = groups.setdefault(g.device, ([], []))
            xs.append(g)
            slots.append(site.slot)
            self._cur.order.append((site, self._mod_stack[module]))
        self._grad_queue.clear()
        for device, (xs, slots) in groups.items():
            ops.multi_stats_into(xs, self._bufs[device].records, slots)

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

    def _record_params(self) -> None:
        """Phase ``param``: every watched parameter as the step ends (after the optimizer's
        update when the boundary is its step hook): one multi-tensor op per device.
        Diverging weights show here before they poison the next forward."""
        sid = self._stacks.capture(2)
        groups: Dict[torch.device, Tuple[list, list]] = {}
        order = self._cur.order
        for pindex, p in enumerate(self._params):
            reason = unsupported(p)
            if reason is not None:
                self._skip(reason)
                continue
            module, pname = self._param_sites[pindex]
            site = self._site(module, self._names[module], "param", pname, 0, p.device)
            xs, slots = groups.setdefault(p.device, ([], []))
            xs.append(local_tensor(p.detach()))  # FSDP2: this rank's shard
            slots.append(site.slot)
            order.append((site, sid))
        for device, (xs, slots) in groups.items():
            ops.multi_stats_into(xs, self._bufs[device].records, slots)
        if self.config.sync:
            for site, site_sid in order[len(order) - sum(len(g[0]) for g in groups.values()):]:
                self._check_now(site, site_sid)

    def _optimizer_hook(self, optimizer, args, kwargs) -> None:
        if self._removed:
            return
        groups = optimizer.param_groups
        cached = self._opt_cache.get(optimizer)
        if cached is None or cached[0] != len(groups):
            ours = any(id(p) in self._param_ids for g in groups for p in g["params"])
            cached = self._opt_cache[optimizer] = (len(groups), ours)
        if cached[1]:
            self._end_step()

    # ----------------------------------------------------------------- step boundaries

    def step(self) -> None:
        """Explicit step boundary (optional: boundaries are found automatically)."""
        if not self._removed:
            self._end_step()

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

    def _end_step(self, apply_policy: bool = True) -> None:
        cur = self._cur
        if not (cur.forward or cur.backward or cur.order):
            return
        if self._grad_queue:
            self._flush_grads()
        if cur.active and cur.backward and self._params:  # training steps only
            self._record_params()
        self.step_index = cur.index + 1
        self._cur = _Step(self.step_index, self.step_index % self.config.every == 0)
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

    # ----------------------------------------------------------------- decoding / policy

    def _decode(self, step: _Step, apply_policy: bool) -> None:
        for buf in self._bufs.values():
            buf.wait()
        hosts = {d: b.host.tolist() for d, b in self._bufs.items() if b.host is not None}
        rows = []
        first: Optional[Anomaly] = step.anomaly
        prev_bwd = None
        for site, sid in step.order:
            row = hosts[site.device][site.slot]
            if site.phase == "label":
                meta = step.label_meta[site]
                if row[LABEL["bad"]] and not meta[4] and (not self.config.sync or
                                                          self._dist is not None):
                    stats = labels.LabelStats.from_record(row[:NUM_LABEL], *meta[:4])
                    anomaly = labels.label_anomaly(stats, site.name, self._stacks.frames(sid),
                                                   step.index)
                    if first is None:
                        first = anomaly
                    else:
                        first.consequences.append(anomaly)
                continue
            rows.append((site, row))
            bad = self._bad(site, row)
            if not bad:
                site.last_healthy = row
                if site.phase == "backward":
                    prev_bwd = (site, sid)
                continue
            if self.config.sync:
                continue  # already reported by its hook
            # consequences keep their own site: prev_bwd is the last *healthy* consumer, a
            # blame that only holds for the first bad gradient
            anomaly = self._anomaly(site, row, sid, step.index,
                                    prev_bwd if first is None else None)
            if first is None:
                first = anomaly
            else:
                first.consequences.append(anomaly)
        self._last_rows = rows
        self._last_step = step.index
        if self.sinks:
            dicts = self._row_dicts(rows)
            for sink in self.sinks:
                sink.write_step(step.index, dicts)
        if self._dist is not None and apply_policy:  # every rank takes the same branch
            self._dist.settle(step.index, first, reported=self.config.sync)
        elif first is not None and not self.config.sync:
            self._report(first, apply_policy)

    @staticmethod
    def _bad(site: _Site, row: list) -> Optional[str]:
        if row[1]:
            return "nan"
        if (row[2] or row[3]) and not site.allow_inf:
            return "inf"
        return None

    def _anomaly(self, site: _Site, row: list, sid: int, step: int, prev_bwd) -> Anomaly:
        name, role, stack_id, call = site.name, site.role, sid, site.call
        module = site.module
        if site.phase == "backward" and prev_bwd is not None and prev_bwd[0].module != site.module:
            consumer, consumer_sid = prev_bwd
            name, call, stack_id = consumer.name, consumer.call, consumer_sid
            module = consumer.module
            which = site.role[len("grad_"):] if site.role.startswith("grad_") else site.role
            role = f"grad_input (gradient of {site.name} {which})"
        last = site.last_healthy
        return Anomaly(site=name, phase=site.phase, role=role, step=step,
                       kind=self._bad(site, row), stats=TensorStats.from_record(row),
                       stack=self._stacks.frames(stack_id),
                       last_healthy=TensorStats.from_record(last) if last is not None else None,
                       call=call, rank=self._dist.rank if self._dist is not None else None,
                       module_type=type(self._modules[module]).__name__ if module >= 0 else "")

    def _check_now(self, site: _Site, sid: int) -> None:
        """Sync mode: read the record just written and report it if bad (raises here)."""
        row = self._bufs[site.device].records[site.slot].tolist()
        cur = self._cur
        if not self._bad(site, row):
            site.last_healthy = row
            if site.phase == "backward":
                cur.prev_bwd = (site, sid)
            return
        anomaly = self._anomaly(site, row, sid, cur.index,
                                cur.prev_bwd if cur.anomaly is None else None)
        if cur.anomaly is not None:
            cur.anomaly.consequences.append(anomaly)
            return
        cur.anomaly = anomaly
        self._report(anomaly, self._dist is None)  # distributed: raise at the boundary

    def _report(self, anomaly: Anomaly, apply_policy: bool) -> None:
        if len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append(anomaly)
        else:
            self.dropped_anomalies += 1
        for sink in self.sinks:
            sink.write_anomaly(anomaly)
        if not apply_policy:
            return
        mode = self.config.on_anomaly
        if mode == "raise":
            raise HealthError(anomaly)
        if mode == "warn":
            warnings.warn(anomaly.report(), RuntimeWarning, stacklevel=2)
        else:
            _log.error("%s", anomaly.report())

    # ----------------------------------------------------------------- inspection

    @staticmethod
    def _row_dicts(rows) -> List[dict]:
        out = []
        for order, (site, row) in enumerate(rows):
            d = {"site": site.name, "phase": site.phase, "role": site.role,
                 "call": site.call, "order": order}
            d.update(TensorStats.from_record(row).as_dict())
            out.append(d)
        return out

    def records(self) -> List[dict]:
        """Rows of the last decoded step, in execution order (see :mod:`healthmon.sinks`)."""
        return self._row_dicts(self._last_rows)

    def summary(self, width: Optional[int] = None, limit: Optional[int] = None) -> str:
        """Per-site table of the last decoded step (worst first), plus skipped tensors."""
        from .summary import format_summary
        if not self.config.enabled:
            return "healthmon is off (HEALTHMON=off): nothing recorded"
        head = f"healthmon: step {self._last_step}" if self._last_step is not None \
            else "healthmon: no step decoded yet (call mon.check())"
        text = head + "\n" + format_summary(self.records(), width=width, limit=limit)
        if self.skipped:
            text += "\nskipped (not recorded): " + "; ".join(
                f"{n} x {reason}" for reason, n in sorted(self.skipped.items()))
        return text

    @property
    def num_sites(self) -> int:
        return len(self._sites)

    def buffer_bytes(self) -> int:
        """Bytes of the device record buffers (bounded by the number of sites)."""
        return sum(b.records.numel() * b.records.element_size() for b in self._bufs.values())


def watch(model: nn.Module, *more_modules: nn.Module, every: Optional[int] = None,
          sync: Optional[bool] = None, on_anomaly: Optional[str] = None, log=None,
          allow_inf: Sequence[str] = (), sinks: Sequence = (),
          prefix: Optional[str] = None) -> Monitor:
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
    return Monitor((model,) + more_modules, config, allow_inf=allow_inf, sinks=sinks,
                   prefix=prefix or "")
