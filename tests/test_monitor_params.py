"""Phase ``param``: parameters recorded after each training step's update."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import healthmon


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG"):
        monkeypatch.delenv(var, raising=False)


def run(inf_lr_at=None, steps=4):
    """SGD; at step ``inf_lr_at`` the learning rate becomes Inf (a warm-up schedule that
    divides by zero): the gradients are finite, the updated weights are not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with healthmon.watch(model) as mon:
        for step in range(steps):
            if step == inf_lr_at:
                opt.param_groups[0]["lr"] = float("inf")
            model(torch.randn(3, 6)).pow(2).mean().backward()
            opt.step()  # the update line
            opt.zero_grad()
        mon.check()
        return mon


def test_parameters_are_recorded_with_their_norms_after_the_update():
    mon = run()
    params = [r for r in mon.records() if r["phase"] == "param"]
    assert [(r["site"], r["role"]) for r in params] == [
        ("0", "weight"), ("0", "bias"), ("2", "weight"), ("2", "bias")]
    model_norm = params[0]["norm"]
    assert model_norm > 0 and params[0]["numel"] == 30


def test_weights_broken_by_the_update_are_reported_as_param_with_the_step_line():
    with pytest.raises(healthmon.HealthError) as info:
        run(inf_lr_at=2)
    a = info.value.anomaly
    assert (a.site, a.phase, a.role, a.step) == ("0", "param", "weight", 2)
    assert a.stats.nonfinite > 0
    assert any("opt.step()" in (fr.line or "") for fr in a.user_frames())


def test_every_step_records_each_parameter_and_gradient_in_its_own_slot():
    """From the second step on, parameters and gradients take the cached plan (one native
    call per buffer): each record must still hold its own tensor's statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2, bias=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    class Keep:
        def write_step(self, step, rows):
            seen.append(rows)

        def write_anomaly(self, anomaly):
            pass

        def close(self):
            pass

    with healthmon.watch(model, sinks=[Keep()]) as mon:
        for step in range(4):
            model(torch.randn(3, 6)).pow(2).mean().backward()
            grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
            opt.step()
            weights = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            opt.zero_grad()
            mon.check()
            rows = seen[-1]
            for phase, truth in (("grad", grads), ("param", weights)):
                got = {f'{r["site"]}.{r["role"]}': r for r in rows if r["phase"] == phase}
                assert sorted(got) == sorted(truth), (step, phase)
                for name, t in truth.items():
                    assert got[name]["norm"] == pytest.approx(t.norm().item(), rel=1e-5)
                    assert got[name]["sum"] == pytest.approx(t.sum().item(), rel=1e-5,
                                                              abs=1e-6)
