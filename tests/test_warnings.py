"""Early warnings (issue 16): zero false alarms on healthy runs, a warning before the first
non-finite value on degrading ones, the loss as a site, HealthWarning and its sinks.

The training runs live in tests/_warn_models.py (bench/warn_evidence.py measures the same
runs to justify the defaults). One torch thread: the runs are tiny and the machine shared.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import healthmon
from healthmon import loss_site
from healthmon.native_rules import NativeRules
from healthmon.rules import DTYPE_MAX, Rules, WarnConfig, resolve_warn
from healthmon.records import Site
from healthmon.sinks import read_jsonl, read_warnings

import _warn_models as W

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def every_step(monkeypatch):
    """The rules on every step: their time budget (a share of the step's wall time) would
    make which steps are judged depend on the machine's speed."""
    monkeypatch.setenv("HEALTHMON_WARN_BUDGET", "1")


def test_rules_cadence_follows_the_time_budget():
    import time
    from healthmon.rules import Cadence
    cheap, dear = Cadence(0.05), Cadence(0.05)
    for _ in range(5):
        assert cheap.due() and (dear.due() or True)
        time.sleep(0.002)
        cheap.spent(0.00001)  # 0.5% of a 2 ms step
        dear.spent(0.001)     # 50% of it
    assert cheap.interval == 1
    assert dear.interval >= 5  # k = cost / (budget * step)
    always = Cadence(1.0)
    always.due()
    time.sleep(0.001)
    always.due()
    always.spent(1.0)
    assert always.interval == 1


class Keep:
    """A duck-typed sink with no write_warning (old sinks must keep working)."""

    def __init__(self):
        self.steps = []

    def write_step(self, step, rows):
        self.steps.append((step, rows))

    def write_anomaly(self, anomaly):
        pass

    def close(self):
        pass


def _all(run):
    """Every warning of a run, the grouped ones (consequences) included."""
    out = []
    for w in run.warnings:
        out.append(w)
        out.extend(w.consequences)
    return out


# ----------------------------------------------------------------------------- healthy

@pytest.mark.parametrize("name", sorted(W.HEALTHY))
def test_healthy_runs_are_silent(name):
    keep = Keep()
    run = W.HEALTHY[name](sink=keep)
    assert run.error is None
    assert run.warnings == [], "\n".join(w.report() for w in run.warnings)
    assert run.caught == []
    # silence is not for lack of records: the loss, gradients and weights were all seen
    phases = {r["phase"] for _, rows in keep.steps for r in rows}
    assert {"loss", "grad", "param", "forward", "backward"} <= phases
    assert len(keep.steps) >= run.steps
    if name == "bf16_relu":  # the run is what it claims: sparse (not dead) activations
        sparsity = [r["zeros"] / r["numel"] for _, rows in keep.steps[10:] for r in rows
                    if r["site"] in ("act1", "act2") and r["phase"] == "forward"]
        assert 0.5 <= sum(sparsity) / len(sparsity) <= 0.9
        assert max(sparsity) < 1.0
    if name == "lstm":  # requires_grad=False parameters are never recorded (never frozen)
        assert not any(r["site"] == "emb" and r["phase"] in ("param", "grad")
                       for _, rows in keep.steps for r in rows)


# ----------------------------------------------------------------------------- degrading

def test_diverging_lr_warns_before_the_first_nonfinite_value():
    run = W.run_diverging_lr()
    assert run.error is not None, "the run was expected to diverge"
    assert run.warnings, "no early warning before the divergence"
    first = min(w.step for w in run.warnings)
    assert first < run.first_bad_step
    assert "spike" in run.kinds()
    # a warning names the code that produced its site, as an error does
    w = run.warnings[0]
    assert any(fr.name == "_train" and "model(x)" in (fr.line or "") for fr in w.stack), w.stack
    assert "produced by" in w.report()
    assert any(w.site == "<loss>" for w in _all(run) if w.step < run.first_bad_step)


def test_fp16_creep_warns_of_overflow_headroom_first():
    run = W.run_fp16_creep()
    assert run.error is not None and run.error.anomaly.kind == "inf"
    over = run.first("overflow")
    assert over is not None and over.site == "0.3" and over.phase == "forward"
    assert over.step < run.first_bad_step
    assert "float16" in over.detail and "65504" in over.detail
    assert over.stats.absmax > 0.25 * 65504


def test_dead_relu_warns_once_per_episode():
    kill_at, k = 60, WarnConfig().dead_steps
    run = W.run_dead_relu(kill_at=kill_at)
    assert run.error is None
    dead = [w for w in _all(run) if w.kind == "dead"]
    sites = [(w.site, w.phase, w.role) for w in dead]
    assert ("1", "forward", "output") in sites  # the ReLU after the killed layer
    assert ("0", "grad", "weight") in sites and ("0", "grad", "bias") in sites
    assert len(sites) == len(set(sites)), "a (kind, site) episode warned twice"
    assert all(w.step == kill_at + k - 1 for w in dead)
    assert not any(w.site == "3" for w in dead)  # the second ReLU is alive


def test_head_replaced_after_optimizer_is_frozen():
    run = W.run_head_replaced()
    frozen = {(w.site, w.role) for w in _all(run) if w.kind == "frozen"}
    assert frozen == {("head", "weight"), ("head", "bias")}
    assert "param_groups" in run.first("frozen").report()


def test_mse_overflow_is_an_error_at_the_loss_not_a_warning():
    run = W.run_mse_overflow(bad_at=30)
    assert run.error is not None
    a = run.error.anomaly
    assert (a.site, a.phase, a.kind, a.step) == ("<loss>", "loss", "inf", 30)
    assert a.consequences == []  # every model tensor of the step is finite: only the loss
    # the line of the loss: the backward call in the training loop
    assert any(fr.name == "_train" and "backward" in (fr.line or "") for fr in a.stack)
    assert "loss.backward()" in str(run.error)
    assert run.warnings == []


def test_vanishing_gradient_warns_while_loss_not_converged():
    run = W.run_vanishing()
    assert run.error is None
    van = [w for w in _all(run) if w.kind == "vanishing"]
    assert van and all(w.site == "0" and w.phase == "grad" for w in van)
    assert min(w.step for w in van) > 60


def test_loss_spike_is_a_warning():
    run = W.run_loss_spike(at=120)
    assert run.error is None
    at = [w for w in _all(run) if w.step == 120 and w.kind == "spike"]
    assert any(w.site == "<loss>" for w in at)
    assert not any(w.step < 120 for w in run.warnings)


# ----------------------------------------------------------------------------- API

def test_health_warning_carries_the_finding():
    run = W.run_dead_relu(steps=90)
    assert run.caught, "warnings.warn was not called"
    w = run.caught[0]
    assert isinstance(w, UserWarning) and isinstance(w, healthmon.HealthWarning)
    a = w.anomaly
    assert a is run.warnings[0] and a.severity == "warning"
    assert (w.kind, w.site, w.phase, w.step, w.stats, w.stack) == \
        (a.kind, a.site, a.phase, a.step, a.stats, a.stack)
    assert str(w) == a.report() and str(w).startswith(f"healthmon warning: {a.kind_text()}")


def test_warn_off_by_environment_and_argument(monkeypatch):
    assert W.run_dead_relu(steps=100, watch_kwargs={"warn": False}).warnings == []
    monkeypatch.setenv("HEALTHMON_WARN", "off")
    assert W.run_dead_relu(steps=100, watch_kwargs={"warn": True}).warnings == []
    monkeypatch.setenv("HEALTHMON_WARN", "maybe")
    with pytest.raises(ValueError, match="HEALTHMON_WARN"):
        healthmon.watch(nn.Linear(2, 2))


def test_warn_config_and_its_errors():
    run = W.run_dead_relu(steps=80, kill_at=60, watch_kwargs={"warn": {"dead_steps": 5}})
    assert min(w.step for w in run.warnings if w.kind == "dead") == 64
    with pytest.raises(TypeError, match="dead_step"):
        resolve_warn({"dead_step": 5})
    with pytest.raises(ValueError, match="headroom"):
        WarnConfig(headroom=2.0)
    with pytest.raises(TypeError, match="warn must be"):
        healthmon.watch(nn.Linear(2, 2), warn="yes")
    assert resolve_warn(None) == WarnConfig(budget=1.0)  # HEALTHMON_WARN_BUDGET=1 (fixture)
    assert resolve_warn(True, enabled=False) is None


def test_warn_budget_environment(monkeypatch):
    monkeypatch.delenv("HEALTHMON_WARN_BUDGET")
    assert resolve_warn(None) == WarnConfig() and WarnConfig().budget == 0.05
    monkeypatch.setenv("HEALTHMON_WARN_BUDGET", "0.2")
    assert resolve_warn(None).budget == 0.2
    monkeypatch.setenv("HEALTHMON_WARN_BUDGET", "fast")
    with pytest.raises(ValueError, match="HEALTHMON_WARN_BUDGET"):
        resolve_warn(None)


def test_warnings_in_jsonl_summary_and_tensorboard(tmp_path):
    class Writer:
        def __init__(self):
            self.text, self.scalars = [], []

        def add_text(self, tag, text, step):
            self.text.append((tag, step))

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def flush(self):
            pass
    writer = Writer()
    log = tmp_path / "run.jsonl"
    from healthmon.sinks import TensorBoardSink
    torch.manual_seed(0)
    model = W._mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", healthmon.HealthWarning)
        with healthmon.watch(model, log=str(log), sinks=[TensorBoardSink(writer), Keep()],
                             warn={"dead_steps": 3}) as mon:
            with torch.no_grad():
                model[0].bias.fill_(-100.0)
            for _ in range(5):
                loss = F.mse_loss(model(torch.randn(8, 8)), torch.zeros(8, 1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            mon.check()
            assert "early warnings (1):" in mon.summary()
            assert "dead in 1 [ReLU]" in mon.summary()
    ws = read_warnings(str(log))
    assert [(w["type"], w["kind"], w["site"], w["step"]) for w in ws] == \
        [("warning", "dead", "1", 2)]
    assert ws[0]["severity"] == "warning" and ws[0]["consequences"]
    records, anomalies, _ = read_jsonl(str(log))
    assert anomalies == [] and records  # old readers: warnings are not anomalies
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert any(x.get("phase") == "loss" for x in lines if x["type"] == "record")
    assert ("healthmon/warning", 2) in writer.text
    assert ("healthmon/warning/dead/1", 2) in writer.scalars
    assert ("healthmon/loss/value", 4) in writer.scalars  # the loss site, every step


# ----------------------------------------------------------------------------- loss site

def test_loss_recorded_before_backward_and_wrappers_removed():
    original = torch.Tensor.backward, torch.autograd.backward
    model = W._mlp()
    mon = healthmon.watch(model)
    assert loss_site.installed()
    loss = F.mse_loss(model(torch.randn(4, 8)), torch.zeros(4, 1))
    loss.backward()
    mon.step()
    rows = mon.records()
    order = [r["phase"] for r in rows]
    assert order.index("loss") < order.index("backward")
    assert [r["site"] for r in rows if r["phase"] == "loss"] == ["<loss>"]
    assert rows[order.index("loss")]["max"] == pytest.approx(loss.item())
    mon.remove()
    assert (torch.Tensor.backward, torch.autograd.backward) == original
    assert not loss_site.installed()


def test_several_losses_and_monitors():
    a, b = W._mlp(), W._mlp()
    ma, mb = healthmon.watch(a), healthmon.watch(b)
    x = torch.randn(4, 8)
    la, lb = a(x).pow(2).mean(), b(x).abs().mean()  # b's forward ran last: its step
    torch.autograd.backward([la, lb])
    mb.step()
    ma.step()
    assert [r["role"] for r in mb.records() if r["phase"] == "loss"] == ["value[0]", "value[1]"]
    assert not any(r["phase"] == "loss" for r in ma.records())
    ma.remove()
    assert loss_site.installed()  # still owned by mb
    mb.remove()
    assert not loss_site.installed()


def test_nonfinite_loss_raises_at_the_backward_line_in_sync_mode():
    model = W._mlp()
    with healthmon.watch(model, sync=True):
        loss = F.mse_loss(model(torch.randn(4, 8)), torch.full((4, 1), 1e30))
        with pytest.raises(healthmon.HealthError) as info:
            loss.backward()  # the line the error must name
        assert model[0].weight.grad is None  # raised before backward ran
    a = info.value.anomaly
    assert (a.site, a.phase, a.kind) == ("<loss>", "loss", "inf")
    assert a.user_frames()[0].line == "loss.backward()  # the line the error must name"


# ----------------------------------------------------------------------------- rules (unit)

@pytest.fixture(params=[Rules, NativeRules], ids=["python", "native"])
def engine(request):
    """The rules' two engines: the Python reference and the C++ one the monitor uses."""
    return request.param


def _site(phase="forward", dtype=torch.float32, name="s"):
    return Site(name, phase, "output", 0, 0, torch.device("cpu"), 0, False, dtype)


def _row(absmax=1.0, numel=4, zeros=0, sumsq=None):
    sumsq = absmax ** 2 if sumsq is None else sumsq
    return [numel, 0, 0, 0, zeros, numel, -absmax, absmax, 0.0, sumsq, absmax]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] +
                         [d for d in DTYPE_MAX if "float8" in str(d)])
def test_overflow_headroom_per_dtype(dtype, engine):
    rules, fmax = engine(WarnConfig(headroom=0.5)), DTYPE_MAX[dtype]
    site, loss = _site(dtype=dtype), _site("loss", name="<loss>")
    assert rules.evaluate(0, [(site, _row(0.49 * fmax)), (loss, _row(1.0))]) == []
    found = rules.evaluate(1, [(site, _row(0.51 * fmax)), (loss, _row(1.0))])
    assert [f.kind for f in found] == ["overflow"]
    assert rules.evaluate(2, [(site, _row(0.6 * fmax)), (loss, _row(1.0))]) == []  # episode
    f32 = _site(dtype=torch.float32, name="f32")
    assert engine(WarnConfig()).evaluate(0, [(f32, _row(1e38))]) == []


def test_spike_episode_rearms_after_clear_records(engine):
    cfg = WarnConfig(rearm_steps=3)
    rules, site = engine(cfg), _site("grad")
    loss = _site("loss", name="<loss>")
    kinds = []
    values = [1.0] * 20 + [100.0] + [1.0] * 3 + [100.0] + [1.0] + [100.0]
    for i, v in enumerate(values):
        kinds.append([f.kind for f in rules.evaluate(i, [(loss, _row(1.0)),
                                                         (site, _row(v))])])
    fired = [i for i, k in enumerate(kinds) if "spike" in k]
    assert fired == [20, 24]  # 24: re-armed after 3 clear records; 26: same episode


def test_health_warning_pickles_with_its_finding():
    import pickle
    run = W.run_head_replaced(steps=25)
    w = pickle.loads(pickle.dumps(run.caught[0]))
    assert isinstance(w, healthmon.HealthWarning)
    assert (w.kind, w.site, w.step) == ("frozen", "head", run.caught[0].step)
    assert str(w) == str(run.caught[0])


@pytest.mark.parametrize("loss_growth", [1.0, 1.05])
def test_growth_needs_a_rising_loss(loss_growth, engine):
    # 1.1x per record: no spike (robust deviation too small), but 45x over 40 records
    rules, site, loss = engine(WarnConfig()), _site("grad"), _site("loss", name="<loss>")
    kinds = []
    for i in range(60):
        found = rules.evaluate(i, [(loss, _row(loss_growth ** i)), (site, _row(1.1 ** i))])
        kinds += [(i, f.kind, f.site.name) for f in found]
    growth = [k for k in kinds if k[1] == "growth" and k[2] == "s"]
    if loss_growth == 1.0:  # flat loss: fitting, not diverging
        assert growth == []
    else:
        assert [k[0] for k in growth] == [40]  # once, as soon as 40 records span > 10x


def test_report_shows_warnings(tmp_path):
    pytest.importorskip("matplotlib")
    from healthmon.report import render_report
    log = tmp_path / "run.jsonl"
    W.run_dead_relu(steps=90, watch_kwargs={"log": str(log)})
    page = (tmp_path / "out" / "index.html")
    render_report(str(log), str(tmp_path / "out"))
    text = page.read_text()
    assert "early warnings</h2>" in text and "dead in 1 [ReLU]" in text
    assert (tmp_path / "out" / "heatmap_act.png").stat().st_size > 0


def test_all_zero_gradients_are_dead_not_a_crash(engine):
    cfg = WarnConfig(dead_steps=3)
    rules, grad, loss = engine(cfg), _site("grad"), _site("loss", name="<loss>")
    found = []
    for i in range(4):  # every gradient of the step exactly zero: no phase maximum
        found += rules.evaluate(i, [(loss, _row(1.0)), (grad, _row(0.0, zeros=4))])
    assert [(f.kind, f.site.name) for f in found] == [("dead", "s")]
