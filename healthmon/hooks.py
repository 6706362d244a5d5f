"""Finding the tensors in module inputs / outputs, with a role name for each, and the plain
tensors the kernels read for each of them (:func:`record_parts`).

:func:`walk` yields ``(role, tensor)`` for every tensor inside tensors, tuples, lists,
dicts (``ModelOutput`` is an ``OrderedDict``), dataclasses and namedtuples, to a bounded
depth and count; everything else (None, ints, custom objects) is skipped. Role names:
``output`` for a lone tensor, ``output[1]``, ``output.logits``, ``output[0].hidden``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import ops

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


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def unsupported(t: torch.Tensor):
    """Why the monitor skips ``t`` (None when it can record it); never synchronises.
    A DTensor is judged by its local shard, which is what the monitor records."""
    if type(t) in _PLAIN and t.layout is torch.strided and t.dtype in ops.STATS_DTYPES \
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
    if type(t) in _PLAIN or _is_dtensor(t):
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
