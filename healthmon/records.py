"""The monitor's record bookkeeping: sites, per-device record buffers, steps.

A *site* is one place the monitor records, ``(module, phase, role, call, device)``, with a
fixed row (slot) in its device's float64 record buffer; buffers grow only with the number of
sites, never with steps. A :class:`Step` is the execution order of the records of one
training step (``(site, stack id)`` pairs), decoded on the host at a step boundary.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ._layout import NUM_STATS
from .errors import Anomaly


class Site:
    """One recording place and its buffer row; ``last_healthy`` is its last good record."""

    __slots__ = ("name", "phase", "role", "call", "module", "device", "slot", "allow_inf",
                 "last_healthy", "dtype")

    def __init__(self, name, phase, role, call, module, device, slot, allow_inf, dtype=None):
        self.name, self.phase, self.role, self.call = name, phase, role, call
        self.module, self.device, self.slot, self.allow_inf = module, device, slot, allow_inf
        self.last_healthy = None
        self.dtype = dtype  # of the site's first tensor: overflow headroom (healthmon.rules)


class DeviceBuffer:
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


class Step:
    """Records of one training step in execution order, plus sync-mode and label state."""

    __slots__ = ("index", "active", "order", "forward", "backward", "anomaly", "prev_bwd",
                 "label_calls", "label_meta")

    def __init__(self, index: int, active: bool):
        self.index, self.active = index, active
        self.order: List[Tuple[Site, int]] = []  # (site, stack id) in execution order
        self.forward = False   # a root forward ran in this step
        self.backward = False  # a gradient arrived in this step
        self.anomaly: Optional[Anomaly] = None  # sync mode: first anomaly of the step
        self.prev_bwd = None   # sync mode: last healthy backward record (site, stack id)
        self.label_calls: Dict[str, int] = {}  # loss name -> calls so far
        self.label_meta: Dict[Site, list] = {}  # [shape, dtype, classes, ignore, reported]
