"""`render_report` and `python -m healthmon report` on a log written by JsonlSink."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

from healthmon.report import render_report  # noqa: E402
from healthmon.sinks import JsonlSink  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _records import BAD_STEP, make_anomaly, make_step  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_log(tmp_path_factory):
    """19 healthy steps, then the bad step with its anomaly (as the monitor writes it)."""
    path = tmp_path_factory.mktemp("log") / "run.jsonl"
    with JsonlSink(path) as sink:
        for s in range(1, BAD_STEP + 1):
            sink.write_step(s, make_step(s, bad=(s == BAD_STEP)))
        sink.write_anomaly(make_anomaly(step=BAD_STEP))
    return str(path)


@pytest.fixture(scope="module")
def healthy_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "healthy.jsonl"
    with JsonlSink(path) as sink:
        for s in range(1, 21):
            sink.write_step(s, make_step(s))
    return str(path)


def _pngs(out_dir) -> list:
    return sorted(f for f in os.listdir(out_dir) if f.endswith(".png"))


def _check_pngs(out_dir, names):
    for name in names:
        with open(os.path.join(out_dir, name), "rb") as f:
            data = f.read()
        assert data[:8] == PNG and len(data) > 5000, name


def test_report_with_anomaly(run_log, tmp_path):
    out = tmp_path / "report"
    index = render_report([run_log], str(out))
    assert index == os.path.join(str(out), "index.html") and os.path.getsize(index) > 0
    names = _pngs(out)
    assert names == ["activations.png", "anomaly.png", "grad_norms.png", "heatmap_act.png",
                     "heatmap_grad.png"]
    _check_pngs(out, names)
    page = open(index, encoding="utf-8").read()
    assert sorted(re.findall(r"<img src='([^']+)'", page)) == names
    assert f"step {BAD_STEP}" in page and "decoder.1.conv" in page
    assert "1 anomaly" in page and "test_report.py" in page  # the stack is in the page


def test_report_healthy_chosen_step(healthy_log, tmp_path):
    out = tmp_path / "report"
    index = render_report(healthy_log, str(out), step=7)
    names = _pngs(out)
    assert names == ["activations.png", "grad_norms.png", "heatmap_act.png",
                     "heatmap_grad.png"]
    _check_pngs(out, names)
    page = open(index, encoding="utf-8").read()
    assert "bars for step 7" in page and "no anomalies" in page
    with pytest.raises(ValueError, match="no records at step 99"):
        render_report(healthy_log, str(tmp_path / "other"), step=99)


def test_cli_report(run_log, tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "healthmon", "report", run_log, "-o", str(out),
                          "--step", "10"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == os.path.join(str(out), "index.html")
    assert len(_pngs(out)) == 5
    bad = subprocess.run([sys.executable, "-m", "healthmon", "report",
                          str(tmp_path / "nope.jsonl")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1 and "no healthmon log" in bad.stderr
