"""Where the monitor's records go: JSONL files, TensorBoard, Python logging; and the summary table.

The monitor calls every sink at step boundaries only, never inside a hook::

    sink.write_step(step, rows)   # rows: one dict per record of the step, see below
    sink.write_anomaly(anomaly)   # a healthmon.errors.Anomaly
    sink.write_warning(warning)   # optional: an early warning (an Anomaly, severity "warning")
    sink.close()

A row is ``{"site", "phase", "role", "call", "order", **TensorStats.as_dict()}`` where
``order`` is the record's position in the step's execution order. Float statistics may be
NaN or ±Inf; the JSONL sink writes them as the strings ``"nan"``, ``"inf"``, ``"-inf"`` and
:func:`read_jsonl` turns them back into floats.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import re
import socket
import time
import warnings
from typing import Any, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .errors import Anomaly
from .summary import format_summary, row_name, sort_worst_first  # noqa: F401 (re-exported)

STAT_KEYS = ("numel", "nan", "posinf", "neginf", "zeros", "finite", "min", "max", "sum",
             "sumsq", "absmax", "norm", "rms")
FORMAT_VERSION = 1
_NONFINITE_TEXT = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class Sink:
    """Base class of the monitor's sinks; every method is a no-op by default."""

    def write_step(self, step: int, rows: List[dict]) -> None:
        """Receive the records of one completed step (called at step boundaries)."""

    def write_anomaly(self, anomaly: Anomaly) -> None:
        """Receive an anomaly (before the monitor raises or warns)."""

    def write_warning(self, warning: Anomaly) -> None:
        """Receive an early warning (an Anomaly with ``severity == "warning"``; see
        :mod:`healthmon.rules`). Optional for duck-typed sinks: the monitor calls it only
        when present."""

    def close(self) -> None:
        """Flush and release resources; the monitor calls it once, at removal."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def call_sinks(sinks: List, method: str, *args) -> None:
    """``sink.<method>(*args)`` for every sink that has it. A sink that raises (a user's
    sink, a full disk) never breaks the training step: one warning names it and the error,
    and it is dropped from ``sinks`` (monitoring goes on)."""
    for sink in list(sinks):
        fn = getattr(sink, method, None)
        if fn is None:
            continue
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - whatever a sink raises
            import warnings
            warnings.warn(f"healthmon: the sink {type(sink).__name__} raised in {method}() "
                          f"({type(err).__name__}: {err}); it is dropped, monitoring goes "
                          "on", RuntimeWarning, stacklevel=3)
            if sink in sinks:
                sinks.remove(sink)


class MemorySink(Sink):
    """Keeps everything in memory: ``steps`` (``(step, rows)`` pairs), ``anomalies`` and
    ``warnings`` (notebooks, tests, trainer integrations)."""

    def __init__(self):
        self.steps: List[tuple] = []
        self.anomalies: List[Anomaly] = []
        self.warnings: List[Anomaly] = []

    def write_step(self, step: int, rows: List[dict]) -> None:
        self.steps.append((step, rows))

    def write_anomaly(self, anomaly: Anomaly) -> None:
        self.anomalies.append(anomaly)

    def write_warning(self, warning: Anomaly) -> None:
        self.warnings.append(warning)


# ----------------------------------------------------------------------------- JSON helpers

def _enc(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``"nan"``/``"inf"``/``"-inf"``."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _enc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _enc(value.item())
    return str(value)


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _dumps(obj: dict) -> str:
    """Compact strict JSON of a flat record; the slow recursive :func:`_enc` only when a
    value is non-finite or not a JSON type."""
    for v in obj.values():
        if v.__class__ is float and not math.isfinite(v):
            return _ENCODE(_enc(obj))
    try:
        return _ENCODE(obj)
    except (TypeError, ValueError):
        return _ENCODE(_enc(obj))


def _dec_stats(d: Optional[dict], keys: Optional[Iterable[str]] = None) -> Optional[dict]:
    """Turn the encoded non-finite strings of a stats dict back into floats (in place);
    only ``keys`` when given (a record's site or role is never touched)."""
    if d:
        for k in (d.keys() if keys is None else keys):
            v = d.get(k)
            if isinstance(v, str) and v in _NONFINITE_TEXT:
                d[k] = _NONFINITE_TEXT[v]
    return d


def stats_dict(stats: Any) -> Optional[dict]:
    """Plain dict of a ``TensorStats``/``LabelStats``-like object (None stays None)."""
    if stats is None:
        return None
    if hasattr(stats, "as_dict"):
        return dict(stats.as_dict())
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    if isinstance(stats, dict):
        return dict(stats)
    return {"repr": repr(stats)}


def anomaly_dict(anomaly: Anomaly) -> dict:
    """The JSON record of an anomaly (``type: "anomaly"``), stack as [file, line, name, text]."""
    return {
        "type": "anomaly", "step": anomaly.step, "rank": anomaly.rank,
        "site": anomaly.site, "phase": anomaly.phase, "role": anomaly.role,
        "call": anomaly.call, "kind": anomaly.kind, "module_type": anomaly.module_type,
        "stats": stats_dict(anomaly.stats), "last_healthy": stats_dict(anomaly.last_healthy),
        "stack": [[fr.filename, fr.lineno, fr.name, fr.line] for fr in anomaly.stack],
        "consequences": [{"site": c.site, "phase": c.phase, "role": c.role, "call": c.call,
                          "step": c.step, "kind": c.kind} for c in anomaly.consequences],
        "headline": anomaly.headline(), "report": anomaly.report(),
        "severity": anomaly.severity, "detail": anomaly.detail,
    }


def warning_dict(warning: Anomaly) -> dict:
    """The JSON record of an early warning (``type: "warning"``; same fields as
    :func:`anomaly_dict`). Readers that predate warnings skip the unknown type."""
    d = anomaly_dict(warning)
    d["type"] = "warning"
    return d


def rank_path(path: Union[str, os.PathLike], rank: Optional[int]) -> str:
    """Per-rank file name: ``rank_path("run.jsonl", 3) == "run.rank3.jsonl"``
    (``rank=None`` returns the path unchanged)."""
    path = os.fspath(path)
    if rank is None:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{int(rank)}{ext}"


# ----------------------------------------------------------------------------- JSONL

class JsonlSink(Sink):
    """One JSON line per record and per anomaly, with a size cap and rotation.

    Args:
        path: the log file (its directory is created). ``rank`` given: pass
            ``rank_path(path, rank)`` yourself to get one file per rank.
        max_bytes: rotate when the file would grow past this size (``None`` or 0: no cap).
            At most ``(backups + 1) * max_bytes`` bytes are kept on disk.
        backups: rotated files kept (``path.1`` newest ... ``path.N`` oldest); 0 truncates.
        rank, world_size: written into the header and every record (None when not
            distributed).
        local_rank: written into the header (the launcher's ``LOCAL_RANK``), with the host.
        flush_interval: seconds between flushes of step records (anomalies and
            :meth:`close` always flush and fsync; lines are never fsynced one by one).
        every: write the records of every ``every``-th step only (anomalies always).

    Every file (also after a rotation) starts with a ``type: "meta"`` header line. An
    existing log at ``path`` is replaced, its rotated files removed.

    A write that fails later (disk full, a vanished network mount: any ``OSError``) never
    reaches the training loop: one ``RuntimeWarning`` names the path and the error, the sink
    stops writing (``failed`` holds the error) and the monitor goes on.
    """

    def __init__(self, path: Union[str, os.PathLike], max_bytes: Optional[int] = 64 << 20,
                 backups: int = 3, rank: Optional[int] = None,
                 world_size: Optional[int] = None, flush_interval: float = 2.0,
                 every: int = 1, local_rank: Optional[int] = None):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, got {backups}")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes or None
        self.backups = int(backups)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.flush_interval = float(flush_interval)
        self.every = max(1, int(every))
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._file = None
        self.failed: Optional[OSError] = None
        self._size = 0
        self._last_flush = time.monotonic()
        for stale in _rotated_in_order(self.path)[:-1]:  # a previous run's rotations
            os.remove(stale)
        self._open()

    def _meta(self) -> dict:
        return {"type": "meta", "version": FORMAT_VERSION,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "unix_time": time.time(),
                "host": socket.gethostname(), "pid": os.getpid(), "rank": self.rank,
                "world_size": self.world_size, "local_rank": self.local_rank,
                "torch": torch.__version__}

    def _open(self) -> None:
        self._file = open(self.path, "wb")
        self._size = 0
        self._write_line(self._meta(), rotate=False)

    def _rotate(self) -> None:
        self._file.close()
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                src = f"{self.path}.{i}"
                if os.path.exists(src):
                    os.replace(src, f"{self.path}.{i + 1}")
            os.replace(self.path, f"{self.path}.1")
        self._open()

    def _write_line(self, obj: dict, rotate: bool = True) -> None:
        data = (_dumps(obj) + "\n").encode()
        if rotate and self.max_bytes and self._size + len(data) > self.max_bytes:
            self._rotate()
        self._file.write(data)
        self._size += len(data)

    def _usable(self) -> bool:
        if self.failed is not None:
            return False  # a write failed: warned once, nothing more is written
        if self._file is None:
            raise ValueError(f"JsonlSink({self.path!r}) is closed")
        return True

    def _fail(self, err: OSError) -> None:
        """Stop writing after a failed write: warn once (path and error), release the file."""
        self.failed = err
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()  # flushes the buffer again, which fails the same way
            except OSError:
                pass
        warnings.warn(f"healthmon: writing the log {self.path!r} failed ({err}); healthmon "
                      "stops writing this log and goes on monitoring (errors and warnings "
                      "are still raised). Free space or choose another path (log= / "
                      "HEALTHMON_LOG).", RuntimeWarning, stacklevel=2)

    def write_step(self, step: int, rows: List[dict]) -> None:
        """Append one ``type: "record"`` line per row."""
        if not self._usable() or step % self.every:
            return
        try:
            for row in rows:
                line = {"type": "record", "step": int(step)}
                if self.rank is not None:
                    line["rank"] = self.rank
                line.update(row)
                self._write_line(line)
            now = time.monotonic()
            if now - self._last_flush >= self.flush_interval:
                self._file.flush()
                self._last_flush = now
        except OSError as err:
            self._fail(err)

    def write_anomaly(self, anomaly: Anomaly) -> None:
        """Append the anomaly with its stats, stack and report; flush and fsync."""
        if not self._usable():
            return
        record = anomaly_dict(anomaly)
        if record["rank"] is None:
            record["rank"] = self.rank
        try:
            self._write_line(record)
            self._sync()
        except OSError as err:
            self._fail(err)

    def write_warning(self, warning: Anomaly) -> None:
        """Append the warning (``type: "warning"``); flushed with the step records."""
        if self._file is None:
            raise ValueError(f"JsonlSink({self.path!r}) is closed")
        record = warning_dict(warning)
        if record["rank"] is None:
            record["rank"] = self.rank
        self._write_line(record)

    def _sync(self) -> None:
        self._file.flush()
        try:
            os.fsync(self._file.fileno())
        except OSError:
            pass
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, fsync and close the file (idempotent; a failing flush warns, see above)."""
        if self._file is not None:
            try:
                self._sync()
                self._file.close()
                self._file = None
            except OSError as err:
                self._fail(err)


def _rotated_in_order(path: str) -> List[str]:
    """``path.N ... path.1, path`` (oldest first), those that exist."""
    older, i = [], 1
    while os.path.exists(f"{path}.{i}"):
        older.append(f"{path}.{i}")
        i += 1
    return older[::-1] + ([path] if os.path.exists(path) else [])


def expand_logs(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
                ) -> List[str]:
    """The log files named by ``paths``: an existing file (or one with rotated files) as is;
    a glob pattern (``"run.rank*.jsonl"``) expanded; a base name whose file does not exist
    (``run.jsonl``) replaced by its rank files ``run.rank<R>.jsonl``, in rank order.

    Raises:
        FileNotFoundError: a path that names no log, naming what was looked for.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: List[str] = []
    for path in paths:
        path = os.fspath(path)
        if _rotated_in_order(path):
            out.append(path)
            continue
        if glob.has_magic(path):
            found = sorted(glob.glob(path), key=_rank_order)
        else:
            root, ext = os.path.splitext(path)
            pattern = re.compile(re.escape(os.path.basename(root)) + r"\.rank(\d+)"
                                 + re.escape(ext) + "$")
            folder = os.path.dirname(path) or "."
            found = sorted((os.path.join(os.path.dirname(path), f) for f in os.listdir(folder)
                            if pattern.match(f)) if os.path.isdir(folder) else [],
                           key=_rank_order)
        if not found:
            raise FileNotFoundError(f"no healthmon log at {path!r} (nor rank files "
                                    f"{rank_path(path, 0)!r}, ...)")
        out.extend(found)
    return out


def _rank_order(path: str):
    m = re.search(r"\.rank(\d+)(\.[^./]*)?$", path)
    return (0, int(m.group(1)), path) if m else (1, 0, path)


def read_jsonl(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
               ) -> Tuple[List[dict], List[dict], List[dict]]:
    """Read and merge JSONL logs: ``(records, anomalies, metas)``.

    ``paths`` is one path or several (e.g. one per rank), or a base name / glob that
    :func:`expand_logs` turns into the rank files; each path's rotated files
    (``path.N`` ... ``path.1``) are read before it, oldest first. Records are sorted by
    step (stable: file and execution order kept within a step); anomalies by step, then
    phase (input, forward, backward, grad: the first rank's anomaly first). Encoded NaN/Inf
    become floats again. Records without a rank get the rank of their file's header. A
    truncated last line (a crash mid-write) is skipped.

    Raises:
        FileNotFoundError: when a path names no log (nor rank files, nor glob matches).
    """
    paths = expand_logs(paths)
    records: List[dict] = []
    anomalies: List[dict] = []
    metas: List[dict] = []
    for path in paths:
        path = os.fspath(path)
        files = _rotated_in_order(path)
        if not files:
            raise FileNotFoundError(f"no healthmon log at {path!r}")
        for name in files:
            file_rank = None
            with open(name, "rb") as f:
                for raw in f:
                    try:
                        obj = json.loads(raw)
                    except ValueError:
                        continue
                    kind = obj.get("type")
                    if kind == "record":
                        _dec_stats(obj, STAT_KEYS)
                        if obj.get("rank") is None and file_rank is not None:
                            obj["rank"] = file_rank
                        records.append(obj)
                    elif kind == "anomaly":
                        _dec_stats(obj.get("stats"))
                        _dec_stats(obj.get("last_healthy"))
                        if obj.get("rank") is None:
                            obj["rank"] = file_rank
                        anomalies.append(obj)
                    elif kind == "meta":
                        obj["file"] = name
                        file_rank = obj.get("rank")
                        metas.append(obj)
    records.sort(key=lambda r: r.get("step", 0))
    from .distributed import PHASE_ORDER
    anomalies.sort(key=lambda a: (a.get("step") or 0, PHASE_ORDER.get(a.get("phase"), 9)))
    return records, anomalies, metas


def read_warnings(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
                  ) -> List[dict]:
    """The early warnings (``type: "warning"`` lines) of JSONL logs, sorted by step; same
    path rules as :func:`read_jsonl`. Encoded NaN/Inf in their stats become floats again."""
    out: List[dict] = []
    for path in expand_logs(paths):
        for name in _rotated_in_order(os.fspath(path)):
            with open(name, "rb") as f:
                for raw in f:
                    if b'"warning"' not in raw:
                        continue
                    try:
                        obj = json.loads(raw)
                    except ValueError:
                        continue
                    if obj.get("type") == "warning":
                        _dec_stats(obj.get("stats"))
                        out.append(obj)
    out.sort(key=lambda w: w.get("step") or 0)
    return out


# ----------------------------------------------------------------------------- TensorBoard

def _tag(text: str) -> str:
    """TensorBoard-safe tag component (letters, digits, ``_ . / -``)."""
    return "".join(c if c.isalnum() or c in "_.-/" else "_" for c in text).strip("_") or "_"


class TensorBoardSink(Sink):
    """Scalars per site into TensorBoard.

    Tags: ``healthmon/grad_norm/<site>`` (phases ``grad`` and ``backward``),
    ``healthmon/act_absmax/<site>`` (``forward`` and ``input``), ``healthmon/loss/value``
    (the scalar backward ran on; ``value_<n>`` for the n-th backward of a step), ``healthmon/nonfinite/total``
    every logged step and ``healthmon/nonfinite/<phase>/<site>`` when non-zero; anomalies as
    text under ``healthmon/anomaly``. Parameter gradients are named ``<site>.<param>``.

    Args:
        log_dir: a directory, or an existing ``SummaryWriter`` (not closed by this sink).
        every: log scalars every ``every``-th step (anomalies always).
    Raises:
        ImportError: when tensorboard is not installed (``pip install tensorboard``).
    """

    def __init__(self, log_dir: Any, every: int = 1):
        if hasattr(log_dir, "add_scalar"):
            self.writer, self._owned = log_dir, False
        else:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("healthmon.TensorBoardSink needs the tensorboard package: "
                                  "pip install tensorboard") from err
            self.writer, self._owned = SummaryWriter(log_dir=os.fspath(log_dir)), True
        self.every = max(1, int(every))
        self.failed: Optional[OSError] = None

    def _fail(self, err: OSError) -> None:
        """A failed write (disk full): warn once, write nothing more, never raise."""
        self.failed = err
        where = getattr(self.writer, "log_dir", None) or type(self.writer).__name__
        warnings.warn(f"healthmon: writing TensorBoard events to {where!r} failed ({err}); "
                      "healthmon stops writing them and goes on monitoring.",
                      RuntimeWarning, stacklevel=3)

    def write_step(self, step: int, rows: List[dict]) -> None:
        """Write grad norm / activation absmax / non-finite scalars of the step."""
        if step % self.every or self.failed is not None:
            return
        try:
            self._write_step(step, rows)
        except OSError as err:
            self._fail(err)

    def _write_step(self, step: int, rows: List[dict]) -> None:
        add, total = self.writer.add_scalar, 0
        for row in rows:
            name, phase = _tag(row_name(row)), row.get("phase")
            if phase in ("grad", "backward"):
                add(f"healthmon/grad_norm/{name}", row["norm"], step)
            elif phase in ("forward", "input"):
                add(f"healthmon/act_absmax/{name}", row["absmax"], step)
            elif phase == "loss" and row.get("numel") == 1:  # the loss site (a scalar)
                call = f"_{row['call']}" if row.get("call") else ""  # n-th backward of the step
                add(f"healthmon/loss/{_tag(row.get('role', 'value'))}{call}", row["max"], step)
            bad = int(row.get("nan", 0)) + int(row.get("posinf", 0)) + int(row.get("neginf", 0))
            if bad:
                add(f"healthmon/nonfinite/{row.get('phase')}/{name}", bad, step)
            total += bad
        add("healthmon/nonfinite/total", total, step)

    def write_anomaly(self, anomaly: Anomaly) -> None:
        """The anomaly's report as text at its step; flushes."""
        if self.failed is not None:
            return
        text = "    " + anomaly.report().replace("\n", "\n    ")  # markdown code block
        try:
            self.writer.add_text("healthmon/anomaly", text, anomaly.step)
            self.writer.flush()
        except OSError as err:
            self._fail(err)

    def write_warning(self, warning: Anomaly) -> None:
        """The warning's report as text under ``healthmon/warning`` and a scalar
        ``healthmon/warning/<kind>/<site>`` = 1 at its step."""
        text = "    " + warning.report().replace("\n", "\n    ")
        self.writer.add_text("healthmon/warning", text, warning.step)
        self.writer.add_scalar(f"healthmon/warning/{warning.kind}/{_tag(warning.site)}", 1.0,
                               warning.step)

    def close(self) -> None:
        """Flush; close the writer when this sink created it."""
        try:
            if self.failed is None:
                self.writer.flush()
            if self._owned:
                self.writer.close()
        except OSError as err:
            if self.failed is None:
                self._fail(err)


# ----------------------------------------------------------------------------- logging

class LoggingSink(Sink):
    """Anomalies to Python logging, as a warning with the full report.

    Args:
        logger: defaults to ``logging.getLogger("healthmon")``.
        level: level of the anomaly messages (default ``logging.WARNING``).
    """

    def __init__(self, logger: Optional[logging.Logger] = None, level: int = logging.WARNING):
        self.logger = logger if logger is not None else logging.getLogger("healthmon")
        self.level = level

    def write_anomaly(self, anomaly: Anomaly) -> None:
        """Log the anomaly's report."""
        self.logger.log(self.level, "%s", anomaly.report())

    def write_warning(self, warning: Anomaly) -> None:
        """Log the warning's report (at ``level``)."""
        self.logger.log(self.level, "%s", warning.report())
