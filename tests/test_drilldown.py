"""Issue 15: in sync mode the first anomaly names the exact operation, its line and why.

Each shape of bug is written the way people write it; the test checks the op, the user's
line (found in this file by its text, never hard-coded) and the input summary.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import healthmon
from healthmon import drilldown, errors


def line_of(obj, text: str) -> int:
    lines, start = inspect.getsourcelines(obj)
    for i, line in enumerate(lines):
        if text in line:
            return start + i
    raise AssertionError(f"{text!r} not in {obj}")


def user_lines(op) -> list:
    return [fr.lineno for fr in op.user_frames() if fr.filename == __file__]


def raise_sync(model, fn):
    """Run ``fn()`` under a sync monitor of ``model``; return the HealthError's anomaly."""
    with pytest.raises(healthmon.HealthError) as info:
        with healthmon.watch(model, sync=True):
            fn()
    return info.value.anomaly, str(info.value)


# --------------------------------------------------------------------------- custom forwards

class Attention(nn.Module):
    """Hand-written attention with an entropy bonus: log of a softmax that underflows."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        p = scores.softmax(-1)
        logp = torch.log(p)
        entropy = -(p * logp).sum(-1, keepdim=True)
        return v + entropy


class NoEpsNorm(nn.Module):
    """A layer norm written by hand, without eps."""

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        sd = x.std(-1, keepdim=True)
        return (x - mu) / sd


def test_custom_forward_log_names_op_and_line():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), Attention())
    with torch.no_grad():
        model[1].q.weight.mul_(1000)  # sharp attention: p underflows to 0
    x = torch.randn(2, 4, 8)
    anomaly, text = raise_sync(model, lambda: model(x).sum().backward())
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op == "aten::log" and op.phase == "forward"
    assert user_lines(op)[0] == line_of(Attention.forward, "torch.log(p)")
    assert "log received" in op.summary and "zeros" in op.summary
    assert "aten::log" in text and "logp = torch.log(p)" in text


def test_custom_layer_norm_without_eps_names_division():
    model = nn.Sequential(nn.Linear(4, 8), NoEpsNorm(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)  # constant rows: sd == 0
    anomaly, _ = raise_sync(model, lambda: model(torch.randn(3, 4)).sum().backward())
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op == "aten::div"
    assert user_lines(op)[0] == line_of(NoEpsNorm.forward, "/ sd")
    assert "divisor has 3 zeros" in op.summary


# --------------------------------------------------------------------------- stock modules

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8, eps=0.0)

    def forward(self, x):
        h = self.proj(x)
        return self.norm(h)


def test_stock_module_names_inner_op_and_the_calling_line():
    model = nn.Sequential(Block(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].proj.weight.zero_()
        model[0].proj.bias.zero_()  # zero variance, eps 0
    anomaly, text = raise_sync(model, lambda: model(torch.randn(3, 4)).sum().backward())
    assert anomaly.site == "0.norm"
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op == "aten::native_layer_norm"
    assert user_lines(op)[0] == line_of(Block.forward, "self.norm(h)")
    assert any(fr.filename.endswith("torch/nn/functional.py") for fr in op.library_frames())
    assert "inside libraries" in text


def test_stock_root_module_overflow_names_linear():
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.weight.fill_(3e38)
    x = torch.full((2, 4), 10.0)
    anomaly, _ = raise_sync(lin, lambda: lin(x))
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op in ("aten::addmm", "aten::linear", "aten::mm")
    assert "overflow" in op.summary
    # the user's line is the call of the module (the root): here, the lambda above
    assert user_lines(op)[0] == line_of(test_stock_root_module_overflow_names_linear,
                                        "lambda: lin(x)")


# --------------------------------------------------------------------------- backward

class Distance(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        norm = torch.sqrt((h ** 2).sum(-1, keepdim=True))
        return h, norm


def test_backward_sqrt_at_zero_names_node_and_forward_line():
    model = nn.Sequential(nn.Linear(4, 4), Distance())
    with torch.no_grad():
        model[1].lin.weight.zero_()
        model[1].lin.bias.zero_()  # h == 0: sqrt(0), derivative infinite

    def step():
        h, norm = model(torch.randn(3, 4))
        norm.sum().backward()

    anomaly, text = raise_sync(model, step)
    assert anomaly.phase in ("backward", "grad")
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op == "SqrtBackward0" and op.phase == "backward"
    assert user_lines(op)[0] == line_of(Distance.forward, "torch.sqrt(")
    assert "sqrt backward at 0" in op.summary and "3 outputs" in op.summary
    assert "SqrtBackward0" in text


class SafeRatio(nn.Module):
    def forward(self, a, b):
        return torch.where(b != 0, a / b, torch.zeros_like(a))


class RatioModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.ratio = SafeRatio()

    def forward(self, x, b):
        return self.ratio(self.lin(x), b)


def test_backward_where_untaken_division_names_div_backward():
    model = RatioModel()
    b = torch.ones(3, 4)
    b[1, 2] = 0.0
    anomaly, _ = raise_sync(model, lambda: model(torch.randn(3, 4), b).sum().backward())
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op == "DivBackward0"
    assert user_lines(op)[0] == line_of(SafeRatio.forward, "a / b")
    assert "divisor has 1 zero" in op.summary


# --------------------------------------------------------------------------- outside modules

def test_loss_code_outside_modules_seed_002():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(6, 8)
    div = torch.rand(6, 4) + 0.5
    div[2, 1] = 0.0

    def step():
        y = model(x) / div
        loss = y[div > 0].pow(2).mean()
        loss.backward()

    anomaly, text = raise_sync(model, step)
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op == "DivBackward0"
    assert not op.certain  # the line is a source match, and the report says so
    assert user_lines(op)[0] == line_of(step, "model(x) / div")
    assert "divisor has 1 zero" in op.summary
    assert "best guess" in text


class MaskedRatioLoss(nn.Module):
    def forward(self, pred, div, mask):
        y = pred / div
        return y[mask].sum()


def watched_loss_module(named_args: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    crit = MaskedRatioLoss()
    x, div = torch.randn(6, 8), torch.rand(6, 4) + 0.5
    div[2, 1] = 0.0
    with pytest.raises(healthmon.HealthError) as info:
        with healthmon.watch(model, crit, sync=True):
            if named_args:
                pred, mask = model(x), div != 0
                loss = crit(pred, div, mask)
            else:  # temporaries: gone by backward time, the module cannot be replayed
                loss = crit(model(x), div, div != 0)
            loss.backward()
    op = info.value.anomaly.operation
    assert op is not None, info.value.anomaly.drilldown
    assert op.op == "DivBackward0"
    assert "divisor has 1 zero:" in op.summary
    return op


def test_watched_loss_module_gets_its_exact_line():
    op = watched_loss_module(named_args=True)
    assert op.certain
    assert user_lines(op)[0] == line_of(MaskedRatioLoss.forward, "pred / div")


def test_watched_loss_module_with_temporary_args_falls_back_to_the_probe():
    op = watched_loss_module(named_args=False)
    assert not op.certain and "probe" in op.how


def test_loss_probe_does_not_record_twice_and_uninstalls(monkeypatch):
    """A loss with a node the pre-backward walk flags (a power with a tensor exponent of a
    ReLU output: base 0, yet smooth there) makes the probe compute loss-side gradients:
    the records must be those of the same monitor without the drill-down."""
    calls = []

    def run(drill: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        original, grad = torch.Tensor.backward, torch.autograd.grad
        if not drill:  # the same sync monitor without the backward wrappers
            monkeypatch.setattr(drilldown, "install", lambda d: None)
            monkeypatch.setattr(drilldown, "uninstall", lambda d: None)
        else:
            monkeypatch.setattr(torch.autograd, "grad",
                                lambda *a, **k: calls.append(1) or grad(*a, **k))
        with healthmon.watch(model, sync=True) as mon:
            assert drilldown.installed() == drill
            for _ in range(2):
                out = model(torch.randn(3, 4)).relu()  # zeros: PowBackward1 is flagged
                (out ** torch.tensor(2.0)).mean().backward()
            mon.check()
            rows = mon.records()
            assert not mon.anomalies
        monkeypatch.undo()
        assert torch.Tensor.backward is original and not drilldown.installed()
        return [(r["site"], r["phase"], r["role"], r["nan"], r["norm"]) for r in rows]
    assert run(True) == run(False)
    assert calls  # the probe did compute gradients


# --------------------------------------------------------------------------- in place

class ShiftSqrt(nn.Module):
    """Modifies its input in place and returns it: the monitor saw that tensor healthy as
    the previous module's output, so the NaN first shows in the next module."""

    def forward(self, x):
        x.sub_(2).sqrt_()
        return x


def test_inplace_op_on_module_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), ShiftSqrt(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.mul_(0.1)
    anomaly, _ = raise_sync(model, lambda: model(torch.randn(3, 4)).sum().backward())
    assert anomaly.site == "2"  # the module blamed without the drill-down
    op = anomaly.operation
    assert op is not None, anomaly.drilldown
    assert op.op == "aten::sqrt_"
    assert user_lines(op)[0] == line_of(ShiftSqrt.forward, "sqrt_()")
    assert "negative" in op.summary
    assert "whole forward" in op.how


# --------------------------------------------------------------------------- no side effects

class NormThenLog(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return torch.log(self.drop(self.bn(x)))


def test_replay_leaves_buffers_rng_and_inputs_as_they_were(monkeypatch):
    def run(drill: bool):
        torch.manual_seed(0)
        model = NormThenLog()
        x = torch.randn(8, 4)
        if not drill:
            monkeypatch.setattr(drilldown.Drilldown, "explain", lambda *a: None)
        with pytest.raises(healthmon.HealthError) as info:
            with healthmon.watch(model, sync=True):
                model(x)
        monkeypatch.undo()
        return (model.bn.running_mean.clone(), model.bn.num_batches_tracked.clone(),
                torch.get_rng_state(), x.clone(), info.value.anomaly)
    with_drill, without = run(True), run(False)
    for a, b in zip(with_drill[:4], without[:4]):
        assert torch.equal(a, b)
    assert with_drill[4].operation is not None and with_drill[4].operation.op == "aten::log"
    assert without[4].operation is None


def test_healthy_run_replays_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a replay ran while healthy")
    monkeypatch.setattr(drilldown, "_replay_forward", boom)
    monkeypatch.setattr(drilldown, "_replay_backward", boom)
    monkeypatch.setattr(drilldown, "first_bad_node", boom)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with healthmon.watch(model, sync=True) as mon:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(3, 4)).pow(2).mean().backward()
            opt.step()
    assert not mon.anomalies


# --------------------------------------------------------------------------- report text

def test_async_report_says_how_to_get_the_operation():
    model = nn.Sequential(nn.Linear(4, 8), NoEpsNorm())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.fill_(1.0)
    with pytest.raises(healthmon.HealthError) as info:
        with healthmon.watch(model, sync=False) as mon:
            model(torch.randn(3, 4))
            mon.check()
    assert info.value.anomaly.operation is None
    assert errors.SYNC_HINT in str(info.value)


def test_library_frames_are_not_your_code(tmp_path):
    lib = str(tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "transformers" /
              "trainer.py")
    mine = str(tmp_path / "train.py")
    stack = [errors.traceback.FrameSummary(mine, 10, "<module>", line="trainer.train()"),
             errors.traceback.FrameSummary(lib, 2000, "train", line="self.step()")]
    a = errors.Anomaly(site="fc", phase="forward", role="output", step=0, kind="nan",
                       stats=type("S", (), {"describe": lambda self: "1 NaN"})(), stack=stack)
    assert [fr.filename for fr in a.user_frames()] == [mine]
    assert [fr.filename for fr in a.library_frames()] == [lib]
    text = a.report()
    mine_at = text.index("your code")
    assert text.index(lib) > text.index("through libraries") > mine_at


def test_sync_monitor_keeps_no_user_tensor_alive():
    import weakref
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    crit = MaskedRatioLoss()
    with healthmon.watch(model, crit, sync=True) as mon:
        x, div = torch.randn(3, 4), torch.rand(3, 2) + 0.5
        pred = model(x)
        mask = div > 0
        loss = crit(pred, div, mask)
        loss.backward()
        refs = [weakref.ref(t) for t in (x, div, pred, mask, loss)]
        del x, div, pred, mask, loss
        assert [r() for r in refs] == [None] * 5
        assert mon._drill.extra_calls  # what it does hold for the loss module: weak refs
