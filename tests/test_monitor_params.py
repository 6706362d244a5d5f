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
