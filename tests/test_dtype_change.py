"""A watched model whose precision changes mid-run (``model.half()`` after float32 training,
an evaluation loop without autocast): its sites take the new dtype.

Before, a site kept the dtype of its first record: the overflow-headroom rule judged float16
values against float32's range (no warning), and every cached path (the C++ fast path, the
Python caches) saw a "new" dtype on every call and took the slow path for good.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import healthmon
from test_compile import python_forward_hooks


class Scale(nn.Module):
    """Multiplies by a fixed factor (a buffer: no parameter of its own)."""

    def __init__(self, factor: float):
        super().__init__()
        self.register_buffer("factor", torch.tensor(factor))

    def forward(self, x):
        return x * self.factor


def make():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
        lin.bias.zero_()
    return nn.Sequential(lin, Scale(1.0))


def step(model, x, opt):
    out = model(x)
    loss = out.float().mean() * 1e-8  # small gradients: nothing overflows in float16
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


@pytest.fixture(autouse=True)
def rules_every_step(monkeypatch):
    monkeypatch.setenv("HEALTHMON_WARN_BUDGET", "1")


@pytest.mark.parametrize("fast", ["1", "0"])
def test_a_model_switched_to_float16_is_judged_as_float16(monkeypatch, fast):
    monkeypatch.setenv("HEALTHMON_FASTPATH", fast)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = healthmon.watch(model, sync=False)
    try:
        x = torch.full((8, 4), 1.0)
        for _ in range(3):
            step(model, x, opt)
        model.half()
        model[1].factor.fill_(30000.0)  # |output| 30000: within float16, past its headroom
        for _ in range(3):
            step(model, x.half(), opt)
        mon.check()
        over = [w for w in mon.warnings if w.kind == "overflow"]
        assert over, f"no overflow warning: {[(w.kind, w.site) for w in mon.warnings]}"
        assert over[0].site == "1" and "float16" in over[0].detail, over[0].detail
        assert not mon.anomalies
        assert {r["site"] for r in mon.records() if r["phase"] == "forward"} == {"0", "1"}
    finally:
        mon.remove()


def test_fast_path_resumes_after_a_dtype_change():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon = healthmon.watch(model, sync=False)
    try:
        if mon._fast is None:
            pytest.skip("the C++ fast path is not built (extension missing)")
        x = torch.full((8, 4), 1.0)
        for _ in range(3):
            step(model, x, opt)
        model.double()
        for _ in range(2):  # the first calls in float64 take the Python path and re-prime
            step(model, x.double(), opt)
        _, python = python_forward_hooks(mon, lambda: step(model, x.double(), opt))
        # (index 0, the Sequential root, returns its last child's tensor: it records nothing
        # and always takes the Python path, before the change too)
        assert [i for i in python if i != 0] == [], f"modules on the Python path: {python}"
        mon.check()
        rows = {r["site"]: r for r in mon.records() if r["phase"] == "forward"}
        assert rows["1"]["max"] == 1.0
    finally:
        mon.remove()
