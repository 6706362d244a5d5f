"""The monitor's promises about the training step: same numbers, no host sync in hooks,
flat memory, no reference kept to any activation."""
from __future__ import annotations

import copy
import gc
import sys
import tracemalloc
import weakref

import pytest
import torch
from torch import nn

import healthmon


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG"):
        monkeypatch.delenv(var, raising=False)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.ff(self.norm(x))


class Tiny(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def make(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def train_steps(model, steps, gen, opt=None):
    opt = opt or torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=gen)
        y = torch.randint(0, 3, (4,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return opt


def test_parameters_bitwise_identical_with_and_without_monitor():
    a = make()
    b = copy.deepcopy(a)
    train_steps(a, 20, torch.Generator().manual_seed(1))
    with healthmon.watch(b) as mon:
        train_steps(b, 20, torch.Generator().manual_seed(1))
    assert mon.step_index == 20 and mon.anomalies == []
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


_HOT = {"forward_hook", "grad_hook", "param_hook", "_on_forward", "_record", "_flush_grads",
        "_root_pre_hook"}
_BOUNDARY = {"_end_step", "_decode", "check", "_decode_pending"}


def _inside_hot_hook() -> bool:
    f = sys._getframe(2)
    hot = False
    while f is not None:
        name = f.f_code.co_name
        if f.f_code.co_filename.endswith(("healthmon/monitor.py", "healthmon/decode.py")):
            if name in _BOUNDARY:
                return False  # step boundaries may synchronise
            hot = hot or name in _HOT
        f = f.f_back
    return hot


def test_no_host_sync_inside_async_hooks(monkeypatch):
    # the Python hooks (the C++ fast path calls no Python tensor method at all)
    monkeypatch.setenv("HEALTHMON_FASTPATH", "0")
    calls = {"hot": 0}

    def guard(name):
        original = getattr(torch.Tensor, name)

        def patched(self, *args, **kwargs):
            if _inside_hot_hook():
                raise AssertionError(f"Tensor.{name} called inside a healthmon hook")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, patched)

    for name in ("item", "cpu", "tolist", "__bool__"):
        guard(name)
    original_stats_into = healthmon.ops.record_unchecked

    def counting(*args):
        calls["hot"] += 1
        return original_stats_into(*args)
    monkeypatch.setattr(healthmon.ops, "record_unchecked", counting)

    model = make()
    gen = torch.Generator().manual_seed(2)
    with healthmon.watch(model) as mon:
        train_steps(model, 3, gen)
        x = torch.randn(4, 8)
        x[0, 0] = float("nan")
        model(x).sum().backward()  # an anomaly: still no sync inside hooks
        with pytest.raises(healthmon.HealthError):
            mon.check()
    assert calls["hot"] > 50
    # and the guard does fire for a hook that synchronises (the test is not vacuous)
    model2 = make()
    with healthmon.watch(model2, sync=True) as mon2:
        with pytest.raises(AssertionError, match="inside a healthmon hook"):
            model2(torch.randn(2, 8))
        mon2.remove()


def test_memory_flat_over_2000_monitored_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with healthmon.watch(model) as mon:
        seen = []
        for n in (50, 150, 1800):  # one call site: the stack table must not grow either
            train_steps(model, n, gen, opt)
            gc.collect()
            if not seen:
                tracemalloc.start()
            seen.append((mon.num_sites, mon.buffer_bytes(), len(mon._stacks),
                         tracemalloc.get_traced_memory()[0]))
        tracemalloc.stop()
        assert mon.step_index == 2000
        (sites, buf, stacks, _), (_, _, _, base), (_, _, _, end) = seen
        assert all(s[:3] == (sites, buf, stacks) for s in seen)
    assert mon.anomalies == []
    assert end - base < 64 * 1024, f"host memory grew by {end - base} bytes over 1800 steps"


def test_no_reference_kept_to_activations():
    model = make()
    refs = []
    probe = model.blocks[0].ff[1].register_forward_hook(
        lambda m, a, out: refs.append(weakref.ref(out)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gc.disable()  # freed by reference counting alone: no cycles through the monitor either
    try:
        with healthmon.watch(model) as mon:
            x = torch.randn(4, 8, requires_grad=True)
            xref = weakref.ref(x)
            out = model(x)
            oref = weakref.ref(out)
            out.sum().backward()
            gref = weakref.ref(model.head.weight.grad)
            opt.step()
            del x, out
            assert xref() is None and oref() is None and refs[0]() is None
            # forward without backward (graph still alive until the next step): released
            out = model(torch.randn(4, 8))
            oref = weakref.ref(out)
            del out
            assert oref() is None and refs[1]() is None
            opt.zero_grad(set_to_none=True)
            assert gref() is None  # the monitor keeps no gradient either
            mon.check()
    finally:
        gc.enable()
        probe.remove()


def _train_and_drop(sync: bool, fast: bool, monkeypatch):
    """Watch a model, train 3 steps (losses with class targets, so every process-wide
    wrapper is in use), drop model and monitor without ``remove()``."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1" if fast else "0")
    model = Tiny()
    mon = healthmon.watch(model, sync=sync)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 8)), torch.randint(0, 3, (4,)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return weakref.ref(model), weakref.ref(mon), weakref.ref(mon._rec)


@pytest.mark.parametrize("sync,fast", [(False, True), (True, True), (False, False)])
def test_model_dropped_without_remove_is_collected_with_its_monitor(monkeypatch, sync, fast):
    """A notebook cell run again, or a sweep in one process, drops watched models without
    ``remove()``: the model, its monitor and its record buffers are collected, the
    process-wide wrappers (loss guard, loss recorder, drill-down) go away with the last one,
    and the optimizer hooks call no dead monitor."""
    from healthmon import drilldown, hooks, labels, loss_site
    gc.collect()
    assert not labels.loss_guard_installed()  # no monitor left by an earlier test
    refs = _train_and_drop(sync, fast, monkeypatch)
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]
    assert not labels.loss_guard_installed() and not loss_site.installed()
    assert not drilldown.installed()
    assert not hooks.OPTIMIZER_HOOKS.monitors
    # a model still in use keeps its monitor (``watch(model)`` without keeping the result)
    model = Tiny()
    mon = weakref.ref(healthmon.watch(model))
    gc.collect()
    assert mon() is not None and labels.loss_guard_installed()
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    try:
        with pytest.raises(healthmon.HealthError):
            model(x).sum().backward()
            model(torch.randn(4, 8))  # the step boundary decodes the bad step
    finally:
        mon().remove()
