"""The recorder: sites, their preallocated device buffers, and the steps' execution order.

A *site* is one place the monitor records, ``(module, phase, role, call, device)``. It gets
its row (slot) and its stack once, on its first call (eager) or when it is traced
(``torch.compile``); after that a hook does one native call with precomputed arguments.

Buffers: one float64 ``(capacity, NUM_STATS)`` tensor per device for forward-side records
(inputs, outputs, labels, parameters) and one for backward-side records (output gradients,
parameter gradients): a compiled graph that writes the same tensor in forward and in
backward fails autograd's version-counter check. Buffers are allocated outside
``inference_mode`` (so a first forward under ``inference_mode`` cannot make them inference
tensors), sized from the model before the first step, and grow only in eager code, never
while a graph is traced or captured: after warm-up their addresses stay fixed (CUDA graphs).

A :class:`Step` is the execution order of the eager records of one step (``(site, stack
id)`` pairs). Records written by compiled code have no per-step Python list (that would be
state Dynamo guards on): each buffer's ``numel`` column is set to -1 at every step
boundary, and a compiled site whose row holds ``numel >= 0`` was written in the step.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from . import ops
from ._layout import NUM_STATS
from .errors import Anomaly
from .stacks import StackTable

_KEYS = itertools.count()  # record-buffer keys, unique in the process
# sites whose dtype changed, process-wide: what judges a site by its dtype (the C++ rules
# engine) re-reads the dtypes when this moves, instead of comparing them every step
DTYPE_CHANGES = [0]


def _release_keys(registered: Dict[int, torch.Tensor]) -> None:
    from . import _C
    for key in list(registered):
        _C.clear_record_buffer(key)
    registered.clear()


# phases whose records go to the backward buffer
BACKWARD_PHASES = ("backward", "grad")
# execution-order rank of a phase inside one step (merging compiled rows into the order)
PHASE_RANK = {"input": 0, "forward": 1, "label": 2, "loss": 2, "backward": 3, "grad": 4,
              "param": 5}


class Site:
    """One recording place and its buffer row; ``last_healthy`` is its last good record.

    ``compiled``: created while ``torch.compile`` traced it (its records are found by the
    written marker, not by the step's order list); ``seq``: creation order, negated for a
    backward site created while its backward itself was traced (compiled autograd), whose
    creation order is already the execution order (see :func:`execution_key`)."""

    __slots__ = ("name", "phase", "role", "call", "module", "device", "slot", "allow_inf",
                 "last_healthy", "dtype", "buffer", "compiled", "seq", "sid")

    def __init__(self, name, phase, role, call, module, device, slot, allow_inf,
                 dtype=None, buffer=None, compiled=False, seq=0, sid=-1):
        self.name, self.phase, self.role, self.call = name, phase, role, call
        self.module, self.device, self.slot, self.allow_inf = module, device, slot, allow_inf
        self.dtype, self.buffer, self.compiled, self.seq, self.sid = \
            dtype, buffer, compiled, seq, sid
        self.last_healthy = None


class DeviceBuffer:
    """Record rows of one device and one side (forward / backward), and their host copy."""

    def __init__(self, device: torch.device, capacity: int = 64):
        self.device = device
        self.records = _zeros(capacity, device)
        self.used = 0
        self.host: Optional[torch.Tensor] = None
        self.event = None

    def new_slot(self) -> int:
        if self.used == self.records.shape[0]:
            if torch.compiler.is_compiling():
                # never reallocate inside a traced / captured region: the last row is
                # shared by the overflow sites (their records may mix; counted in skipped)
                return -1
            grown = _zeros(2 * self.used, self.device)
            grown[:self.used].copy_(self.records)
            self.records = grown
        self.used += 1
        return self.used - 1

    def mark_unwritten(self) -> None:
        """Set every row's ``numel`` to -1 (compiled sites: "not written this step")."""
        with torch.inference_mode(False), torch.no_grad():
            self.records[:self.used, 0].fill_(-1.0)

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


class _normal_tensors:
    """No autograd, no inference tensors: the monitor's own tensors stay usable whatever
    mode the user's code runs in."""

    def __enter__(self):
        self._modes = (torch.inference_mode(False), torch.no_grad())
        for m in self._modes:
            m.__enter__()

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)


def _zeros(rows: int, device) -> torch.Tensor:
    # a normal tensor even when the first site appears under inference_mode / no_grad
    with torch.inference_mode(False), torch.no_grad():
        return torch.zeros(rows, NUM_STATS, dtype=torch.float64, device=device)


SiteKey = Tuple[int, str, str, int, object]  # (module index, phase, role, call, device)


class Recorder:
    """Site table, buffers and stacks of one monitor.

    Args:
        capacity: rows preallocated per buffer (estimated from the model by the monitor).
        allow_inf: ``(name, phase, role) -> bool``: whether the site may hold ±Inf.
    """

    def __init__(self, capacity: int, allow_inf):
        self.capacity = max(16, int(capacity))
        self.sites: Dict[SiteKey, Site] = {}
        self.buffers: Dict[Tuple[torch.device, bool], DeviceBuffer] = {}
        self.stacks = StackTable()
        self.has_compiled = False
        self.overflow = 0
        # buffers that compiled code writes, registered natively under a process-wide key
        # (healthmon::record_to): the key is a constant of the graph, the buffer no argument
        self._registered: Dict[int, torch.Tensor] = {}  # key -> buffer tensor registered
        self._active = True  # compiled code records in the current step (set_active)
        self._previous: Dict[DeviceBuffer, torch.Tensor] = {}
        self.label_slots: Dict[DeviceBuffer, set] = {}
        self._traced_keys: Dict[int, int] = {}
        self._compiled_for = -1  # number of sites when the compiled order was cached
        self._compiled_order: List[Site] = []
        self._compiled_slots: Dict[DeviceBuffer, torch.Tensor] = {}
        self._allow_inf = allow_inf

    def buffer(self, device: torch.device, backward: bool) -> DeviceBuffer:
        buf = self.buffers.get((device, backward))
        if buf is None:
            buf = self.buffers[(device, backward)] = DeviceBuffer(device, self.capacity)
        return buf

    def site(self, module: int, name: str, phase: str, role: str, call: int,
             device: torch.device, dtype=None, compiled: bool = False, sid: int = -1,
             traced_in_backward: bool = False) -> Site:
        """The site of these coordinates, created (slot allocated) on first use.
        ``traced_in_backward``: a compiled site traced from the backward pass (compiled
        autograd), not from the forward."""
        key = (module, phase, role, call, device)
        site = self.sites.get(key)
        if site is None:
            buf = self.buffer(device, phase in BACKWARD_PHASES)
            slot = buf.new_slot()
            if slot < 0:
                self.overflow += 1
                slot = buf.records.shape[0] - 1
            site = self.sites[key] = Site(
                name, phase, role, call, module, device, slot,
                self._allow_inf(name, phase, role), dtype, buf, compiled,
                -len(self.sites) if traced_in_backward else len(self.sites), sid)
            if phase == "label":
                self.label_slots.setdefault(buf, set()).add(slot)
            self.has_compiled = self.has_compiled or compiled
        elif dtype is not None and site.dtype != dtype:
            # the module runs in another precision now (model.half(), an evaluation loop
            # without autocast): the rules judge the latest, the caches key on it
            site.dtype = dtype
            DTYPE_CHANGES[0] += 1
        return site

    def tensor_key(self, buf: DeviceBuffer) -> int:
        """The process-wide key ``buf`` is registered under for ``healthmon::record_to``
        (registered on first use; released by :meth:`release` or when the recorder dies)."""
        key = self._traced_keys.get(id(buf))
        if key is None:
            key = self._traced_keys[id(buf)] = next(_KEYS)
            if not self._registered:
                weakref.finalize(self, _release_keys, self._registered)
            self._register(key, buf.records)
        return key

    def _register(self, key: int, records: torch.Tensor) -> None:
        from . import _C
        _C.set_record_buffer(key, records)
        _C.set_record_active(key, self._active)
        self._registered[key] = records

    def sync_traced(self) -> None:
        """Re-register the buffers compiled code writes (after eager growth)."""
        for buf in self.buffers.values():
            key = self._traced_keys.get(id(buf))
            if key is not None and self._registered.get(key) is not buf.records:
                self._register(key, buf.records)

    def set_active(self, active: bool) -> None:
        """Whether compiled code records in this step (the cadence, as a native flag the
        record op reads: the graph stays the same every step)."""
        if self._registered and active != self._active:
            from . import _C
            for key in self._registered:
                _C.set_record_active(key, active)
        self._active = active

    def release(self) -> None:
        """Unregister the buffers: graphs traced while watched drop their records from now."""
        _release_keys(self._registered)

    def start_step(self) -> None:
        """Step boundary, after the host copy: mark compiled rows as not written."""
        if self.has_compiled:
            self.sync_traced()
            for buf in self.buffers.values():
                buf.mark_unwritten()
            from . import _C
            for key in self._registered:  # record_to's next write of a row overwrites it
                _C.begin_record_step(key)

    def copy_to_host(self) -> None:
        with _normal_tensors():  # a boundary reached inside inference_mode
            for buf in self.buffers.values():
                buf.copy_to_host()

    def wait(self) -> None:
        for buf in self.buffers.values():
            buf.wait()

    def cpu_rows(self) -> Optional[Dict[DeviceBuffer, torch.Tensor]]:
        """The rows written so far, read in place (no copy), when every buffer is on the
        CPU (``(used, NUM_STATS)`` views, valid until the next record); else None."""
        if not all(b.device.type == "cpu" for b in self.buffers.values()):
            return None
        return {b: b.records[:b.used] for b in self.buffers.values()}

    def host_tensors(self) -> Dict[DeviceBuffer, torch.Tensor]:
        """Host copies ``(used, NUM_STATS)`` per buffer (after :meth:`wait`)."""
        return {b: b.host[:b.used] for b in self.buffers.values() if b.host is not None}

    def flagged(self, hosts: Dict[DeviceBuffer, torch.Tensor]) -> Dict[DeviceBuffer, set]:
        """Per buffer, the slots whose record has a nonzero NaN / ±Inf count (columns 1-3)
        or, for a label record, a nonzero bad-label count (column 1): one native scan per
        buffer, so a healthy step costs no Python per row."""
        out = {}
        for buf, h in hosts.items():
            h = ops.physical(h)  # (a boundary inside a torch.func transform)
            rows = ops.flagged_rows(h)  # one native scan; a healthy buffer: none
            labels = self.label_slots.get(buf)
            # a label record's columns 2-3 are not counts of Inf: only its column 1 flags it
            out[buf] = set(rows) if not labels else \
                {s for s in rows if s not in labels or h[s, 1].item() != 0}
        return out

    def keep_healthy(self, hosts: Dict[DeviceBuffer, torch.Tensor]) -> None:
        """Keep the decoded step's host rows: the "last healthy record" of a site that goes
        bad in a later step is its row there (eager rows keep a site's last record)."""
        self._previous = hosts

    def last_healthy(self, site: Site) -> Optional[list]:
        """The site's record in the previously decoded step when it was healthy there
        (None otherwise); sync mode keeps it on the site."""
        if site.last_healthy is not None:
            return site.last_healthy
        h = self._previous.get(site.buffer)
        if h is None or site.slot >= h.shape[0]:
            return None
        row = h[site.slot].tolist()
        if row[0] < 0 or row[1] or row[2] or row[3]:
            return None
        return row

    def _compiled_sites(self) -> List[Site]:
        """Compiled sites in execution order: forward-side sites in trace order,
        backward-side sites in reverse trace order (autograd runs the graph backwards).
        Cached until a site is added."""
        if self._compiled_for != len(self.sites):
            sites = sorted((s for s in self.sites.values() if s.compiled), key=execution_key)
            self._compiled_order = sites
            self._compiled_slots = {
                buf: torch.tensor([s.slot for s in sites if s.buffer is buf], dtype=torch.long)
                for buf in self.buffers.values()}
            self._compiled_for = len(self.sites)
        return self._compiled_order

    def compiled_written(self, hosts: Dict[DeviceBuffer, torch.Tensor]) -> List[Site]:
        """Compiled sites written in the decoded step, in execution order."""
        sites = self._compiled_sites()
        numel = {b: h[:, 0].tolist() for b, h in hosts.items()}
        return [s for s in sites if s.buffer in numel and numel[s.buffer][s.slot] >= 0]

    def any_compiled_written(self, hosts: Dict[DeviceBuffer, torch.Tensor]) -> bool:
        """Whether compiled code wrote any row in the decoded step (one vectorised test
        per buffer)."""
        self._compiled_sites()
        for buf, slots in self._compiled_slots.items():
            h = hosts.get(buf)
            if h is not None and slots.numel() and bool((h[slots, 0] >= 0).any()):
                return True
        return False

    def nbytes(self) -> int:
        return sum(b.records.numel() * b.records.element_size() for b in self.buffers.values())


def execution_key(site: Site) -> Tuple[int, int]:
    """Sort key of compiled sites in execution order: by phase, then forward-side sites in
    trace order and backward-side sites in reverse trace order (autograd runs the graph
    backwards; a site traced from the backward itself has a negated ``seq``)."""
    return (PHASE_RANK.get(site.phase, 9),
            -site.seq if site.phase in BACKWARD_PHASES else site.seq)


def merge_order(eager: List[Tuple[Site, int]], compiled: List[Site]) -> List[Tuple[Site, int]]:
    """The step's execution order: eager records as they ran, each compiled record (in
    :func:`execution_key` order) placed after the last eager record of its phase or an
    earlier one (compiled forward rows after the eager inputs, before the eager labels,
    loss and backward rows; compiled gradients after the eager gradients of the graph's
    outputs, before the eager parameter records), and compiled forward rows before the
    last eager forward record (the compiled root's own hooks run after its compiled body).
    A graph run several times in a step has one merged row per site, so it stands with its
    last run: every run's eager inputs come before it."""
    if not compiled:
        return eager
    ranks = [PHASE_RANK.get(site.phase, 9) for site, _ in eager]
    forward = PHASE_RANK["forward"]
    last_forward = max((k for k, r in enumerate(ranks) if r == forward), default=-1)
    last_upto: Dict[int, int] = {}  # rank -> index of the last eager record of rank <= it

    def position(rank: int) -> int:
        if rank == forward and last_forward >= 0:
            return last_forward
        if rank not in last_upto:
            last_upto[rank] = max((k for k, r in enumerate(ranks) if r <= rank), default=-1)
        return last_upto[rank] + 1

    places = sorted(((position(PHASE_RANK.get(s.phase, 9)), n) for n, s in
                     enumerate(compiled)))
    out: List[Tuple[Site, int]] = []
    i = 0
    for k, item in enumerate(eager):
        while i < len(places) and places[i][0] <= k:
            site = compiled[places[i][1]]
            out.append((site, site.sid))
            i += 1
        out.append(item)
    out.extend((compiled[n], compiled[n].sid) for _, n in places[i:])
    return out


class Step:
    """Records of one training step in execution order, plus sync-mode and label state."""

    __slots__ = ("index", "active", "order", "forward", "backward", "anomaly", "prev_bwd",
                 "label_calls", "label_meta", "decoded", "partial_reported", "train", "forwards",
                 "compiled_checked",
                 "compiled_decoded")

    def __init__(self, index: int, active: bool):
        self.index, self.active = index, active
        self.order: List[Tuple[Site, int]] = []  # (site, stack id) in execution order
        self.forward = False   # a root forward ran in this step
        self.train = False     # ... with grad enabled (evaluation forwards are not steps)
        self.forwards = 0      # root forwards in this segment
        self.backward = False  # a gradient arrived in this step
        self.anomaly: Optional[Anomaly] = None  # sync mode: first anomaly of the step
        self.prev_bwd = None   # sync mode: last healthy backward record (site, stack id)
        self.label_calls: Dict[str, int] = {}  # loss name -> calls so far
        self.label_meta: Dict[Site, list] = {}  # [shape, dtype, classes, ignore, reported]
        self.decoded = 0  # records of ``order`` already decoded (before the update, on CPU)
        self.partial_reported = False  # ``anomaly`` was reported by that early decode
        self.compiled_decoded = False  # the early decode judged the compiled rows too
        self.compiled_checked: set = set()  # sync mode: compiled sites checked this step
