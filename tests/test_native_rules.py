"""The C++ early-warning rules (healthmon._C.RulesEngine) against the Python reference
(healthmon.rules.Rules): the same findings, in the same order, with the same texts and rows.

Both engines are fed the very same steps: on the real runs of tests/_warn_models.py (healthy
and degrading) a tee gives every decoded step to both; on random sequences (every signal
provoked: spikes, growth with and without a rising loss, dead outputs, frozen parameters,
vanishing gradients, overflow headroom, non-finite rows, evaluation steps) through the
``(site, row)`` interface.
"""
from __future__ import annotations

import random

import pytest
import torch

import healthmon
from healthmon import native_rules
from healthmon.native_rules import NativeRules
from healthmon.records import Site
from healthmon.rules import Rules, WarnConfig

import _warn_models as W

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def every_step(monkeypatch):
    monkeypatch.setenv("HEALTHMON_WARN_BUDGET", "1")


def _key(findings):
    return [(id(f.site), f.kind, f.detail, list(f.row)) for f in findings]


class Tee:
    """Both engines on every decoded step; fails on the first difference."""

    def __init__(self, config):
        self.reference, self.native = Rules(config), NativeRules(config)
        self.steps = self.findings = 0

    def evaluate_view(self, step, sites, hosts):
        want = self.reference.evaluate_view(step, sites, hosts)
        got = self.native.evaluate_view(step, sites, hosts)
        assert _key(got) == _key(want), f"step {step}: {got} != {want}"
        self.steps += 1
        self.findings += len(want)
        return got


RUNS = dict(W.HEALTHY, diverging_lr=W.run_diverging_lr, fp16_creep=W.run_fp16_creep,
            dead_relu=W.run_dead_relu, head_replaced=W.run_head_replaced,
            vanishing=W.run_vanishing, loss_spike=W.run_loss_spike,
            mse_overflow=W.run_mse_overflow)


def test_real_runs_give_the_same_findings(monkeypatch):
    tees = {}

    def create(config):
        tee = Tee(config)
        tees[name] = tee
        return tee

    monkeypatch.setattr(native_rules, "create", create)
    for name, run in RUNS.items():
        result = run()
        assert tees[name].steps >= 0.9 * result.steps, name
    # not vacuous: the degrading runs warned, each kind at least once across them
    assert sum(t.findings for n, t in tees.items() if n not in W.HEALTHY) >= 6
    assert all(tees[n].findings == 0 for n in W.HEALTHY)


def test_compiled_run_gives_the_same_findings(monkeypatch):
    """Under torch.compile the step's view mixes compiled and eager records (its order is
    merged per step): the engines still agree, step for step, up to the first warning."""
    tees = []

    def create(config):
        tees.append(Tee(config))
        return tees[-1]

    monkeypatch.setattr(native_rules, "create", create)
    torch.manual_seed(5)
    model = W._mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=1.08)
    batches = W._regression_batches()
    mon = healthmon.watch(model, on_anomaly="log")
    compiled = torch.compile(model, backend="aot_eager")
    try:
        for step in range(90):  # the loss spikes around step 60, overflows later
            x, y = batches(step)
            loss = torch.nn.functional.mse_loss(compiled(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        mon.check()
    finally:
        mon.remove()
    assert mon._rec.has_compiled
    assert tees[0].steps >= 80 and tees[0].findings >= 1
    # a warning on a compiled site carries the stack captured when it was traced
    assert mon.warnings and all(w.stack for w in mon.warnings), \
        [(w.site, w.phase) for w in mon.warnings if not w.stack]


def test_the_monitor_uses_the_native_engine_unless_switched_off(monkeypatch):
    model = torch.nn.Linear(2, 2)
    mon = healthmon.watch(model)
    assert isinstance(mon._rules, NativeRules)
    mon.remove()
    monkeypatch.setenv("HEALTHMON_FASTPATH", "0")
    mon = healthmon.watch(model)
    assert type(mon._rules) is Rules
    mon.remove()


# ----------------------------------------------------------------------------- random

def _row(rng, absmax, numel=6, zeros=0, bad=0, sumsq=None):
    absmax = float(absmax)
    sumsq = absmax * absmax * rng.uniform(0.3, 1.0) if sumsq is None else sumsq
    finite = numel - bad
    return [float(numel), float(bad), 0.0, 0.0, float(zeros), float(finite), -absmax, absmax,
            rng.uniform(-1, 1), sumsq, absmax]


def _sites():
    def site(name, phase, dtype=torch.float32, role="output", module=0, allow_inf=False):
        return Site(name, phase, role, 0, module, torch.device("cpu"), 0, allow_inf, dtype)
    out = [site("x", "input"), site("a", "forward"), site("h", "forward", torch.float16),
           site("b", "forward", torch.bfloat16), site("m", "forward", allow_inf=True),
           site("a", "backward", role="grad_output"), site("<loss>", "loss")]
    for i in range(4):  # parameters: a gradient and a value site sharing (module, name, role)
        out.append(site(f"p{i}", "grad", role="weight", module=i + 1))
        out.append(site(f"p{i}", "param", role="weight", module=i + 1))
    out.append(site("y", "label"))
    return out


def _step_rows(rng, sites, step, regime):
    """One step's rows: a healthy baseline with the regime's disturbance on some sites."""
    rows = []
    train = regime.get("eval_every") is None or step % regime["eval_every"]
    for site in sites:
        if not train and site.phase in ("backward", "grad", "loss", "param"):
            continue
        base = regime["scale"].get(site.name, 1.0) * rng.uniform(0.7, 1.3)
        if site.phase == "loss":
            base *= regime["loss_growth"] ** step
        if site.phase in ("grad", "backward"):
            base *= regime["grad_growth"] ** step
            if step in regime["vanish"]:
                base *= 1e-4
        if step in regime["spikes"] and site.name in regime["spike_sites"]:
            base *= 1e3
        if site.phase == "forward" and site.dtype in (torch.float16, torch.bfloat16):
            base *= regime["half_growth"] ** step
        zeros = 6 if (site.name in regime["dead"] and step >= regime["dead_from"]) else 0
        bad = 1 if step in regime["nonfinite"] and site.name == "a" else 0
        row = _row(rng, base if not zeros else 0.0, zeros=zeros, bad=bad)
        if site.phase == "param" and site.name in regime["frozen"] and step >= 5:
            row = [1.0 * v for v in regime.setdefault("frozen_row", row)]
        if site.phase == "label":
            row = [6.0, 0.0, 0.0, 0.0, 0.0, 6.0, 0.0, 3.0, 0.0, 0.0, 3.0]
        rows.append((site, row))
    if rng.random() < 0.3:  # execution order varies a little
        rows[1], rows[2] = rows[2], rows[1]
    return rows


def _regime(rng):
    return {
        "scale": {s: 10 ** rng.uniform(-3, 2) for s in ("a", "h", "b", "m", "p0", "p1", "p2")},
        "loss_growth": rng.choice([1.0, 1.0, 1.03, 0.98]),
        "grad_growth": rng.choice([1.0, 1.12, 0.97]),
        "half_growth": rng.choice([1.0, 1.3]),
        "spikes": set(rng.sample(range(15, 150), 6)),
        "spike_sites": set(rng.sample(["a", "<loss>", "p0", "p1", "h"], 2)),
        "vanish": set(range(rng.randrange(40, 80), rng.randrange(85, 120))),
        "dead": set(rng.sample(["a", "b", "p2"], 1)), "dead_from": rng.randrange(10, 60),
        "frozen": set(rng.sample(["p1", "p3"], 1)),
        "nonfinite": set(rng.sample(range(20, 150), 3)),
        "eval_every": rng.choice([None, 7]),
    }


def _config(rng):
    return WarnConfig(window=rng.choice([20, 50]), min_history=rng.choice([5, 10]),
                      growth_steps=rng.choice([10, 15, 19]), dead_steps=rng.choice([5, 20]),
                      frozen_steps=rng.choice([5, 20]), vanish_steps=rng.choice([3, 5]),
                      rearm_steps=rng.choice([3, 10]), spike_floor=rng.choice([1e-3, 0.5]))


def _compare(seed: int) -> set:
    """Both engines on one random sequence of 160 steps; the kinds that fired."""
    rng = random.Random(seed)
    regime, config = _regime(rng), _config(rng)
    reference, native = Rules(config), NativeRules(config)
    sites = _sites()
    kinds = set()
    for step in range(160):
        rows = _step_rows(rng, sites, step, regime)
        want = reference.evaluate(step, rows)
        got = native.evaluate(step, rows)
        assert _key(got) == _key(want), f"seed {seed} step {step}"
        kinds |= {f.kind for f in want}
    return kinds


SEEDS = range(12)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_sequences_give_the_same_findings(seed):
    assert _compare(seed), "the sequence provoked no finding: the comparison is vacuous"


def test_every_kind_is_compared():
    """Across the random sequences every rule fires at least once (else a rule's C++ twin
    would not be compared at all)."""
    seen = set()
    for seed in SEEDS:
        seen |= _compare(seed)
    assert seen == set(native_rules.KINDS)


def test_bad_rows_are_a_clear_error():
    native = NativeRules(WarnConfig())
    site = Site("a", "forward", "output", 0, 0, torch.device("cpu"), 0, False, torch.float32)
    with pytest.raises(ValueError, match="11 fields"):
        native.evaluate(0, [(site, [1.0, 0.0, 0.0])])
    with pytest.raises(ValueError, match="float64"):
        native._engine.evaluate([0], torch.zeros(1, 11, dtype=torch.float32))
    with pytest.raises(IndexError, match="unknown site id 7"):
        native._engine.evaluate([7], torch.zeros(1, 11, dtype=torch.float64))
    native._engine.set_order([0], [0], [5])
    with pytest.raises(IndexError, match="slot 5"):
        native._engine.evaluate_order([torch.zeros(2, 11, dtype=torch.float64)])


def test_count_fields_must_be_ints():
    with pytest.raises(ValueError, match="window is a number of records"):
        WarnConfig(window=50.5)
