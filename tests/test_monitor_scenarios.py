"""The four real-bug scenarios of issue 3, each with a healthy twin that runs 50 steps clean.

Every scenario trains a real (tiny) model on CPU under ``healthmon.watch`` in the default
async mode and checks site, phase, step and that the user's line is in the reported stack.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import healthmon


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def line_of(fn, text: str) -> int:
    """Line number (in this file) of the first line of ``fn`` containing ``text``."""
    lines, start = inspect.getsourcelines(fn)
    for i, line in enumerate(lines):
        if text in line:
            return start + i
    raise AssertionError(f"{text!r} not in {fn.__name__}")


def has_user_line(anomaly, lineno: int) -> bool:
    return any(fr.filename == __file__ and fr.lineno == lineno for fr in anomaly.stack) and \
        any(fr.filename == __file__ and fr.lineno == lineno for fr in anomaly.user_frames())


# --------------------------------------------------------------------------- (1) masked division

class MaskedRatioLoss(nn.Module):
    """``y = x / div; loss = y[mask].sum()``: finite loss, NaN gradient where div == 0."""

    def forward(self, pred, div, mask):
        y = pred / div
        return y[mask].sum()


def run_masked_division(zero_div: bool, steps: int, loss_module: bool):
    model = mlp()
    crit = MaskedRatioLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    mons = (model, crit) if loss_module else (model,)
    with healthmon.watch(*mons) as mon:
        for _ in range(steps):
            x = torch.randn(6, 8, generator=gen)
            div = torch.rand(6, 4, generator=gen) + 0.5
            if zero_div:
                div[2, 1] = 0.0
            mask = div != 0
            pred = model(x)  # USER-LINE-1
            if loss_module:
                loss = crit(pred, div, mask)  # USER-LINE-1-LOSS
            else:
                y = pred / div
                loss = y[mask].sum()
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mon


def test_masked_division_loss_in_training_loop():
    with pytest.raises(healthmon.HealthError) as info:
        run_masked_division(True, 5, loss_module=False)
    a = info.value.anomaly
    # The loss code is outside every watched module: the gradient arrives bad at the
    # model's output, i.e. the output of its last layer.
    assert (a.site, a.phase, a.role, a.kind, a.step) == ("2", "backward", "grad_output", "nan", 0)
    assert a.stats.nan == 1 and a.stats.numel == 24
    assert has_user_line(a, line_of(run_masked_division, "USER-LINE-1"))
    assert str(info.value) == a.report()
    assert "NaN" in str(info.value) and "backward" in str(info.value)


def test_masked_division_in_loss_module_blames_the_loss():
    with pytest.raises(healthmon.HealthError) as info:
        run_masked_division(True, 5, loss_module=True)
    a = info.value.anomaly
    assert (a.site, a.phase, a.kind, a.step) == ("MaskedRatioLoss", "backward", "nan", 0)
    assert a.role.startswith("grad_input")
    assert has_user_line(a, line_of(run_masked_division, "USER-LINE-1-LOSS"))


@pytest.mark.parametrize("loss_module", [False, True])
def test_masked_division_healthy_twin(loss_module):
    mon = run_masked_division(False, 50, loss_module=loss_module)
    assert mon.anomalies == []
    assert mon.step_index == 50


# --------------------------------------------------------------------------- (2) LR too high

def run_lr(lr: float, steps: int, monitored: bool = True):
    """Returns (monitor or None, first step at which an activation or gradient went
    non-finite according to a plain-torch oracle run of the same training)."""
    model = mlp(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(4)
    mon = healthmon.watch(model) if monitored else None
    first_bad = None
    try:
        for step in range(steps):
            x = torch.randn(16, 8, generator=gen) * 3
            target = torch.randn(16, 4, generator=gen)
            if monitored:
                out = model(x)  # USER-LINE-2
            else:  # oracle: every activation and gradient checked with plain torch
                acts, h = [x], x
                for layer in model:
                    h = layer(h)
                    h.retain_grad()
                    acts.append(h)
                out = h
            loss = ((out - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()  # USER-LINE-2-BACKWARD
            if not monitored and first_bad is None:
                tensors = acts[1:] + [a.grad for a in acts[1:]] + \
                    [p.grad for p in model.parameters()]
                if any(not torch.isfinite(t).all() for t in tensors):
                    first_bad = step
            opt.step()
        if mon is not None:
            mon.check()
    finally:
        if mon is not None:
            mon.remove()
    return mon, first_bad


def test_learning_rate_too_high():
    _, first_bad = run_lr(50.0, 30, monitored=False)
    assert first_bad is not None and first_bad > 0  # diverges after a few healthy steps
    with pytest.raises(healthmon.HealthError) as info:
        run_lr(50.0, 30)
    a = info.value.anomaly
    assert a.last_healthy is not None  # the site was healthy in the previous steps
    if a.phase == "loss":  # the loss is a site (issue 16): its overflow can come first,
        assert a.site == "<loss>" and a.step <= first_bad  # the oracle checks no loss
        assert has_user_line(a, line_of(run_lr, "USER-LINE-2-BACKWARD"))
        return
    assert a.step == first_bad
    assert a.phase in ("forward", "backward", "grad")
    assert a.site in ("0", "1", "2")
    assert has_user_line(a, line_of(run_lr, "USER-LINE-2"))


def test_learning_rate_healthy_twin():
    mon, _ = run_lr(0.01, 50)
    assert mon.anomalies == [] and mon.step_index == 50


# --------------------------------------------------------------------------- (3) log underflow

class NLLFromProbs(nn.Module):
    """A hand-written NLL: ``-log(softmax(logits / T)[target])``; p underflows to 0 for
    small temperatures and log(0) = -inf."""

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, logits, target):
        p = torch.softmax(logits / self.temperature, dim=-1)
        return -torch.log(p.gather(1, target[:, None])).mean()


def run_log(temperature: float, steps: int):
    model = mlp(seed=5)
    crit = NLLFromProbs(temperature)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(6)
    with healthmon.watch(model, crit) as mon:
        for _ in range(steps):
            x = torch.randn(8, 8, generator=gen)
            y = torch.randint(0, 4, (8,), generator=gen)
            loss = crit(model(x), y)  # USER-LINE-3
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mon


def test_log_underflow_in_custom_loss():
    with pytest.raises(healthmon.HealthError) as info:
        run_log(1e-4, 5)
    a = info.value.anomaly
    assert (a.site, a.phase, a.role, a.kind, a.step) == ("NLLFromProbs", "forward", "output",
                                                           "inf", 0)
    assert a.stats.posinf == 1
    assert has_user_line(a, line_of(run_log, "USER-LINE-3"))


def test_log_underflow_healthy_twin():
    mon = run_log(1.0, 50)
    assert mon.anomalies == [] and mon.step_index == 50


# --------------------------------------------------------------------------- (4) NaN in input

def run_input(nan_at: int, steps: int):
    model = mlp(seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(8)
    with healthmon.watch(model) as mon:
        for step in range(steps):
            x = torch.randn(8, 8, generator=gen)
            if step == nan_at:
                x[3, 2] = float("nan")
            loss = model(x).pow(2).mean()  # USER-LINE-4
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mon


def test_nan_in_input_batch_is_reported_as_input():
    with pytest.raises(healthmon.HealthError) as info:
        run_input(3, 6)
    a = info.value.anomaly
    assert (a.site, a.phase, a.role, a.kind, a.step) == ("<input>", "input", "input[0]", "nan", 3)
    assert a.stats.nan == 1 and a.stats.numel == 64
    assert a.last_healthy is not None and a.last_healthy.nan == 0
    assert has_user_line(a, line_of(run_input, "USER-LINE-4"))
    # the first layer's NaN output is a consequence, not the culprit
    assert any(c.site == "0" and c.phase == "forward" for c in a.consequences)


def test_nan_in_input_healthy_twin():
    mon = run_input(-1, 50)
    assert mon.anomalies == [] and mon.step_index == 50


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_nan_in_the_input_of_a_later_forward_of_the_step(sync):
    """Several forwards before one backward (a policy called once per environment step):
    each forward's input is a call of its own, so a NaN observation in forward 2 of 4 is
    reported as that input (not overwritten by forward 3's healthy one, not blamed on the
    first layer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = healthmon.watch(model, sync=sync, on_anomaly="log")
    try:
        for step in range(4):
            outs = []
            for t in range(4):
                obs = torch.randn(1, 4)
                if step == 2 and t == 1:
                    obs[0, 0] = float("nan")
                outs.append(model(obs))
            loss = torch.cat(outs).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.grad.nan_to_num_(0.0)
            opt.step()
        mon.check()
        a = mon.anomalies[0]
        assert (a.site, a.phase, a.role, a.step, a.call) == ("<input>", "input", "input[0]", 2, 1)
        inputs = [r for r in mon.records() if r["phase"] == "input"]
        assert [r["call"] for r in inputs] == [0, 1, 2, 3]
    finally:
        mon.remove()
