"""Sinks against real files: JSONL round trip and rotation, TensorBoard event files, logging,
and the summary table."""
from __future__ import annotations

import json
import logging
import math
import os
import sys

import pytest

from healthmon.sinks import (JsonlSink, LoggingSink, TensorBoardSink, format_summary,
                             rank_path, read_jsonl)
from healthmon.summary import truncate_middle

sys.path.insert(0, os.path.dirname(__file__))
from _records import BAD_LAYER, BAD_STEP, make_anomaly, make_step  # noqa: E402


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def test_jsonl_round_trip_with_nan_and_inf(tmp_path):
    path = tmp_path / "run.jsonl"
    steps = {s: make_step(s, bad=(s == BAD_STEP)) for s in range(1, 4)}
    steps[3] = make_step(3, bad=True)
    steps[3][0].update(min=float("-inf"), max=float("inf"), rms=float("nan"))
    anomaly = make_anomaly(step=3)
    with JsonlSink(path, rank=None) as sink:
        for s, rows in steps.items():
            sink.write_step(s, rows)
        sink.write_anomaly(anomaly)
    for line in path.read_text().splitlines():  # strict JSON: no bare NaN/Infinity
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in the log"))
    records, anomalies, metas = read_jsonl(str(path))
    assert len(metas) == 1 and metas[0]["pid"] == os.getpid() and metas[0]["torch"]
    assert len(records) == sum(len(r) for r in steps.values())
    expected = [(s, row) for s, rows in steps.items() for row in rows]
    for rec, (s, row) in zip(records, expected):
        assert rec["step"] == s and rec["type"] == "record"
        for k, v in row.items():
            assert _same(rec[k], v), (k, rec[k], v)
    first = records[sum(len(steps[s]) for s in (1, 2))]
    assert first["min"] == -math.inf and first["max"] == math.inf and math.isnan(first["rms"])
    (a,) = anomalies
    assert a["site"] == BAD_LAYER and a["step"] == 3 and a["kind"] == "nan"
    assert a["stats"]["nan"] == 3 and a["stats"]["posinf"] == 1
    assert math.isnan(a["stats"]["rms"]) is False and a["last_healthy"]["numel"] == 4
    assert a["report"] == anomaly.report() and "decoder.1.conv" in a["headline"]
    fr = anomaly.stack[-1]
    assert a["stack"][-1] == [fr.filename, fr.lineno, fr.name, fr.line]
    assert a["consequences"][0]["site"] == "head"


def test_size_cap_and_rotation(tmp_path):
    path = tmp_path / "run.jsonl"
    max_bytes, backups = 20_000, 2
    rows = make_step(1)
    with JsonlSink(path, max_bytes=max_bytes, backups=backups) as sink:
        for s in range(1, 201):  # ~200 steps * ~6 KB: far over the cap
            sink.write_step(s, rows)
        sink.write_anomaly(make_anomaly(step=200))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["run.jsonl", "run.jsonl.1", "run.jsonl.2"]
    sizes = [os.path.getsize(tmp_path / f) for f in files]
    assert all(s <= max_bytes for s in sizes), sizes
    assert sum(sizes) <= (backups + 1) * max_bytes
    records, anomalies, metas = read_jsonl(path)
    assert len(metas) == 3  # every file starts with its header
    got = [r["step"] for r in records]
    assert got == sorted(got) and got[-1] == 200  # oldest kept ... newest, contiguous
    assert sorted(set(got)) == list(range(got[0], 201))  # newest kept, no gaps
    assert got[0] > 100  # the oldest were dropped: the cap holds
    assert len(anomalies) == 1
    with JsonlSink(path, max_bytes=max_bytes, backups=backups) as sink:  # a new run
        sink.write_step(1, rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.jsonl"]
    assert {r["step"] for r in read_jsonl(path)[0]} == {1}


def test_rank_files_and_merge(tmp_path):
    assert rank_path("run.jsonl", 3) == "run.rank3.jsonl"
    assert rank_path("logs/run", 0) == "logs/run.rank0"
    assert rank_path("run.jsonl", None) == "run.jsonl"
    paths = []
    for rank in range(2):
        p = rank_path(str(tmp_path / "run.jsonl"), rank)
        paths.append(p)
        with JsonlSink(p, rank=rank, world_size=2) as sink:
            for s in (1, 2):
                sink.write_step(s, make_step(s, seed=rank))
    records, anomalies, metas = read_jsonl(paths)
    assert [m["rank"] for m in metas] == [0, 1] and metas[0]["world_size"] == 2
    assert {r["rank"] for r in records} == {0, 1}
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    with pytest.raises(FileNotFoundError):
        read_jsonl(str(tmp_path / "missing.jsonl"))


def test_truncated_last_line_is_skipped(tmp_path):
    path = tmp_path / "run.jsonl"
    with JsonlSink(path) as sink:
        sink.write_step(1, make_step(1))
    with open(path, "a") as f:
        f.write('{"type": "record", "step": 2, "si')
    records, _, _ = read_jsonl(path)
    assert {r["step"] for r in records} == {1}


def test_tensorboard_event_files_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sink = TensorBoardSink(str(tmp_path / "tb"))
    for s in range(1, 6):
        sink.write_step(s, make_step(s, bad=(s == 5)))
    sink.write_anomaly(make_anomaly(step=5))
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "healthmon/grad_norm/encoder.0.conv.weight" in tags
    assert "healthmon/act_absmax/head" in tags
    events = acc.Scalars("healthmon/grad_norm/head.bias")
    assert [e.step for e in events] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(e.value) and e.value > 0 for e in events)
    total = {e.step: e.value for e in acc.Scalars("healthmon/nonfinite/total")}
    assert total[1] == 0 and total[5] > 0
    assert f"healthmon/nonfinite/forward/{BAD_LAYER}" in tags
    assert f"healthmon/nonfinite/grad/{BAD_LAYER}.weight" in tags
    assert "healthmon/anomaly/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_accepts_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(tmp_path / "tb"))
    sink = TensorBoardSink(writer)
    sink.write_step(1, make_step(1))
    sink.close()
    writer.add_scalar("still/open", 1.0, 1)  # the sink does not close a writer it was given
    writer.close()


def test_logging_sink(caplog):
    anomaly = make_anomaly()
    sink = LoggingSink()
    sink.write_step(1, make_step(1))  # steps are not logged
    with caplog.at_level(logging.WARNING, logger="healthmon"):
        sink.write_anomaly(anomaly)
    (rec,) = caplog.records
    assert rec.name == "healthmon" and rec.levelno == logging.WARNING
    assert rec.getMessage() == anomaly.report()
    sink.close()


def test_summary_worst_first_and_width():
    rows = make_step(3, bad=True)
    table = format_summary(rows, width=100)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["site", "phase", "numel"]
    assert all(len(line) <= 100 for line in lines)
    first_bad = min((r for r in rows if r["nan"] or r["posinf"]), key=lambda r: r["order"])
    assert lines[2].startswith(first_bad["site"][:10])
    n_bad = sum(1 for r in rows if r["nan"] or r["posinf"] or r["neginf"])
    body = lines[2:]
    assert all(int(line.split()[3]) + int(line.split()[4]) > 0 for line in body[:n_bad])
    assert body[n_bad].split()[0].startswith("head")  # then the largest absmax
    assert len(body) == len(rows)
    narrow = format_summary(rows, width=60)
    assert all(len(line) <= 60 for line in narrow.splitlines())
    assert "NaN" in narrow.splitlines()[0] and "..." in narrow  # long name cut in the middle
    assert format_summary(rows, width=120, limit=5).endswith(f"{len(rows) - 5} more rows")
    assert truncate_middle("encoder.layers.3.linear1", 12) == "encod...ear1"
    assert format_summary([]) == "(no records)"
