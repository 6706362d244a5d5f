"""Smoke tests of the benchmark scripts: tiny sizes, few iterations, valid JSON.

They prove that ``bench/kernel_bench.py``, ``bench/overhead.py``, ``bench/small.py`` and
``bench/compiled.py`` run end to end (on the native
extension when it is built, on the reference fallback otherwise) and that the JSON they
write has the fields the README tables are made from. Nothing here asserts a timing.
"""
import json
import math
import os
import subprocess
import sys

import pytest

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
    p = run("kernel_bench.py", "--device", "cpu", "--sizes", "1Ki,4Ki", "--dtypes", "fp32,bf16",
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
    """Every variant -- the real monitor's async / sync / off included -- runs a few steps of
    two tiny models, and the detection matrix runs against the monitor for real."""
    out = tmp_path / "overhead.json"
    p = run("overhead.py", "--device", "cpu", "--tiny", "--models", "mlp,transformer",
            "--rounds", "2", "--warmup", "1", "--steps-per-sample", "1", "--allow-reference",
            "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "healthmon ops path:" in p.stdout and "What each variant checks" in p.stdout
    assert "Detection matrix" in p.stdout and "ERROR" not in p.stdout
    d = json.loads(out.read_text())
    assert d["benchmark"] == "overhead"
    assert [m["model"] for m in d["models"]] == ["mlp", "transformer"]
    for m in d["models"]:
        assert set(m["variants"]) == {"none", "async", "sync", "anomaly", "naive", "off"}
        assert m["variants"]["none"]["ratio"] == pytest.approx(1.0)
        assert not m["setup_errors"] and not m["run_errors"], (m["setup_errors"], m["run_errors"])
        assert not m["anomalies_at_end"], m["anomalies_at_end"]  # clean steps stay clean
        for v, r in m["variants"].items():
            assert r["error"] is None, (v, r["error"])
            assert finite(r["ratio"]) and r["checks"]
            assert len(m["timing"]["variants"][v]["samples_s"]) == 2
    targets = {t["target"]: t for t in d["targets"]}
    assert "CPU transformer: async overhead" in targets  # timing targets: reported, not asserted

    det = {v: {c: r["verdict"] for c, r in cases.items()} for v, cases in d["detection"].items()}
    where = {v: {c: r["where"] for c, r in cases.items()} for v, cases in d["detection"].items()}
    cases = {"forward NaN", "forward Inf", "backward NaN", "backward Inf", "param grad NaN",
             "param grad Inf"}
    assert all(set(det[v]) == cases for v in det)
    assert not [(v, c, x) for v in det for c, x in det[v].items() if x.startswith("error")]
    # nothing watching: nothing noticed; HEALTHMON=off must behave exactly like that
    for v in ("none", "off"):
        assert all(x == "not detected" for x in det[v].values()), (v, det[v])
    # naive hooks check every tensor; detect_anomaly looks at NaN from backward functions only
    assert all(x.startswith("detected") for x in det["naive"].values()), det["naive"]
    assert {c for c, x in det["anomaly"].items() if x.startswith("detected")} == {
        "forward NaN", "backward NaN", "param grad NaN"}, det["anomaly"]
    # the monitor: everything, with a HealthError naming the probe's Inject module (site "1")
    for v in ("async", "sync"):
        assert all(x.startswith("detected") and "HealthError" in x for x in det[v].values()), \
            (v, det[v])
        for c, w in where[v].items():
            assert w["site"] == "1" and w["module_type"] == "Inject", (v, c, w)
            assert w["kind"] == ("nan" if c.endswith("NaN") else "inf"), (v, c, w)
            assert w["phase"] == {"forward": "forward", "backward": "backward",
                                  "param": "grad"}[c.split()[0]], (v, c, w)
    # sync raises inside the hook of the phase that produced the value; async (CPU) at the
    # step boundary, i.e. the optimizer's step hook
    assert det["sync"]["forward NaN"].startswith("detected in forward")
    assert det["sync"]["backward Inf"].startswith("detected in backward")
    assert det["sync"]["param grad NaN"].startswith("detected in backward")
    assert all(x.startswith("detected in optimizer") for x in det["async"].values()), det["async"]
    assert {t["target"]: t["status"] for t in d["targets"]}[
        "async: detects NaN and Inf in forward, backward and param grads"] == "PASS"


@pytest.fixture
def bench_on_path():
    """The bench scripts importable in-process for one test; afterwards their modules leave
    ``sys.modules`` too: a bench module named like an installed package (``models``,
    ``overhead``) would otherwise stand in for it in later tests (``bench/kernels.py`` did
    for Hugging Face's ``kernels`` package, which transformers imports)."""
    before = set(sys.modules)
    sys.path.insert(0, BENCH)
    try:
        yield
    finally:
        sys.path.remove(BENCH)
        for name in set(sys.modules) - before:
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(BENCH):
                del sys.modules[name]


def test_overhead_variants_in_process(bench_on_path):
    """(f) HEALTHMON=off attaches nothing; the process-wide loss guard belongs to the variant
    being stepped (the baseline's loss is never label-checked by another variant's monitor)."""
    import models as M
    import overhead as O
    from healthmon import labels
    import torch

    dev = torch.device("cpu")
    spec = M.build("mlp", dev, tiny=True)
    runners = {v: O.Runner(v, spec, dev) for v in ("none", "async", "sync", "off")}
    try:
        off = runners["off"]
        assert not off.mon.active
        assert all(not m._forward_hooks and not m._forward_pre_hooks
                   for m in off.model.modules())
        assert all(not p._post_accumulate_grad_hooks for p in off.model.parameters())
        for v in ("async", "sync"):
            assert runners[v].mon.active and runners[v].model.head._forward_hooks
        seen = {}

        def spy(v):
            def loss(out, target):
                seen[v] = list(labels._owners)
                return spec.loss_fn(out, target)
            return loss

        for v, r in runners.items():
            r.spec = M.BenchModel(spec.name, spec.model, spec.inputs, spec.target, spy(v),
                                  None, spec.lr, spec.description)
            r.step()
            r.step()
        assert seen["none"] == [] and seen["off"] == []
        assert seen["async"] == [runners["async"].mon]
        assert seen["sync"] == [runners["sync"].mon]
        assert runners["async"].mon.step_index == 2 and runners["sync"].mon.step_index == 2
    finally:
        for r in runners.values():
            r.finish()
    assert not labels.loss_guard_installed()


def test_refuses_reference_numbers():
    """Without the native ops and without --allow-reference, no numbers are published."""
    p = run("kernel_bench.py", "--device", "cpu", "--sizes", "1Ki", "--no-multi",
            env={"HEALTHMON_NO_EXT": "1"}, timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "REFERENCE" in p.stdout and "--allow-reference" in p.stderr


def test_small_smoke(tmp_path):
    """bench/small.py: every variant on the four tiny small models, host cost per record
    and the cProfile section present (nothing timed is asserted)."""
    out = tmp_path / "small.json"
    p = run("small.py", "--tiny", "--rounds", "2", "--warmup", "1", "--steps-per-sample", "1",
            "--profile", "deep", "--profile-steps", "2", "--allow-reference", "--json", str(out),
            timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Host time per recorded tensor" in p.stdout and "cProfile" in p.stdout
    d = json.loads(out.read_text())
    assert d["benchmark"] == "small"
    assert [m["model"] for m in d["models"]] == ["cnn", "lstm", "policy", "deep"]
    for m in d["models"]:
        assert set(m["variants"]) == {"none", "noop", "async", "sync", "off"}
        assert m["records_per_step"] > 0 and not m["run_errors"], m["run_errors"]
        assert not m["anomalies_at_end"], m["anomalies_at_end"]
        for v, r in m["variants"].items():
            assert r["error"] is None and finite(r["ratio"]), (v, r)
            assert finite(r["us_per_record"]), (v, r)
            assert len(m["timing"]["variants"][v]["samples_s"]) == 2
    assert d["profile"] and "function calls" in d["profile"]


def test_compiled_smoke(tmp_path):
    """bench/compiled.py: eager, compiled and compiled + watched on two tiny models with the
    aot_eager backend (no Inductor code generation in a smoke test); graph counts present."""
    out = tmp_path / "compiled.json"
    p = run("compiled.py", "--tiny", "--models", "deep,mlp", "--backend", "aot_eager",
            "--variants", "eager,compiled,compiled+noop,compiled+async",
            "--rounds", "2", "--warmup", "2", "--steps-per-sample", "1", "--allow-reference",
            "--json", str(out), timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Compiled step" in p.stdout
    d = json.loads(out.read_text())
    assert d["benchmark"] == "compiled"
    assert [m["model"] for m in d["models"]] == ["deep", "mlp"]
    for m in d["models"]:
        assert set(m["variants"]) == {"eager", "compiled", "compiled+noop", "compiled+async"}, \
            m["setup_errors"]
        assert m["variants"]["compiled"]["ratio"] == pytest.approx(1.0)
        assert not m["anomalies_at_end"], m["anomalies_at_end"]
        for v, r in m["variants"].items():
            assert r["error"] is None and finite(r["ratio"]), (v, r)
        for v in ("compiled", "compiled+noop", "compiled+async"):
            assert m["variants"][v]["graphs"] >= 1, (v, m["variants"][v])
            assert finite(m["variants"][v]["compile_s"])


def test_compile_pass_ab_smoke():
    """bench/compile_pass_ab.py: the three variants of a tiny deep stack, with Inductor."""
    p = run("compile_pass_ab.py", "--tiny", "--model", "deep", "--rounds", "2", "--steps", "2",
            timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["unwatched", "merged", "unmerged"]
