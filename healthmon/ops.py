"""The one loader of the native extension, and checked entry points to every op.

``import healthmon._C`` registers the ``torch.ops.healthmon.*`` operators (schemas in
``csrc/schemas.cpp``). When it cannot be imported, every function here falls back to the
float64 reference in :mod:`healthmon.reference` and one warning says how to build the
extension. ``HEALTHMON_NO_EXT=1`` forces the fallback (used by the tests of that path).

All functions take tensors on any device; outputs stay on the input's device and no
function here synchronises with the device.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Sequence, Tuple

import torch

from . import reference
from ._layout import LABEL_FIELDS, NUM_LABEL, NUM_STATS, STATS_FIELDS

BUILD_HINT = "make build  (or: pip install --no-build-isolation --no-deps -e .)"

_native = None          # torch.ops.healthmon when the extension is loaded
_fast = None            # healthmon._C (its pybind hot-path entries) when loaded
_load_error: Optional[str] = None


def _load() -> None:
    global _native, _load_error
    if os.environ.get("HEALTHMON_NO_EXT", "") not in ("", "0"):
        _load_error = "disabled by HEALTHMON_NO_EXT"
        return
    try:
        from . import _C  # noqa: F401  (registers torch.ops.healthmon)
    except ImportError as exc:  # not built, or built against another torch
        _load_error = str(exc)
        warnings.warn(
            "healthmon: the native extension is not available "
            f"({exc}); falling back to the slow float64 reference. Build it with: {BUILD_HINT}",
            RuntimeWarning, stacklevel=3)
        return
    if tuple(_C.STATS_FIELDS) != STATS_FIELDS or tuple(_C.LABEL_FIELDS) != LABEL_FIELDS:
        raise ImportError("healthmon._C was built from another version of csrc/record.h; "
                          f"rebuild it with: {BUILD_HINT}")
    _native = torch.ops.healthmon
    global _fast
    _fast = _C if hasattr(_C, "record") else None  # an older build lacks the fast entry


def extension_available() -> bool:
    """True when the compiled ops are in use, False when the float64 reference is."""
    return _native is not None


def extension_cuda_available() -> bool:
    """True when the compiled extension contains the CUDA kernels."""
    return _native is not None and bool(_C_has_cuda())


def _C_has_cuda() -> bool:
    from . import _C
    return bool(getattr(_C, "HAS_CUDA", False))


# --------------------------------------------------------------------------- validation

_STATS_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.uint16, torch.uint32, torch.uint64,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _STATS_DTYPES.add(getattr(torch, _name))
_LABEL_DTYPES = {
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.uint16, torch.uint32, torch.uint64,
}
STATS_DTYPES = frozenset(_STATS_DTYPES)
LABEL_DTYPES = frozenset(_LABEL_DTYPES)


def unsupported_reason(x: object, dtypes: frozenset = STATS_DTYPES) -> Optional[str]:
    """Why ``x`` cannot go through the stats kernels, or None when it can (cheap: no sync)."""
    if not isinstance(x, torch.Tensor):
        return f"expected a torch.Tensor, got {type(x).__name__}"
    if x.layout != torch.strided:
        return f"{x.layout} tensors are not supported (only dense, torch.strided tensors)"
    if x.is_quantized:
        return "quantized tensors are not supported (dequantize first)"
    if getattr(x, "is_nested", False):
        return "nested tensors are not supported"
    if x.dtype not in dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"dtype {x.dtype} is not supported (supported: {names})"
    return None


def _check(x: object, what: str, dtypes: frozenset = STATS_DTYPES) -> None:
    reason = unsupported_reason(x, dtypes)
    if reason is not None:
        exc = TypeError if not isinstance(x, torch.Tensor) or "dtype" in reason else ValueError
        raise exc(f"healthmon: {what}: {reason}")


def _check_records(records: torch.Tensor, like: torch.Tensor, slots: Sequence[int]) -> None:
    if not isinstance(records, torch.Tensor):
        raise TypeError(f"healthmon: records must be a tensor, got {type(records).__name__}")
    if records.dtype != torch.float64 or records.dim() != 2 or records.shape[1] != NUM_STATS:
        raise ValueError(
            f"healthmon: records must be a float64 tensor of shape (N, {NUM_STATS}), "
            f"got {records.dtype} {tuple(records.shape)}")
    if not records.is_contiguous():
        raise ValueError("healthmon: records must be contiguous")
    if records.device != like.device:
        raise ValueError(f"healthmon: records are on {records.device} but the tensor is on "
                         f"{like.device}; allocate the record buffer on the tensor's device")
    first_use = {}
    for i, slot in enumerate(slots):
        if not 0 <= slot < records.shape[0]:
            raise IndexError(f"healthmon: slot {slot} is outside the record buffer "
                             f"(0 <= slot < {records.shape[0]})")
        if slot in first_use:  # two tensors would race for one record row
            raise ValueError(f"healthmon: slot {slot} is given more than once (tensors "
                             f"{first_use[slot]} and {i}); every tensor needs its own record row")
        first_use[slot] = i


# --------------------------------------------------------------------------- functorch

def physical(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor beneath torch.func wrappers, for host-side reading of records and
    labels: a vmap ``BatchedTensor`` becomes its physical tensor with the batch dimension
    moved first (``(B, *sample_shape)``; nested vmaps: outermost first), a ``grad`` /
    ``jacrev`` ``GradTrackingTensor`` its value. Plain tensors are returned as they are.
    Never synchronises. The result must only be read (it is not tracked by the transforms).
    """
    f = torch._C._functorch
    if not f.is_functorch_wrapped_tensor(t):
        return t
    with torch._C._DisableFuncTorch():
        while f.is_functorch_wrapped_tensor(t):
            bdim = f.maybe_get_bdim(t) if f.is_batchedtensor(t) else -1
            t = f.get_unwrapped(t)
            if bdim >= 0:
                t = t.movedim(bdim, 0)
    return t


def store_record(records: torch.Tensor, slot: int, record: torch.Tensor) -> None:
    """``records[slot, :len(record)] = record`` also inside torch.func transforms (where
    writing into the monitor's buffer, a captured tensor, is refused): the record of a
    transformed call is unbatched (see the vmap rules below), so its plain value is stored."""
    record = physical(record)
    with torch._C._DisableFuncTorch():
        records[slot, :record.shape[0]].copy_(record)


# --------------------------------------------------------------------------- ops

def stats_record(x: torch.Tensor) -> torch.Tensor:
    """Fused statistics of ``x``.

    Args:
        x: any shape / layout; dtype in :data:`STATS_DTYPES`.
    Returns:
        float64 ``(NUM_STATS,)`` on ``x.device`` (fields: :data:`STATS_FIELDS`).
    """
    _check(x, "stats")
    if _native is None:
        return reference.stats_ref(x)
    return _native.stats(x.detach())


def stats_into(x: torch.Tensor, records: torch.Tensor, slot: int) -> None:
    """Write the stats of ``x`` into ``records[slot]`` (float64 ``(N, NUM_STATS)``, same device)."""
    _check(x, "stats_into")
    _check_records(records, x, (slot,))
    if _native is None:
        reference.stats_into_ref(x, records, slot)
    else:
        _native.stats_into(x.detach(), records, slot)


def record_unchecked(x: torch.Tensor, records: torch.Tensor, slot: int) -> None:
    """The monitor's hot path: :func:`stats_into` without the Python argument checks (the
    caller checked the site once; the kernels still check). One pybind call into the C++
    dispatcher below autograd (no detach, no autograd bookkeeping); the reference when the
    extension is missing. Not traceable: compiled code calls ``torch.ops.healthmon``."""
    if _fast is not None:
        _fast.record(x, records, slot)
    else:
        reference.stats_into_ref(x.detach(), records, slot)


def multi_record_unchecked(xs, records: torch.Tensor, slots) -> None:
    """:func:`multi_stats_into` without the Python argument checks (see
    :func:`record_unchecked`)."""
    if _fast is not None:
        _fast.multi_record(list(xs), records, list(slots))
    else:
        reference.multi_stats_into_ref([x.detach() for x in xs], records, list(slots))


def flagged_rows(table: torch.Tensor) -> List[int]:
    """Rows of a host record table (CPU float64 ``(rows, NUM_STATS)``, contiguous) whose
    NaN, +Inf or -Inf count is nonzero (one native scan; torch ops without the extension).
    Inside a torch.func transform the table is that transform's wrapper: its plain tensor is
    read."""
    if _fast is not None:
        return _fast.flagged_rows(physical(table))
    return (table[:, 1:4] != 0).any(1).nonzero().flatten().tolist()


def multi_stats(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stats of every tensor of ``xs`` (one launch per device / dtype group on CUDA).

    Returns float64 ``(len(xs), NUM_STATS)`` on the device of ``xs[0]`` (CPU when empty).
    """
    xs = list(xs)
    if not xs:  # nothing to launch; the native op cannot tell a device from an empty list
        return torch.empty((0, NUM_STATS), dtype=torch.float64)
    for i, x in enumerate(xs):
        _check(x, f"multi_stats[{i}]")
    if xs and any(x.device != xs[0].device for x in xs):
        raise ValueError("healthmon: multi_stats needs all tensors on one device")
    if _native is None:
        return reference.multi_stats_ref(xs).to(xs[0].device if xs else "cpu")
    return _native.multi_stats([x.detach() for x in xs])


def multi_stats_into(xs: Sequence[torch.Tensor], records: torch.Tensor,
                     slots: Sequence[int]) -> None:
    """Write the stats of ``xs[i]`` into ``records[slots[i]]`` in one pass over the list."""
    xs, slots = list(xs), [int(s) for s in slots]
    if len(xs) != len(slots):
        raise ValueError(f"healthmon: {len(xs)} tensors but {len(slots)} slots")
    if not xs:
        return
    for i, x in enumerate(xs):
        _check(x, f"multi_stats_into[{i}]")
        if x.device != records.device:
            raise ValueError(f"healthmon: tensor {i} is on {x.device}, records on {records.device}")
    _check_records(records, xs[0], slots)
    if _native is None:
        reference.multi_stats_into_ref(xs, records, slots)
    else:
        _native.multi_stats_into([x.detach() for x in xs], records, slots)


def _check_labels(target: torch.Tensor, num_classes: int) -> None:
    _check(target, "label check", LABEL_DTYPES)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"healthmon: num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"healthmon: num_classes must be >= 1, got {num_classes}")
    if num_classes >= 1 << 63:
        raise ValueError(f"healthmon: num_classes must fit in int64 (< 2**63), got "
                         f"{num_classes}")


def label_record(target: torch.Tensor, num_classes: int, ignore_index: int = -100) -> torch.Tensor:
    """Range check of integer labels: int64 ``(NUM_LABEL,)`` on ``target.device``
    (fields: :data:`LABEL_FIELDS`). A uint64 label >= 2**63 is always bad (never ignored) and
    min / max report it saturated to 2**63 - 1."""
    _check_labels(target, num_classes)
    if _native is None:
        return reference.label_check_ref(target, num_classes, ignore_index)
    return _native.label_check(target.detach(), num_classes, ignore_index)


def label_sanitize(target: torch.Tensor, num_classes: int,
                   ignore_index: int = -100) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`label_record` plus an int64 copy of ``target`` (same shape) in which every bad
    label is replaced by ``ignore_index``; one pass, no host sync."""
    _check_labels(target, num_classes)
    if _native is None:
        return reference.label_sanitize_ref(target, num_classes, ignore_index)
    record, clean = _native.label_sanitize(target.detach(), num_classes, ignore_index)
    return record, clean


_load()


# Fake (meta) kernels so every op traces under torch.compile / FakeTensorMode.
if _native is not None:
    @torch.library.register_fake("healthmon::stats")
    def _stats_fake(x):
        return x.new_empty((NUM_STATS,), dtype=torch.float64)

    @torch.library.register_fake("healthmon::stats_into")
    def _stats_into_fake(x, records, slot):
        return None

    @torch.library.register_fake("healthmon::record_to")
    def _record_to_fake(x, buffer, slot):
        return None

    @torch.library.register_fake("healthmon::multi_record_to")
    def _multi_record_to_fake(xs, buffers, slots):
        return None

    @torch.library.register_fake("healthmon::multi_stats")
    def _multi_stats_fake(xs):
        device = xs[0].device if xs else torch.device("cpu")
        return torch.empty((len(xs), NUM_STATS), dtype=torch.float64, device=device)

    @torch.library.register_fake("healthmon::multi_stats_into")
    def _multi_stats_into_fake(xs, records, slots):
        return None

    @torch.library.register_fake("healthmon::label_check")
    def _label_check_fake(target, num_classes, ignore_index):
        return target.new_empty((NUM_LABEL,), dtype=torch.int64)

    @torch.library.register_fake("healthmon::label_sanitize")
    def _label_sanitize_fake(target, num_classes, ignore_index):
        return (target.new_empty((NUM_LABEL,), dtype=torch.int64),
                torch.empty(target.shape, dtype=torch.int64, device=target.device))


# Op hygiene: the ops are not differentiable. A fallthrough at the Autograd key (what the
# autograd fallback's own warning asks for) skips autograd: no "autograd kernel was not
# registered" warning when a tensor requiring grad is passed, outputs never require grad.
# vmap rules (torch.func.vmap over a watched model, the per-sample-gradient recipe):
#   * the record-writing ops (``stats_into``, ``multi_stats_into``) and the label ops write
#     or return ONE record for the whole batch: the stats of the physical tensor (all
#     samples), because their record goes to one shared buffer row / one host check;
#   * ``stats`` / ``multi_stats`` are pure functions: per-sample results, like any torch op.
# The Library object must stay alive for the registrations to stay.
_LIB = None
if _native is not None:
    _LIB = torch.library.Library("healthmon", "IMPL")
    for _op in ("stats", "stats_into", "record_to", "multi_record_to", "multi_stats",
                "multi_stats_into", "label_check", "label_sanitize"):
        _LIB.impl(_op, torch.library.fallthrough_kernel, "Autograd")
    # record_to writes a buffer it does not take as an argument (so compiled graphs neither
    # save nor mutate the buffer): nothing in a graph uses its (absent) result, so graph
    # passes must be told not to drop it as dead code.
    torch.fx.node.has_side_effect(torch.ops.healthmon.record_to.default)
    torch.fx.node.has_side_effect(torch.ops.healthmon.multi_record_to.default)

    def _front(x, dim):
        """``x`` with its vmap batch dimension first (``dim`` None: unbatched, unchanged)."""
        return x if dim is None else x.movedim(dim, 0)

    def _no_batched_records(name, records_dim):
        if records_dim is not None:
            raise ValueError(
                f"healthmon::{name} under vmap: the record buffer is batched; records are "
                "one shared buffer per monitor: pass it unbatched (in_dims=None)")

    @torch.library.register_vmap("healthmon::stats")
    def _stats_vmap(info, in_dims, x):
        rows = _native.multi_stats(list(_front(x, in_dims[0]).unbind(0)))
        return rows, 0  # (B, NUM_STATS): the stats of each sample

    @torch.library.register_vmap("healthmon::multi_stats")
    def _multi_stats_vmap(info, in_dims, xs):
        dims = in_dims[0] if in_dims[0] is not None else [None] * len(xs)
        per_sample = [_native.multi_stats([x if d is None else x.select(d, b)
                                           for x, d in zip(xs, dims)])
                      for b in range(info.batch_size)]
        return torch.stack(per_sample), 0  # (B, len(xs), NUM_STATS)

    @torch.library.register_vmap("healthmon::stats_into")
    def _stats_into_vmap(info, in_dims, x, records, slot):
        _no_batched_records("stats_into", in_dims[1])
        _native.stats_into(x, records, slot)  # the physical tensor: every sample at once
        return None, None

    @torch.library.register_vmap("healthmon::record_to")
    def _record_to_vmap(info, in_dims, x, buffer, slot):
        _native.record_to(x, buffer, slot)  # the physical tensor, like stats_into
        return None

    @torch.library.register_vmap("healthmon::multi_stats_into")
    def _multi_stats_into_vmap(info, in_dims, xs, records, slots):
        _no_batched_records("multi_stats_into", in_dims[1])
        _native.multi_stats_into(list(xs), records, slots)
        return None, None

    @torch.library.register_vmap("healthmon::label_check")
    def _label_check_vmap(info, in_dims, target, num_classes, ignore_index):
        # batch first, so first_bad is a flat index into (batch, *sample shape)
        return _native.label_check(_front(target, in_dims[0]), num_classes, ignore_index), None

    @torch.library.register_vmap("healthmon::label_sanitize")
    def _label_sanitize_vmap(info, in_dims, target, num_classes, ignore_index):
        record, clean = _native.label_sanitize(_front(target, in_dims[0]), num_classes,
                                               ignore_index)
        return (record, clean), (None, None if in_dims[0] is None else 0)
