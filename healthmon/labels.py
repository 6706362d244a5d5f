"""Out-of-range label checks: :func:`check_labels`, :func:`check_dataset_labels` and the
loss guard the monitor installs.

The bug this catches: a ``uint8`` label map shifted with ``label -= 1`` turns -1 into 255;
``F.cross_entropy`` then dies on the GPU with a device-side assert (the CUDA context is
dead and the traceback points at a later line) or, on the CPU, with a bare ``IndexError``.
Here it is one :class:`~healthmon.HealthError` naming the count, the bad values, the first
bad index, the dtype and the wrap-around.

The guard (:func:`install_loss_guard`) wraps the two native entry points every
class-index loss goes through, ``torch._C._nn.cross_entropy_loss`` and
``torch._C._nn.nll_loss_nd``: ``F.cross_entropy``, ``F.nll_loss``, ``nn.CrossEntropyLoss``,
``nn.NLLLoss`` and names imported with ``from torch.nn.functional import ...`` before the
monitor started all call them through the module attribute. Wrapping there costs one
Python call per loss (a ``TorchFunctionMode`` would intercept every op of the step). The
guard is reference-counted by live monitors and uninstalled completely by the last
``remove()``.
"""
from __future__ import annotations

import threading
import functools
from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Optional, Sequence, Tuple

import torch

from . import ops
from ._layout import LABEL
from .errors import Anomaly, HealthError
from .owners import Owners

MAX_BAD_VALUES = 5
INT64_MAX = (1 << 63) - 1
# Devices whose label records the monitor reads back at the loss call even in async mode:
# reading a CPU tensor is no device sync, and torch would raise at that very call anyway.
SYNC_CHECK_DEVICES = ("cpu",)

_DIM_NAMES = {
    1: ("sample",),
    2: ("batch", "position"),
    3: ("batch", "row", "col"),
    4: ("batch", "depth", "row", "col"),
}


@dataclass(frozen=True)
class LabelStats:
    """Result of one label range check.

    Attributes:
        numel: number of labels.
        bad: labels outside ``[0, num_classes)`` that are not ``ignore_index``.
        ignored: labels equal to ``ignore_index``.
        min, max: smallest / largest label (0 when empty).
        first_bad: row-major flat index of the first bad label, -1 when none.
        shape, dtype: of the target.
        num_classes, ignore_index: the check's parameters.
        bad_values: up to :data:`MAX_BAD_VALUES` ``(value, count)`` pairs, most frequent
            first (empty when not computed, e.g. for records decoded asynchronously).
        first_sample: for :func:`check_dataset_labels`, the dataset index of the first
            offending sample (None otherwise).
        what: ``"label"`` (class indices of a loss) or ``"index"`` (embedding indices:
            ``num_classes`` is then ``num_embeddings`` and ``ignore_index`` the
            ``padding_idx``, or 0 when there is none).
    """
    numel: int
    bad: int
    ignored: int
    min: int
    max: int
    first_bad: int
    shape: Tuple[int, ...] = ()
    dtype: Optional[torch.dtype] = None
    num_classes: int = 0
    ignore_index: int = -100
    bad_values: Tuple[Tuple[int, int], ...] = ()
    first_sample: Optional[int] = None
    what: str = "label"

    @classmethod
    def from_record(cls, record: Sequence, shape=(), dtype=None, num_classes: int = 0,
                    ignore_index: int = -100, bad_values=()) -> "LabelStats":
        """Build from a label record (``ops.label_record`` output, a tensor or a list)."""
        if isinstance(record, torch.Tensor):
            record = record.tolist()
        r = [int(v) for v in record]
        return cls(numel=r[LABEL["numel"]], bad=r[LABEL["bad"]], ignored=r[LABEL["ignored"]],
                   min=r[LABEL["min"]], max=r[LABEL["max"]], first_bad=r[LABEL["first_bad"]],
                   shape=tuple(shape), dtype=dtype, num_classes=num_classes,
                   ignore_index=ignore_index, bad_values=tuple(bad_values))

    def as_dict(self) -> dict:
        """JSON-friendly field name -> value (dtype as text, first_bad_index added)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["dtype"] = str(self.dtype).replace("torch.", "") if self.dtype is not None else None
        d["shape"] = list(self.shape)
        d["bad_values"] = [list(p) for p in self.bad_values]
        index = self.first_bad_index
        d["first_bad_index"] = list(index) if index is not None else None
        return d

    @property
    def ok(self) -> bool:
        """True when no label is out of range."""
        return self.bad == 0

    @property
    def first_bad_index(self) -> Optional[Tuple[int, ...]]:
        """Multi-dimensional index of the first bad label (None when none)."""
        if self.first_bad < 0:
            return None
        index, rest = [], self.first_bad
        for size in reversed(self.shape):
            index.append(rest % size if size else 0)
            rest = rest // size if size else 0
        return tuple(reversed(index))

    def where_text(self) -> str:
        """``(batch 3, row 17, col 40)`` for the first bad label ("" when none)."""
        index = self.first_bad_index
        if index is None:
            return ""
        names = _DIM_NAMES.get(len(index))
        if names is None:
            return "(" + ", ".join(str(i) for i in index) + ")"
        return "(" + ", ".join(f"{n} {i}" for n, i in zip(names, index)) + ")"

    def describe(self) -> str:
        """One line: how many labels are bad, which values, where the first one is."""
        if self.what == "index":
            return self._describe_indices()
        if self.ok:
            return (f"all {self.numel} labels in [0, {self.num_classes}) or ignore_index "
                    f"{self.ignore_index} ({self.ignored} ignored)")
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        text = (f"{self.bad} of {self.numel} labels outside [0, {self.num_classes}) "
                f"(ignore_index {self.ignore_index}, {self.ignored} ignored); "
                f"target dtype {dtype}, label range [{self.min}, {self.max}]")
        if self.bad_values:
            text += "; bad values: " + ", ".join(f"{v} ({n}x)" for v, n in self.bad_values)
        if self.first_sample is not None:
            text += f"; first in dataset sample {self.first_sample}"
        if self.first_bad >= 0:
            text += f"; first bad label at {self.where_text()}"
        return text

    def _describe_indices(self) -> str:
        if self.ok:
            return f"all {self.numel} indices in [0, {self.num_classes})"
        dtype = str(self.dtype).replace("torch.", "") if self.dtype is not None else "?"
        text = (f"{self.bad} of {self.numel} indices outside [0, {self.num_classes}) "
                f"(num_embeddings {self.num_classes}); indices dtype {dtype}, "
                f"range [{self.min}, {self.max}]")
        if self.bad_values:
            text += "; bad values: " + ", ".join(f"{v} ({n}x)" for v, n in self.bad_values)
        if self.first_bad >= 0:
            text += f"; first bad index at {self.where_text()}"
        return text

    def _index_hint(self) -> Optional[str]:
        values = [v for v, _ in self.bad_values] or [self.min, self.max]
        if any(v >= self.num_classes for v in values):
            top = max(max(values), self.max)
            return (f"token id {top} does not fit an embedding of num_embeddings="
                    f"{self.num_classes}: the tokenizer's vocabulary is larger than the "
                    f"model's (a tokenizer with added tokens, or another model's tokenizer). "
                    f"Resize the embedding to the tokenizer (transformers: "
                    f"model.resize_token_embeddings(len(tokenizer))) or build it with "
                    f"num_embeddings >= {top + 1}.")
        if any(v < 0 for v in values):
            low = min(min(values), self.min)
            return (f"negative id {low}: embeddings have no negative rows (-100 is a label "
                    f"ignore_index, not an input id; -1 is not a padding id). Map it to the "
                    f"pad token id and pass padding_idx=<pad id> to nn.Embedding.")
        return None

    def hint(self) -> Optional[str]:
        """Why it probably happened, when the values say so (None otherwise)."""
        if self.ok or self.dtype is None:
            return None
        if self.what == "index":
            return self._index_hint()
        if not self.dtype.is_floating_point and self.dtype != torch.bool:
            info = torch.iinfo(self.dtype)
            unsigned = info.min == 0
            top = self.max == info.max or any(v == info.max for v, _ in self.bad_values)
            if unsigned and top:
                return (f"{info.max} is the largest {str(self.dtype).replace('torch.', '')} "
                        f"value: a negative label wrapped around (e.g. `label -= 1` or "
                        f"`label - 1` on unsigned labels turns -1 into {info.max}). Convert "
                        f"to int64 before shifting, and map the value to ignore_index "
                        f"({self.ignore_index}) if it means 'void'.")
        for wrapped, name in ((255, "uint8"), (65535, "uint16")):
            if self.max == wrapped and wrapped >= self.num_classes:
                return (f"{wrapped} is the largest {name} value: if these labels were "
                        f"stored as {name}, a negative label wrapped around (e.g. "
                        f"`label -= 1` turns -1 into {wrapped}). Shift in int64, and map "
                        f"the value to ignore_index ({self.ignore_index}) if it means "
                        f"'void'.")
        if self.num_classes and self.max == self.num_classes and self.min >= 1:
            return (f"labels run from {self.min} to {self.num_classes}: they look 1-based; "
                    f"subtract 1 (in int64) or use num_classes={self.num_classes + 1}.")
        if self.min < 0 and self.min != self.ignore_index:
            return (f"negative label {self.min} is not ignore_index ({self.ignore_index}): "
                    f"pass ignore_index={self.min} to the loss if it marks 'void' pixels.")
        return None


def _validate(target, num_classes, ignore_index, logits=None) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"healthmon.check_labels: target must be a torch.Tensor, got "
                        f"{type(target).__name__}")
    if target.is_floating_point() or target.is_complex():
        raise TypeError(f"healthmon.check_labels: target has dtype {target.dtype}; class "
                        "indices must be an integer (or bool) tensor. Class-probability "
                        "targets have no range to check.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"healthmon.check_labels: num_classes must be an int, got "
                        f"{type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"healthmon.check_labels: num_classes must be >= 1, got {num_classes}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"healthmon.check_labels: ignore_index must be an int, got "
                        f"{type(ignore_index).__name__}")
    if num_classes > INT64_MAX or not -INT64_MAX - 1 <= ignore_index <= INT64_MAX:
        raise ValueError(f"healthmon.check_labels: num_classes ({num_classes}) and "
                         f"ignore_index ({ignore_index}) must fit in int64 (at most "
                         f"{INT64_MAX}); pass the loss input's class count, input.shape[1]")
    if target.device.type == "meta":
        raise ValueError("healthmon.check_labels: target is a meta tensor, which has shape "
                         "and dtype but no values to check; pass the real labels (e.g. "
                         "after model.to_empty(device=...) and loading the data)")
    if logits is not None and logits.device != target.device:
        raise ValueError(f"healthmon.check_labels: target is on {target.device} but the "
                         f"input is on {logits.device}; move the target with "
                         f"target.to(input.device)")


def bad_values(target: torch.Tensor, num_classes: int, ignore_index: int,
               limit: int = MAX_BAD_VALUES, start: int = 0,
               chunk: int = 1 << 22) -> Tuple[Tuple[int, int], ...]:
    """Most frequent bad values with exact counts, most frequent first.

    Synchronises; only called on the bad path. Scans from flat index ``start`` (the first
    bad label) in chunks, so a huge target never gets a full-size int64 copy.
    """
    t = ops.physical(target.detach())  # under vmap: every sample, batch first
    if t.dtype == torch.bool:
        return ()
    with torch._C._DisableFuncTorch():
        return _bad_values(t.reshape(-1), num_classes, ignore_index, limit, start, chunk)


def _bad_values(t, num_classes, ignore_index, limit, start, chunk):
    if t.dtype == torch.bool:
        return ()
    counts: dict = {}
    wraps = t.dtype == torch.uint64  # values >= 2^63 read as negative int64
    for lo in range(max(start, 0), t.numel(), chunk):
        # uint16/32/64 have few kernels: compare in int64
        part = t[lo:lo + chunk].to(torch.int64)
        bad = ((part < 0) | (part >= num_classes)) & (part != ignore_index)
        if wraps:  # a uint64 label >= 2^63 is always bad, never ignore_index (as the kernel)
            bad |= part < 0
        if not bool(bad.any()):
            continue
        values, n = torch.unique(part[bad], return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            if wraps and v < 0:
                v += 1 << 64  # the uint64 value the user stored
            counts[v] = counts.get(v, 0) + c
    ranked = sorted(counts.items(), key=lambda vc: (-vc[1], vc[0]))
    return tuple(ranked[:limit])


INDEX_ROLE = "indices"  # role of embedding index checks (losses: "target")


def label_anomaly(stats: LabelStats, site: str, stack=(), step: int = -1,
                  role: str = "target") -> Anomaly:
    """The :class:`Anomaly` of a failed label check (phase ``label``, kind ``label``; for
    embedding indices, role :data:`INDEX_ROLE`: kind ``index``)."""
    if role == INDEX_ROLE:
        return Anomaly(site=site, phase="label", role=role, step=step, kind="index",
                       stats=replace(stats, what="index"), stack=list(stack))
    return Anomaly(site=site, phase="label", role=role, step=step, kind="label",
                   stats=stats, stack=list(stack))


def check_labels(target: torch.Tensor, num_classes: int, ignore_index: int = -100, *,
                 input: Optional[torch.Tensor] = None) -> LabelStats:
    """Check that every label is in ``[0, num_classes)`` or equal to ``ignore_index``.

    Synchronous (reads one small record back from the device).

    Args:
        target: integer or bool tensor of class indices, any shape, e.g. ``(B,)`` or
            ``(B, H, W)``; any device; over 2^31 elements is fine.
        num_classes: number of classes C (``input.shape[1]`` of the loss input).
        ignore_index: label value that is skipped (as in ``F.cross_entropy``).
        input: optional loss input (logits), only to check it is on the target's device.
    Returns:
        :class:`LabelStats` when every label is valid.
    Raises:
        HealthError: some labels are out of range; the message gives the count, the bad
            values with counts, the first bad index, the dtype and, for unsigned dtypes,
            the wrap-around hint.
        TypeError: target not an integer tensor (class-probability targets are not
            checked), or non-int ``num_classes`` / ``ignore_index``.
        ValueError: ``num_classes < 1``, or ``input`` on another device.
    """
    _validate(target, num_classes, ignore_index, input)
    record = ops.label_record(target, num_classes, ignore_index)
    stats = LabelStats.from_record(record.cpu(), target.shape, target.dtype, num_classes,
                                   ignore_index)
    if stats.ok:
        return stats
    stats = replace(stats, bad_values=bad_values(target, num_classes, ignore_index,
                                                 start=stats.first_bad))
    import traceback
    raise HealthError(label_anomaly(stats, "check_labels", traceback.extract_stack()[:-1],
                                    step=-1))


def _default_key(batch):
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[1]
    elif isinstance(batch, dict):
        for key in ("labels", "label", "target", "targets", "mask", "y"):
            if key in batch:
                return batch[key]
    elif isinstance(batch, torch.Tensor):
        return batch
    raise TypeError("healthmon.check_dataset_labels: cannot find the labels in a batch of "
                    f"type {type(batch).__name__}; pass key= (an index, a dict key or a "
                    "function batch -> target)")


@dataclass
class DatasetLabelStats:
    """Totals of :func:`check_dataset_labels` over a whole dataset."""
    batches: int = 0
    samples: int = 0
    numel: int = 0
    ignored: int = 0
    min: int = field(default=0)
    max: int = field(default=0)

    def describe(self) -> str:
        return (f"{self.samples} samples in {self.batches} batches, {self.numel} labels, "
                f"range [{self.min}, {self.max}], {self.ignored} ignored")


def check_dataset_labels(loader: Iterable, num_classes: int, ignore_index: int = -100,
                         key=None, max_batches: Optional[int] = None) -> DatasetLabelStats:
    """Check the labels of a whole dataset / DataLoader / iterable of batches.

    Args:
        loader: iterable of batches (DataLoader, Dataset, generator). A batch is a tuple
            ``(inputs, target, ...)``, a dict with a ``labels``/``label``/``target``/
            ``mask`` key, or a target tensor; the first dimension of a batched target is
            the sample dimension (a 0-dim target is one sample).
        num_classes, ignore_index: as in :func:`check_labels`.
        key: where the target is in a batch: an int index, a dict key, or a function
            ``batch -> target``.
        max_batches: stop after this many batches.
    Returns:
        :class:`DatasetLabelStats` totals when every label is valid.
    Raises:
        HealthError: at the first batch with a bad label; its stats name the dataset index
            of the first offending sample (``first_sample``) and the index inside it.
    """
    totals = DatasetLabelStats()
    first = True
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        if key is None:
            target = _default_key(batch)
        elif callable(key):
            target = key(batch)
        else:
            target = batch[key]
        if not isinstance(target, torch.Tensor):
            target = torch.as_tensor(target)
        n_samples = target.shape[0] if target.dim() else 1
        try:
            stats = check_labels(target, num_classes, ignore_index)
        except HealthError as err:
            s = err.anomaly.stats
            index = s.first_bad_index or ()
            sample = totals.samples + (index[0] if target.dim() and index else 0)
            s = replace(s, first_sample=sample)
            anomaly = label_anomaly(s, "check_dataset_labels", err.anomaly.stack,
                                    role=f"target of batch {b}")
            raise HealthError(anomaly) from None
        totals.batches += 1
        totals.numel += stats.numel
        totals.ignored += stats.ignored
        if stats.numel:
            totals.min = stats.min if first else min(totals.min, stats.min)
            totals.max = stats.max if first else max(totals.max, stats.max)
            first = False
        totals.samples += n_samples
    return totals


# ----------------------------------------------------------------------------- loss guard

_GUARDED = ("cross_entropy_loss", "nll_loss_nd")
_originals: dict = {}


def _num_classes(input: torch.Tensor) -> Optional[int]:
    if input.dim() == 0:
        return None
    return int(input.shape[1] if input.dim() >= 2 else input.shape[0])


def _owner_of_open_step():
    """The monitor whose root forward ran most recently in a step still open: the loss of
    that model's step (several monitors: a GAN's generator and discriminator)."""
    return owner_among(_owners)


def owner_among(monitors):
    """Of ``monitors``, the one whose root forward ran most recently in a step still open
    in this thread (a model trained in another thread is not this loss's); when none did
    and one monitor's root hooks are traced (its forward calls are not seen on the host:
    a compiled train step, ``torch.compile`` of some roots), that one, if its compiled code
    recorded in the open step (on the CPU, read in place: else an unwatched model's loss
    would pass for its own; elsewhere assumed)."""
    best = None
    thread = threading.get_ident()
    for mon in monitors:
        if mon._cur.forward and mon._forward_thread == thread and \
                (best is None or mon._forward_tick > best._forward_tick):
            best = mon
    if best is None:
        compiled = [m for m in monitors if m._trace.root_traced and not m._removed]
        if len(compiled) == 1 and _compiled_recorded(compiled[0]):
            best = compiled[0]
    return best


def _compiled_recorded(mon) -> bool:
    rows = mon._rec.cpu_rows()
    return rows is None or mon._rec.any_compiled_written(rows)


def _no_data(t: torch.Tensor) -> bool:
    """Meta and fake tensors: shapes without values (nothing to check or record)."""
    return t.device.type == "meta" or "Fake" in type(t).__name__


def _make_guard(fn_name: str, original):
    loss_name = {"cross_entropy_loss": "cross_entropy", "nll_loss_nd": "nll_loss"}[fn_name]

    def guarded(*args, **kwargs):
        if not _owners or torch.compiler.is_compiling():
            return original(*args, **kwargs)
        input = args[0] if args else kwargs.get("self", kwargs.get("input"))
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if not isinstance(target, torch.Tensor) or not isinstance(input, torch.Tensor) \
                or target.is_floating_point() or target.dtype not in ops.LABEL_DTYPES:
            return original(*args, **kwargs)  # class probabilities: nothing to check
        ignore_index = args[4] if len(args) > 4 else kwargs.get("ignore_index", -100)
        num_classes = _num_classes(input)
        if num_classes is None or num_classes < 1:
            return original(*args, **kwargs)
        owner = _owner_of_open_step()
        if owner is None:
            return original(*args, **kwargs)  # no watched forward in flight: not our loss
        if _no_data(target) or _no_data(input):
            owner._skip("meta / fake tensors have no data")  # shape inference: torch's to do
            return original(*args, **kwargs)
        clean = owner._check_loss_target(loss_name, input, target, num_classes,
                                         int(ignore_index))
        if clean is not None:
            if len(args) > 1:
                args = (args[0], clean) + tuple(args[2:])
            else:
                kwargs["target"] = clean
        return original(*args, **kwargs)

    guarded.__name__ = fn_name
    guarded.__qualname__ = fn_name
    guarded.__wrapped__ = original
    return guarded


EMBEDDING_SITE = "embedding"


def _make_embedding_guard(original):
    """``torch.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)``: the
    entry point of ``nn.Embedding`` and ``F.embedding`` (which has already turned a negative
    ``padding_idx`` into a row number, and None into -1)."""

    def embedding(*args, **kwargs):
        if not _owners or torch.compiler.is_compiling():
            return original(*args, **kwargs)
        weight = args[0] if args else kwargs.get("weight")
        indices = args[1] if len(args) > 1 else kwargs.get("indices")
        if not isinstance(weight, torch.Tensor) or not isinstance(indices, torch.Tensor) \
                or weight.dim() != 2 or indices.dtype not in (torch.int64, torch.int32):
            return original(*args, **kwargs)  # torch raises its own error for these
        owner = _owner_of_open_step()
        if owner is None:
            return original(*args, **kwargs)  # no watched forward in flight
        if _no_data(indices) or _no_data(weight):
            owner._skip("meta / fake tensors have no data")
            return original(*args, **kwargs)
        num = int(weight.shape[0])
        padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
        # a valid row: no bad index can equal it, and the sanitised copy (accelerators,
        # async) sends bad indices to the padding row, else to row 0
        fill = int(padding_idx) if padding_idx is not None and 0 <= padding_idx < num else 0
        if num < 1:
            return original(*args, **kwargs)
        clean = owner._check_loss_target(EMBEDDING_SITE, weight, indices, num, fill,
                                         role=INDEX_ROLE)
        if clean is not None:
            if len(args) > 1:
                args = (args[0], clean) + tuple(args[2:])
            else:
                kwargs["indices"] = clean
        return original(*args, **kwargs)

    embedding.__name__ = embedding.__qualname__ = "embedding"
    embedding.__wrapped__ = original
    return embedding


def _guard_targets():
    """``(namespace, attribute, guard maker)`` of every wrapped entry point."""
    return [(torch._C._nn, name, functools.partial(_make_guard, name)) for name in _GUARDED] \
        + [(torch, "embedding", _make_embedding_guard)]


def install_loss_guard(monitor) -> None:
    """Route class-index losses and embedding lookups through ``monitor`` (reference-counted
    per monitor; the first installs the wrappers)."""
    if monitor in _owners:
        return
    if not _originals:
        for namespace, name, make in _guard_targets():
            original = getattr(namespace, name)
            _originals[(namespace, name)] = original
            setattr(namespace, name, make(original))
    _owners.add(monitor)


def uninstall_loss_guard(monitor) -> None:
    """Undo :func:`install_loss_guard`; the last monitor restores the originals."""
    if monitor not in _owners:
        return
    _owners.discard(monitor)
    if not _owners:
        _restore_originals()


def _restore_originals() -> None:
    for (namespace, name), original in _originals.items():
        setattr(namespace, name, original)
    _originals.clear()


# live monitors, oldest first (weakly: a model dropped without remove() takes the guard along)
_owners = Owners(on_collected=_restore_originals)


def loss_guard_installed() -> bool:
    """Whether the loss / embedding entry points are currently wrapped."""
    return any(getattr(getattr(ns, n), "__wrapped__", None) is not None
               for ns, n, _ in _guard_targets())

