"""Parameter-gradient hooks in C++ (healthmon._C.ParamGradHooks, csrc/param_hooks.cpp): the
same gradient records as the Python hooks, the user's own post-accumulate-grad hooks keep
running (registered before or after watch(), and after remove()), a replaced hook dict is
wrapped again, and a backward that fails half-way does not stop later records (the monitor
freed after remove(): tests/test_fastpath.py)."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import healthmon
from healthmon import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="native extension not built (make build)")


class GradRows:
    """A sink keeping, per step, the (site, role) -> (numel, sum) of the ``grad`` rows."""

    def __init__(self):
        self.steps = []

    def write_step(self, step, rows):
        self.steps.append({(r["site"], r["role"]): (r["numel"], round(r["sum"], 9))
                           for r in rows if r["phase"] == "grad"})


def train(monkeypatch, fast: bool, steps: int = 4, before=None, after=None, **watch_args):
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1" if fast else "0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    if before is not None:
        before(model)
    sink = GradRows()
    mon = healthmon.watch(model, sinks=[sink], **watch_args)
    assert (mon._param_hooks is not None) == fast
    if after is not None:
        after(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(3, 4)
    for _ in range(steps):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    mon.remove()
    return model, sink.steps


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("every", [1, 3])
def test_gradient_records_equal_the_python_hooks(monkeypatch, sync, every):
    """Async notes gradients in C++; sync mode and the steps the cadence skips go through
    the Python hook: the same rows either way."""
    _, fast = train(monkeypatch, True, steps=6, sync=sync, every=every)
    _, slow = train(monkeypatch, False, steps=6, sync=sync, every=every)
    recorded = [s for s in fast if s]
    assert len(recorded) == 6 // every and all(len(s) == 4 for s in recorded)  # 2 W + 2 b
    assert fast == slow


def test_users_hooks_before_and_after_watch_keep_running(monkeypatch):
    calls = []

    def before(model):
        model[0].weight.register_post_accumulate_grad_hook(lambda p: calls.append("before"))

    def after(model):
        model[0].weight.register_post_accumulate_grad_hook(
            lambda p: calls.append(("after", p.grad is not None)))

    model, steps = train(monkeypatch, True, before=before, after=after)
    assert calls.count("before") == 4 and calls.count(("after", True)) == 4
    assert all(len(s) == 4 for s in steps)
    # after remove(): the user's hooks still run, nothing of ours does
    calls.clear()
    model(torch.randn(3, 4)).sum().backward()
    assert calls == ["before", ("after", True)]


def test_replaced_hook_dict_is_wrapped_again(monkeypatch):
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1")
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    sink = GradRows()
    mon = healthmon.watch(model, sinks=[sink])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    for step in range(4):
        if step == 1:  # torch installs a new dict hook over ours
            model[2].weight._post_accumulate_grad_hooks = OrderedDict(
                user=lambda p: seen.append(step))
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    mon.remove()
    assert seen == [1, 2, 3]  # the user's dict keeps running
    # the step of the assignment misses that gradient; from the next step on it is back
    assert ("2", "weight") not in sink.steps[1]
    assert all(("2", "weight") in s and len(s) == 4 for s in sink.steps[2:])


class _Boom(Exception):
    pass


def test_failed_backward_does_not_stop_later_records(monkeypatch):
    """The last layer's gradients accumulate first; the backward then fails in a hook of
    the first layer's output: its end-of-backward callback never runs. The noted
    gradients are recorded at the step's end and later backwards queue their own."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1")
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    sink = GradRows()
    mon = healthmon.watch(model, sinks=[sink])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fail = [True]

    def maybe_fail(grad):
        if fail[0]:
            raise _Boom("injected")

    def hook_output(module, args, out):
        out.register_hook(maybe_fail)

    model[0].register_forward_hook(hook_output)
    with pytest.raises(_Boom):
        model(torch.randn(3, 4)).sum().backward()
    mon.step()  # ends the step: the noted gradients (still in .grad) are recorded
    opt.zero_grad()
    fail[0] = False
    for _ in range(3):
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    mon.remove()
    assert set(sink.steps[0]) == {("2", "weight"), ("2", "bias")}  # noted before the failure
    assert [len(s) for s in sink.steps[1:]] == [4, 4, 4]

