"""Parameter records through healthmon._C.ParamPlan (csrc/param_plan.cpp): the same rows as
the Python path, the plan taken on every step where nothing changed, and left (then rebuilt)
when a parameter stops getting a gradient or changes dtype."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import healthmon
from healthmon import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="native extension not built (make build)")


class ParamRows:
    """A sink keeping, per step, the ``grad`` and ``param`` rows by (phase, site, role)."""

    def __init__(self):
        self.steps = []

    def write_step(self, step, rows):
        self.steps.append({(r["phase"], r["site"], r["role"]):
                           (r["numel"], r["nan"], round(r["sum"], 9), round(r["absmax"], 9))
                           for r in rows if r["phase"] in ("grad", "param")})


def train(monkeypatch, fast: bool, sync: bool):
    """8 steps; step 3 freezes the first weight, step 5 moves the model to float64, step 6
    puts a NaN in a weight's gradient. Returns the rows and, per step, the phases recorded
    on the Python path."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1" if fast else "0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    sink = ParamRows()
    mon = healthmon.watch(model, sinks=[sink], sync=sync, on_anomaly="log")
    python_path = []
    records = mon._param_records
    slow = records._record_tensors

    def counted(phase, items, sid):
        python_path[-1].append(phase)
        return slow(phase, items, sid)

    records._record_tensors = counted
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    for step in range(8):
        python_path.append([])
        if step == 3:
            model[0].weight.requires_grad_(False)
        if step == 5:
            model.double()
            x = x.double()
        poison = None
        if step == 6:  # a NaN in the weight's gradient before it is accumulated
            poison = model[2].weight.register_hook(
                lambda g: g.index_put((torch.tensor([0]), torch.tensor([0])),
                                      torch.tensor(float("nan"), dtype=g.dtype)))
        model(x).square().mean().backward()
        if poison is not None:
            poison.remove()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mon.check()
    mon.remove()
    return sink.steps, python_path, [(a.step, a.phase, a.site) for a in mon.anomalies]


@pytest.mark.parametrize("sync", [False, True])
def test_plan_rows_equal_the_python_path(monkeypatch, sync):
    fast, python_path, found = train(monkeypatch, True, sync)
    slow, _, slow_found = train(monkeypatch, False, sync)
    assert fast == slow and found == slow_found
    assert len(fast) == 8 and all(fast)
    assert found and found[0][:2] == (6, "grad")  # the NaN gradient, seen through the plan
    assert sum(k[0] == "param" for k in fast[0]) == 4
    assert sum(k[0] == "grad" for k in fast[3]) == 3  # the frozen weight has no gradient
    # the Python path only where something changed: the first step (plans built), the
    # first step without the frozen weight's gradient, the first float64 step (sync mode
    # records each gradient from its own hook, as it arrives: weights only here)
    want = [["grad", "param"], [], [], ["grad"], [], ["grad", "param"], [], []]
    assert python_path == [[p for p in s if not sync or p == "param"] for s in want]


def test_plan_follows_a_buffer_that_grew(monkeypatch):
    """A plan keeps buffer indexes, not tensors: when more calls per step grow (reallocate)
    the record buffers after the plan was built, its records land in the new tensors."""
    def run(fast: bool):
        monkeypatch.setenv("HEALTHMON_FASTPATH", "1" if fast else "0")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        sink = ParamRows()
        mon = healthmon.watch(model, sinks=[sink])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sizes = {}
        for step in range(6):
            calls = 1 if step < 3 else 40  # step 3: 40 forwards, new sites for each call
            loss = sum(model(torch.randn(3, 4)).square().mean() for _ in range(calls))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sizes[step] = {k: b.records.shape[0] for k, b in mon._rec.buffers.items()}
        mon.check()
        mon.remove()
        return sink.steps, sizes

    fast, sizes = run(True)
    slow, _ = run(False)
    assert any(sizes[5][k] > sizes[2][k] for k in sizes[2])  # a buffer did grow
    assert fast == slow and len(fast) == 6
    assert all(sum(k[0] == "param" for k in s) == 4 for s in fast)
