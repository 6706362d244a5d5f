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


class BadOptimizer(torch.optim.SGD):
    """SGD whose step writes NaN into the first weight at a given step (a broken update)."""

    def __init__(self, params, lr, nan_at):
        super().__init__(params, lr=lr)
        self.count, self.nan_at = 0, nan_at

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        if self.count == self.nan_at:
            self.param_groups[0]["params"][0][0, 0] = float("nan")
        self.count += 1


def run(nan_at=None, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = BadOptimizer(model.parameters(), 0.1, nan_at if nan_at is not None else -1)
    with healthmon.watch(model) as mon:
        for _ in range(steps):
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


def test_nan_written_by_the_update_is_reported_as_param_with_the_step_line():
    with pytest.raises(healthmon.HealthError) as info:
        run(nan_at=2)
    a = info.value.anomaly
    assert (a.site, a.phase, a.role, a.step, a.kind) == ("0", "param", "weight", 2, "nan")
    assert a.stats.nan == 1
    assert any("opt.step()" in (fr.line or "") for fr in a.user_frames())
