"""The watched parameters and their records: ``grad`` (each gradient after accumulation)
and ``param`` (each weight as a training step ends).

A batch of parameters is recorded with one multi-tensor op per record buffer. Sites are
looked up once per (parameter, phase) and cached with the tensor's dtype and device; once a
phase's batch repeats with plain tensors of the cached dtypes and devices, it goes through
a ``_C.ParamPlan`` (``csrc/param_plan.cpp``): one C++ call re-checks every tensor, records
them and appends the order entries, and falls back here on any difference (before any side
effect). When a batch is recorded (gradients queued during a backward, every weight at a
step's end) is the monitor's business; this module only records.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from torch import nn

from . import fastpath, ops
from .hooks import PLAIN, record_parts
from .records import Recorder


class ParamRecords:
    """The parameters one monitor watches, by index, and their batched records.

    ``params``: the parameters (the monitor holds no gradient); ``sites``: ``(module
    index, parameter name)`` of each; ``grad_roles``: the role of each one's ``grad``
    records (distributed runs rename a reduced shard's); ``names`` / ``mod_stack``: the
    monitor's module names and each module's last forward stack id (shared lists);
    ``skip(reason)``: count a tensor that cannot be recorded.
    """

    def __init__(self, recorder: Recorder, names: List[str], mod_stack: List[int],
                 skip: Callable[[str], None]):
        self.params: List[nn.Parameter] = []
        self.sites: List[Tuple[int, str]] = []
        self.grad_roles: List[str] = []
        self.ids: set = set()
        self._rec, self._names, self._mod_stack, self._skip = recorder, names, mod_stack, skip
        self._cache: Dict[str, dict] = {}  # phase -> parameter -> (site, dtype, device, module)
        self._plans: Dict[str, tuple] = {}  # phase -> (the last batch's plan, its buffers)

    def __len__(self) -> int:
        return len(self.params)

    def add(self, module: int, name: str, param: nn.Parameter) -> Optional[int]:
        """Watch ``param`` (attribute ``name`` of module ``module``); returns its index, or
        None when it is watched already or needs no gradient."""
        if id(param) in self.ids or not param.requires_grad:
            return None
        self.ids.add(id(param))
        self.params.append(param)
        self.sites.append((module, name))
        self.grad_roles.append(name)
        return len(self.params) - 1

    def record(self, phase: str, pindexes: List[int], sid: Optional[int], order: list,
               planned: bool) -> int:
        """Record parameters ``pindexes``' gradients (``phase="grad"``) or values
        (``"param"``), appending ``(site, stack id)`` entries to ``order`` (the step's
        execution order); ``sid`` None: each parameter's module forward stack. ``planned``:
        the C++ path may be used (a ``ParamPlan``; False with ``HEALTHMON_FASTPATH=0``).

        Returns:
            where in ``order`` its entries start (sync mode checks them).
        """
        first = len(order)
        plan = self._plans.get(phase)
        if plan is not None:
            if plan[0].record(pindexes, [b.records for b in plan[1]], order,
                              self._mod_stack, sid):
                return first
        params = self.params
        tensors = [params[i].grad for i in pindexes] if phase == "grad" else \
            [params[i] for i in pindexes]
        order.extend(self._record_tensors(phase, zip(pindexes, tensors), sid))
        self._plan(phase, pindexes, tensors, planned)
        return first

    def _plan(self, phase: str, pindexes: List[int], tensors: list, planned: bool) -> None:
        """A ``ParamPlan`` for ``phase`` when every tensor just recorded is a plain tensor
        whose site is cached."""
        cache = self._cache.get(phase, {})
        entries = [cache.get(i) for i in pindexes]
        if not planned or not all(
                e is not None and t is not None and type(t) in PLAIN and e[1] is t.dtype
                and e[2] == t.device for e, t in zip(entries, tensors)):
            self._plans.pop(phase, None)
            return
        buffers: Dict[object, int] = {}
        groups: Dict[int, Tuple[list, list]] = {}
        for pos, e in enumerate(entries):
            b = buffers.setdefault(e[0].buffer, len(buffers))
            positions, slots = groups.setdefault(b, ([], []))
            positions.append(pos)
            slots.append(e[0].slot)
        plan = fastpath.create_param_plan(
            self.params, phase == "grad", pindexes, tensors,
            [(b, positions, slots) for b, (positions, slots) in groups.items()],
            [e[0] for e in entries], [e[3] for e in entries])
        self._plans[phase] = (plan, list(buffers))

    def _record_tensors(self, phase: str, items, sid: Optional[int]) -> list:
        """Record ``(parameter index, tensor)`` pairs as ``phase`` sites with one
        multi-tensor op per buffer; returns their order entries. DTensors (FSDP2) are
        recorded by their local shard, other subclasses by their inner tensors."""
        cache = self._cache.setdefault(phase, {})
        groups: Dict[object, Tuple[list, list]] = {}
        added = []
        mod_stack = self._mod_stack
        for pindex, t in items:
            if t is None:
                continue
            entry = cache.get(pindex)
            if entry is not None and entry[1] is t.dtype and entry[2] == t.device \
                    and type(t) in PLAIN:
                site = entry[0]  # the hot path: a plain tensor seen before
                xs, slots = groups.setdefault(site.buffer, ([], []))
                xs.append(t)
                slots.append(site.slot)
                added.append((site, mod_stack[entry[3]] if sid is None else sid))
                continue
            module, pname = self.sites[pindex]
            role = self.grad_roles[pindex] if phase == "grad" else pname
            parts, reason = record_parts(t, role)  # DTensor shard; subclass inner tensors
            if reason is not None:
                self._skip(reason)
                continue
            for part_role, part in parts:
                site = self._rec.site(module, self._names[module], phase, part_role, 0,
                                      part.device, part.dtype)
                xs, slots = groups.setdefault(site.buffer, ([], []))
                xs.append(part)
                slots.append(site.slot)
                added.append((site, mod_stack[module] if sid is None else sid))
            if len(parts) == 1 and parts[0][1] is t:
                cache[pindex] = (site, t.dtype, t.device, module)
        for buf, (xs, slots) in groups.items():
            ops.multi_record_unchecked(xs, buf.records, slots)
        return added
