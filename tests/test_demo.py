"""The demo (`make demo`) with a reduced step count: healthy run clean, both bugs caught."""
from __future__ import annotations

import os
import re

import healthmon.demo as demo


def test_demo_runs_and_catches_both_bugs(tmp_path, capsys, monkeypatch):
    for var in ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG"):
        monkeypatch.delenv(var, raising=False)
    code = demo.main(steps=40, out_dir=str(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "anomalies: none, early warnings: none" in out
    # the growing learning rate: a HealthWarning steps before the first Inf
    assert "healthmon warning: spike in " in out
    m = re.search(r"first non-finite value \(.*\): (\d+) steps after the first warning", out)
    assert m and int(m.group(1)) >= 1, out
    assert "out-of-range labels in cross_entropy" in out and "255" in out
    assert "wraparound_loss" in out  # the user's loss line is in the report
    assert "NaN in head [Conv2d] (backward grad_output)" in out
    for name in ("run.jsonl", "index.html", "grad_norms.png"):
        path = tmp_path / name
        assert path.is_file() and os.path.getsize(path) > 0, name
