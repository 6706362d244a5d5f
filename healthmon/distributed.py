"""Rank-aware monitoring: with ``torch.distributed`` every rank stops at the same step.

A NaN on one rank of 64 must stop all 64 at the same step with one report saying which rank
saw it first, instead of leaving 63 ranks waiting in the next all-reduce. When the default
process group is initialised (at ``watch()`` or later, found at the next root forward):

* **Settings agree.** ``watch()`` runs one all-reduce (MIN of ``[v, -v]`` for ``enabled,
  sync, every, on_anomaly``) on every rank, also with ``HEALTHMON=off``; any difference
  raises :class:`RankMismatchError` on every rank, naming each rank's settings.
* **One collective per checked step.** After a step's records are decoded, every rank
  all-reduces (MIN) an int64 tensor of 3 elements ``[key, step, -step]`` where ``key`` is
  ``phase_order * world_size + rank`` of this rank's first anomaly (``HEALTHY`` when none).
  So every rank learns in one call whether some rank is bad, the first rank (earliest phase,
  then lowest rank) and that all ranks decoded the same step. Only when some rank is bad,
  ``all_gather_object`` exchanges each rank's first anomaly (site, stats, stack) so every
  rank raises the same :class:`DistributedHealthError` naming the first rank(s) and site.
  The flag tensor lives where the backend wants it: CPU for gloo (also ``cpu:gloo,cuda:nccl``),
  the current CUDA device for NCCL. On CUDA the all-reduce is enqueued after the decode
  (stream-ordered, no host wait) and its result copied to pinned memory with an event; it is
  read at the next boundary, which already waits for the device, so the agreement adds no
  host synchronisation and every rank raises one boundary later than on CPU.
* **Policy.** ``raise`` / ``warn`` / ``log`` are applied after the agreement, on every rank
  alike; a healthy rank appends the first rank's anomaly to ``mon.anomalies``, so
  ``mon.check()`` returns a non-empty list on every rank at the same call. In sync mode the
  hook checks the record (exact stack) but raising waits for the step boundary.
* **Parameter gradients** (phase ``grad``) are recorded inside their post-accumulate-grad
  hook: under DDP that hook runs before the reducer's own hook on the same gradient, so the
  record is this rank's *local* gradient, role ``weight [before all-reduce]``. (The
  end-of-backward flush used without distributed runs *before* DDP's ``finalize_backward``
  callback but after bucket all-reduces were launched: with ``gradient_as_bucket_view=True``
  it would read half-reduced buckets.) FSDP2 (``fully_shard``) calls the hook of the sharded
  DTensor parameter after its reduce-scatter: the record is the local shard
  (``to_local()``), role ``weight [shard, after reduce-scatter]``.
* **Names** are the original module names: the ``module`` of ``DistributedDataParallel`` /
  ``DataParallel`` and ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module`` /
  ``_orig_mod`` components are dropped.
* **Logs**: ``HEALTHMON_LOG=run.jsonl`` writes ``run.rank<R>.jsonl`` on rank R (rank from the
  process group, else ``RANK``); ``python -m healthmon report run.jsonl`` merges them.

Rules for users: every rank must run the same loop (same forwards, optimizer steps,
``mon.step()`` / ``mon.check()`` calls), as for any collective; a rank that decodes a
different step is reported (:class:`RankMismatchError`), not left hanging. Call ``watch()``
after ``init_process_group`` so the settings are compared there. ``remove()`` never
communicates (safe in ``finally`` blocks); ``check()`` and leaving a ``with`` block normally
do, on every rank.
"""
from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .errors import Anomaly, HealthError

PHASE_ORDER = {"input": 0, "label": 0, "forward": 1, "backward": 2, "grad": 3}
HEALTHY = 1 << 62  # flag key of a healthy rank (larger than any phase * world + rank)
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_SHOWN = 8  # ranks listed by name in a report line


class RankMismatchError(RuntimeError):
    """Ranks disagree on the monitor's settings or on the step they are checking.

    Raised on every rank (never a hang): settings differ at ``watch()``, or a rank ran a
    different number of steps / ``check()`` calls than the others.
    """


class DistributedHealthError(HealthError):
    """The :class:`HealthError` every rank raises when some rank saw an anomaly.

    Attributes:
        anomaly: the first rank's first anomaly (its ``rank`` says which rank).
        rank: this process's rank.
        first_ranks: ranks whose first anomaly is in the earliest phase (input < forward <
            backward < grad), lowest first; ``anomaly`` is the lowest one's.
        by_rank: ``{rank: first anomaly of that rank}`` for every rank that saw one.
        world_size: number of ranks.
    """

    def __init__(self, anomaly: Anomaly, message: str, rank: int, first_ranks: List[int],
                 by_rank: Dict[int, Anomaly], world_size: int):
        super().__init__(anomaly, message)
        self.rank, self.first_ranks, self.by_rank = rank, first_ranks, by_rank
        self.world_size = world_size


# --------------------------------------------------------------------------- discovery

def initialized() -> bool:
    """True when ``torch.distributed`` is available and its default group initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str) -> Optional[int]:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return None


def collective_device(group=None) -> torch.device:
    """Device of the flag tensors: CPU for gloo/mpi (a CPU collective never touches the
    GPU), else the current device of the accelerator (NCCL needs a current-CUDA tensor)."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if acc is not None:
        return torch.device(acc.type, torch.accelerator.current_device_index())
    return torch.device("cpu")


def jsonl_sink(path):
    """The monitor's own JSONL sink: ``run.rank<R>.jsonl`` with rank, world size, local
    rank and host in its header when distributed (rank from the process group, else the
    ``RANK`` launcher variable), else ``path`` itself."""
    from .sinks import JsonlSink, rank_path
    if initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    return JsonlSink(rank_path(path, rank), rank=rank, world_size=world,
                     local_rank=_env_int("LOCAL_RANK") if rank is not None else None)


def named_modules(root: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module]]:
    """``root.named_modules()`` with the original names: the ``module`` attribute of a
    DDP / DataParallel wrapper and the ``_fsdp_wrapped_module``,
    ``_checkpoint_wrapped_module`` and ``_orig_mod`` (torch.compile) components dropped.
    A wrapper and the module it wraps get the same name."""
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel
    wrappers = (DataParallel, DistributedDataParallel)
    by_name: Dict[str, torch.nn.Module] = {}
    for qual, mod in root.named_modules():
        by_name[qual] = mod
        parts = qual.split(".") if qual else []
        keep = [p for i, p in enumerate(parts)
                if p not in _WRAPPER_PARTS and not (
                    p == "module" and isinstance(by_name.get(".".join(parts[:i])), wrappers))]
        yield ".".join(keep), mod


def _grad_role(pname: str, param: torch.Tensor, fsdp_ids: set) -> str:
    from torch.distributed.tensor import DTensor
    if isinstance(param, DTensor):
        return f"{pname} [shard, after reduce-scatter]" if id(param) in fsdp_ids \
            else f"{pname} [local shard]"
    return f"{pname} [before all-reduce]"


# --------------------------------------------------------------------------- settings

def _settings(config) -> List[int]:
    from .config import ON_ANOMALY
    return [int(config.enabled), int(config.sync), int(config.every),
            ON_ANOMALY.index(config.on_anomaly)]


def _describe_settings(config) -> str:
    if not config.enabled:
        return "HEALTHMON=off"
    return (f"HEALTHMON={'sync' if config.sync else 'on'}, every={config.every}, "
            f"on_anomaly={config.on_anomaly}")


def _ranks_text(ranks: Sequence[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:_SHOWN])
    more = f" and {len(ranks) - _SHOWN} more" if len(ranks) > _SHOWN else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}{more}"


def agree_settings(config, group=None) -> None:
    """Check that every rank resolved the same settings; a no-op when not distributed.

    One all-reduce (MIN) of an int64 tensor ``[enabled, sync, every, on_anomaly, and their
    negatives]``: equal on every rank iff each minimum equals the negated maximum. A
    collective: every rank must call it (``watch()`` does, also with ``HEALTHMON=off``).

    Raises:
        RankMismatchError: on every rank, listing each rank's settings.
    """
    if not initialized():
        return
    dist = torch.distributed
    mine = _settings(config)
    t = torch.tensor(mine + [-v for v in mine], dtype=torch.int64,
                     device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    got = t.tolist()
    n = len(mine)
    if got[:n] == [-v for v in got[n:]]:
        return
    everyone: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, _describe_settings(config), group=group)
    groups: Dict[str, List[int]] = {}
    for r, text in enumerate(everyone):
        groups.setdefault(text, []).append(r)
    listed = "; ".join(f"{_ranks_text(rs)}: {text}" for text, rs in groups.items())
    raise RankMismatchError(
        f"healthmon: the monitor settings differ between ranks ({listed}). Every rank must "
        "stop at the same step, so HEALTHMON, HEALTHMON_EVERY, HEALTHMON_ON_ANOMALY and the "
        "watch() arguments sync / every / on_anomaly must be identical on all ranks: export "
        "the same values to every rank (e.g. in the launcher) and pass the same arguments.")


# --------------------------------------------------------------------------- anomalies

def _portable(a: Optional[Anomaly]) -> Optional[dict]:
    """A small picklable copy of an anomaly for ``all_gather_object`` (stack as tuples)."""
    if a is None:
        return None
    return {"site": a.site, "phase": a.phase, "role": a.role, "step": a.step, "kind": a.kind,
            "stats": a.stats, "last_healthy": a.last_healthy, "rank": a.rank, "call": a.call,
            "stack": [(f.filename, f.lineno, f.name, f.line) for f in a.stack],
            "consequences": [(c.site, c.phase, c.role, c.step, c.kind, c.stats, c.call)
                             for c in a.consequences[:20]]}


def _rebuild(d: dict) -> Anomaly:
    stack = [traceback.FrameSummary(f, n, name, lookup_line=False, line=line)
             for f, n, name, line in d["stack"]]
    cons = [Anomaly(site=s, phase=p, role=r, step=st, kind=k, stats=sts, rank=d["rank"],
                    call=c) for s, p, r, st, k, sts, c in d["consequences"]]
    return Anomaly(site=d["site"], phase=d["phase"], role=d["role"], step=d["step"],
                   kind=d["kind"], stats=d["stats"], stack=stack,
                   last_healthy=d["last_healthy"], rank=d["rank"], consequences=cons,
                   call=d["call"])


def _say(a: Anomaly) -> str:
    """``NaN in backward of layers.2 (grad_output) at step 5``."""
    call = f" call {a.call}" if a.call else ""
    return f"{a.kind_text()} in {a.phase} of {a.site}{call} ({a.role}) at step {a.step}"


def _message(me: int, world: int, by_rank: Dict[int, Anomaly], first_ranks: List[int]) -> str:
    first = by_rank[first_ranks[0]]
    head = f"healthmon: rank {first.rank} saw {_say(first)}"
    if me == first.rank:
        head += " (this rank)"
    elif me in first_ranks:
        head += f"; this rank ({me}) also saw {_say(by_rank[me])}"
    elif me in by_rank:
        head += (f"; this rank ({me}) saw {_say(by_rank[me])}, in a later phase (likely a "
                 "consequence)")
    else:
        head += f"; this rank ({me}) was healthy"
    lines = [head]
    if len(first_ranks) > 1:
        lines.append(f"  first (earliest phase): {_ranks_text(first_ranks)}")
    others = [r for r in sorted(by_rank) if r != first.rank and r != me]
    if others:
        shown = ", ".join(f"rank {r} ({by_rank[r].kind_text()} in {by_rank[r].phase} of "
                          f"{by_rank[r].site})" for r in others[:_SHOWN])
        more = f" and {len(others) - _SHOWN} more" if len(others) > _SHOWN else ""
        lines.append(f"  also bad at this step: {shown}{more}")
    lines.append(f"  {len(by_rank)} of {world} ranks saw an anomaly; every rank stops at "
                 f"this step. Report of rank {first.rank}:")
    lines.append("  " + first.report().replace("\n", "\n  "))
    return "\n".join(lines)


# --------------------------------------------------------------------------- agreement

class _Pending:
    __slots__ = ("step", "local", "tensor", "host", "event")

    def __init__(self, step, local, tensor, host=None, event=None):
        self.step, self.local, self.tensor, self.host, self.event = step, local, tensor, \
            host, event


class RankAgreement:
    """Per-monitor distributed state; made by :func:`attach`.

    Attributes: ``rank``, ``world_size``, ``local_rank`` (``LOCAL_RANK``, or None),
    ``host``, ``device`` (of the flag tensor), ``collectives`` (flag all-reduces so far),
    ``seconds`` (host time spent in them: enqueue + wait on CPU, enqueue on CUDA).
    """

    def __init__(self, monitor, group=None):
        dist = torch.distributed
        # weak: no Monitor <-> agreement cycle keeping the model (and DDP) alive
        self._mon, self.group = weakref.ref(monitor), group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.local_rank, self.host = _env_int("LOCAL_RANK"), socket.gethostname()
        self.device = collective_device(group)
        self.collectives, self.seconds = 0, 0.0
        self._pending: Optional[_Pending] = None
        fsdp_ids: set = set()
        try:
            from torch.distributed.fsdp import FSDPModule
            for mod in monitor._modules:
                if isinstance(mod, FSDPModule):
                    fsdp_ids.update(id(p) for p in mod.parameters())
        except ImportError:  # older torch: no FSDP2
            pass
        # the role says which gradient a ``grad`` record is (local vs reduced shard)
        params = monitor._param_records
        params.grad_roles[:] = [_grad_role(pname, p, fsdp_ids)
                                for (_, pname), p in zip(params.sites, params.params)]

    def settle(self, step: int, local: Optional[Anomaly], reported: bool) -> None:
        """After decoding ``step``: record ``local`` (this rank's first anomaly, or None),
        agree with the other ranks and apply the policy to the agreed outcome.

        A collective: every rank calls it for the same steps. Raises
        :class:`DistributedHealthError` (``on_anomaly="raise"``) or
        :class:`RankMismatchError`.
        """
        if local is not None and not reported:
            self._mon()._reporter.report(local, False)  # history, sinks; policy waits
        pending, self._pending = self._pending, None
        if pending is not None:  # CUDA: the previous step's flag, already on the host
            self._conclude(self._finish(pending))
        handle = self._start(step, local)
        if handle.event is None:
            self._conclude(self._finish(handle))
        else:
            self._pending = handle

    def flush(self) -> None:
        """Wait for the agreement still in flight (CUDA) and apply its outcome."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._conclude(self._finish(pending))

    def _start(self, step: int, local: Optional[Anomaly]) -> _Pending:
        t0 = time.perf_counter()
        dist = torch.distributed
        key = HEALTHY if local is None else \
            PHASE_ORDER.get(local.phase, len(PHASE_ORDER)) * self.world_size + self.rank
        values = [key, step, -step]
        if self.device.type != "cuda":
            t = torch.tensor(values, dtype=torch.int64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
            handle = _Pending(step, local, t)
        else:  # stream-ordered: H2D from pinned memory, all-reduce, D2H, event; no host wait
            src = torch.tensor(values, dtype=torch.int64).pin_memory()
            t = src.to(self.device, non_blocking=True)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
            host = torch.empty(3, dtype=torch.int64, pin_memory=True)
            host.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            handle = _Pending(step, local, t, host, event)
        self.collectives += 1
        self.seconds += time.perf_counter() - t0
        return handle

    def _finish(self, p: _Pending):
        if p.event is not None:
            p.event.synchronize()
            key, lo, neg_hi = p.host.tolist()
        else:
            key, lo, neg_hi = p.tensor.tolist()
        if lo != -neg_hi:
            raise RankMismatchError(
                f"healthmon: ranks are out of step: this rank ({self.rank}) checked step "
                f"{p.step} while others checked steps {lo}..{-neg_hi}. Every rank must run "
                "the same loop (same forward calls, optimizer steps, mon.step() and "
                "mon.check() calls), as for any collective.")
        if key == HEALTHY:
            return None
        gathered: List[Optional[dict]] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, _portable(p.local), group=self.group)
        by_rank = {r: (p.local if r == self.rank else _rebuild(d))
                   for r, d in enumerate(gathered) if d is not None}
        phase = key // self.world_size
        first = sorted(r for r, a in by_rank.items()
                       if PHASE_ORDER.get(a.phase, len(PHASE_ORDER)) == phase)
        return by_rank, first

    def _conclude(self, outcome) -> None:
        if outcome is None:
            return
        by_rank, first_ranks = outcome
        mon, me = self._mon(), self.rank
        primary = by_rank[first_ranks[0]]
        if me not in by_rank:  # so that check() is non-empty on every rank alike
            mon._reporter.keep(primary)
        text = _message(me, self.world_size, by_rank, first_ranks)
        mode = mon.config.on_anomaly
        if mode == "raise":
            raise DistributedHealthError(primary, text, me, first_ranks, by_rank,
                                         self.world_size)
        if mode == "warn":
            warnings.warn(text, RuntimeWarning, stacklevel=4)
        elif mode == "skip":  # every rank skipped this step's update (agreed before it)
            warnings.warn(text + "\n  on_anomaly=skip: this step's update was skipped on "
                          "every rank", RuntimeWarning, stacklevel=4)
        else:
            import logging
            logging.getLogger("healthmon").error("%s", text)


def attach(monitor, agree: bool = False) -> Optional[RankAgreement]:
    """The monitor's :class:`RankAgreement` when the default process group is initialised,
    else None. ``agree=True`` (distributed found after ``watch()``) first compares the
    settings (a collective)."""
    if not initialized():
        return None
    if agree:
        agree_settings(monitor.config)
    return RankAgreement(monitor)


def rank_state(monitor) -> Optional[RankAgreement]:
    """The :class:`RankAgreement` of a monitor (None when not distributed)."""
    return getattr(monitor, "_dist", None)
