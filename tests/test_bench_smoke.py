"""Smoke tests of the benchmark scripts: tiny sizes, few iterations, valid JSON.

They prove that ``bench/kernels.py`` and ``bench/overhead.py`` run end to end (on the native
extension when it is built, on the reference fallback otherwise) and that the JSON they
write has the fields the README tables are made from. Nothing here asserts a timing.
"""
import json
import math
import os
import subprocess
import sys

import pytest

import healthmon
from healthmon import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


def run(script, *args, env=None, timeout=120):
    e = dict(os.environ)
    e.pop("HEALTHMON", None)
    e.update(env or {})
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=ROOT,
                          env=e, capture_output=True, text=True, timeout=timeout)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_kernels_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    p = run("kernels.py", "--device", "cpu", "--sizes", "1Ki,4Ki", "--dtypes", "fp32,bf16",
            "--rounds", "2", "--warmup", "1", "--target-s", "0.002", "--multi-count", "12",
            "--multi-d", "16", "--allow-reference", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "healthmon ops path:" in p.stdout
    assert "composite/fused" in p.stdout and "Targets (issue 2)" in p.stdout
    d = json.loads(out.read_text())
    assert d["benchmark"] == "kernels"
    assert d["ops_path"]["native"] == ops.extension_available()
    assert {(r["dtype"], r["n"]) for r in d["single"]} == {
        ("fp32", 1024), ("fp32", 4096), ("bf16", 1024), ("bf16", 4096)}
    for r in d["single"]:
        assert finite(r["fused_over_sum"]) and finite(r["composite_over_fused"])
        # the composites compute the same statistics as the fused op
        assert all(r["agrees_with_fused"].values()), r["agrees_with_fused"]
    assert d["multi"]["tensors"] == 12 and d["multi"]["agrees_with_loop"]
    assert finite(d["multi"]["loop_over_multi"])
    assert d["targets"] and d["machine"]["torch"]


def test_overhead_smoke(tmp_path):
    out = tmp_path / "overhead.json"
    p = run("overhead.py", "--device", "cpu", "--tiny", "--models", "mlp", "--rounds", "2",
            "--warmup", "1", "--steps-per-sample", "1", "--allow-reference", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "healthmon ops path:" in p.stdout and "What each variant checks" in p.stdout
    d = json.loads(out.read_text())
    assert d["benchmark"] == "overhead"
    (m,) = d["models"]
    assert m["model"] == "mlp"
    assert set(m["variants"]) == {"none", "async", "sync", "anomaly", "naive", "off"}
    assert m["variants"]["none"]["ratio"] == pytest.approx(1.0)
    expected_ok = ["anomaly", "naive"]
    if hasattr(healthmon, "watch"):
        expected_ok += ["async", "sync", "off"]
    for v in expected_ok:
        assert m["variants"][v]["error"] is None, (v, m["variants"][v]["error"])
        assert finite(m["variants"][v]["ratio"])
        assert m["variants"][v]["checks"]
    det = d["detection"]
    # the baseline never notices; naive hooks check every tensor, so they notice everything;
    # detect_anomaly does not look at Inf.
    assert all(v == "not detected" for v in det["none"].values())
    assert all(v.startswith("detected") for v in det["naive"].values())
    assert det["anomaly"]["backward Inf"] == "not detected"
    if hasattr(healthmon, "watch"):
        for v in ("async", "sync"):
            assert all(x.startswith("detected") for x in det[v].values()), (v, det[v])


def test_refuses_reference_numbers():
    """Without the native ops and without --allow-reference, no numbers are published."""
    p = run("kernels.py", "--device", "cpu", "--sizes", "1Ki", "--no-multi",
            env={"HEALTHMON_NO_EXT": "1"}, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "REFERENCE" in p.stdout and "--allow-reference" in p.stderr
