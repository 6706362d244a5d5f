"""The C++ fast path (healthmon._C.FastPath) against the Python hooks: same records (sites,
execution order, statistics), same findings, no leak, no crash when a graph outlives its
monitor. Each case runs twice, with HEALTHMON_FASTPATH=0 (Python only) and with it on."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import healthmon
from healthmon import ops

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="native extension not built (make build)")


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(torch.relu(self.lin(x))) + x


class Net(nn.Module):
    """Sequential stacks, a module called twice per step, a two-output module, an
    embedding, dropout, a recurrent layer and a frozen layer."""

    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(20, d)
        self.blocks = nn.Sequential(Block(d), nn.Dropout(0.1), Block(d))
        self.shared = nn.Linear(d, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(d, 3)
        self.poison = None  # "forward" / "backward": a NaN injected in self.shared's use

    def forward(self, tokens):
        h = self.blocks(self.emb(tokens))
        h = self.shared(h)
        if self.poison == "forward":
            h = h * torch.tensor(float("nan"))
        h = self.shared(torch.tanh(h))  # the second call of the same module
        h, _ = self.rnn(h)
        if self.poison == "backward":
            h = _NanGrad.apply(h)
        return self.head(self.frozen(h)).mean(1)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def run(monkeypatch, fast: bool, steps: int = 5, poison=None, sync: bool = False):
    """Train a fresh Net (``sync``: in sync mode); returns (records of every step,
    findings)."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1" if fast else "0")
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    steps_rows = []

    class Keep:
        def write_step(self, step, rows):
            steps_rows.append([(step, r["order"], r["site"], r["phase"], r["role"],
                                r["call"], r["numel"], r["nan"], r["sum"], r["min"],
                                r["max"]) for r in rows])

        def write_anomaly(self, anomaly):
            pass

        def close(self):
            pass

    mon = healthmon.watch(model, on_anomaly="log", sinks=[Keep()], sync=sync)
    assert (mon._fast is not None) == fast
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        model.poison = poison if step == 3 else None
        tokens = torch.randint(0, 20, (4, 6), generator=gen)
        y = torch.randint(0, 3, (4,), generator=gen)
        loss = nn.functional.cross_entropy(model(tokens), y)
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():  # keep the weights finite after a poisoned step
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0)
        opt.step()
    mon.check()
    findings = [(a.step, a.site, a.phase, a.role, a.kind,
                 [(f.name, f.lineno) for f in a.user_frames()][:2]) for a in mon.anomalies]
    mon.remove()
    return steps_rows, findings


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_records_identical_with_and_without_fast_path(monkeypatch, sync):
    slow, _ = run(monkeypatch, fast=False, sync=sync)
    fast, _ = run(monkeypatch, fast=True, sync=sync)
    assert len(fast) == len(slow) == 5
    for step, (a, b) in enumerate(zip(slow, fast)):
        assert a == b, f"step {step} differs"


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
@pytest.mark.parametrize("poison", ["forward", "backward"])
def test_findings_identical_with_and_without_fast_path(monkeypatch, poison, sync):
    _, slow = run(monkeypatch, fast=False, poison=poison, sync=sync)
    _, fast = run(monkeypatch, fast=True, poison=poison, sync=sync)
    assert slow and fast == slow
    assert slow[0][0] == 3


@pytest.mark.parametrize("poison", ["forward", "backward"])
def test_sync_mode_raises_the_same_error_at_the_same_place(monkeypatch, poison):
    """Sync mode, on_anomaly="raise": the HealthError (its type intact, also when raised
    from the C++ gradient hook inside backward) names the same site at the same step, and
    is raised from the same call (forward or backward), with and without the fast path."""
    got = {}
    for fast in (False, True):
        monkeypatch.setenv("HEALTHMON_FASTPATH", "1" if fast else "0")
        torch.manual_seed(0)
        model = Net()
        mon = healthmon.watch(model, sync=True)
        assert (mon._fast is not None) == fast
        try:
            for step in range(5):
                model.poison = poison if step == 3 else None
                tokens = torch.randint(0, 20, (4, 6))
                out = model(tokens)  # raises here for a poisoned forward
                try:
                    out.sum().backward()
                except healthmon.HealthError as e:
                    got[fast] = ("backward", step, e.anomaly.site, e.anomaly.phase,
                                 e.anomaly.role)
                    break
                mon.step()
        except healthmon.HealthError as e:
            got[fast] = ("forward", step, e.anomaly.site, e.anomaly.phase, e.anomaly.role)
        finally:
            mon.remove()
    assert got[True] == got[False], got
    assert got[True][:2] == (poison, 3), got


def test_sync_mode_takes_the_fast_path_on_cpu(monkeypatch):
    """Sync mode on the CPU: healthy records of plain modules stay in C++ too."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = []
    with healthmon.watch(model, sync=True) as mon:
        original = mon._check_now
        monkeypatch.setattr(mon, "_check_now",
                            lambda *a: (calls.append(a[0].phase), original(*a)))
        for step in range(3):
            calls.clear()
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
        # the root's output and the parameter records are checked in Python; no module
        # output or output gradient is
        assert "backward" not in calls and calls.count("forward") <= 1, calls


def test_fast_path_takes_the_common_case(monkeypatch):
    """After the first step, a plain module's forward hook does not reach Python."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    calls = []
    with healthmon.watch(model) as mon:
        # (patching _on_forward itself would add a frame to the stacks it captures)
        original = mon._forward_tensor
        monkeypatch.setattr(mon, "_forward_tensor",
                            lambda *a: (calls.append(a[0]), original(*a)))
        for step in range(3):
            calls.clear()
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
        assert calls == [0]  # only the root (its output is a module's: the Python path)
        assert len(mon.records()) > 0


def test_stack_change_is_seen(monkeypatch):
    """A module called from another line than before: the fast path declines (its cached
    stack no longer matches) and the record carries the new line."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1")
    model = nn.Sequential(nn.Linear(4, 4))
    inner = model[0]
    with healthmon.watch(model, on_anomaly="log") as mon:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()  # line A
            mon.step()
        x = torch.randn(2, 4)
        x[0, 0] = float("nan")
        model(x).sum().backward()  # line B
        mon.check()
        a = mon.anomalies[0]
    assert a.site in ("0", "<input>")
    assert "line B" in open(__file__).read().splitlines()[a.user_frames()[-1].lineno - 1]
    assert inner is model[0]


def test_monitor_is_freed_and_late_gradients_are_dropped(monkeypatch):
    """The C++ side (forward and parameter hooks) holds the monitor weakly (it is garbage
    collected after remove()), and a graph built while watched can run backward after
    remove() without error or record."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1")
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    mon = healthmon.watch(model)
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        mon.step()
    pending = model(torch.randn(2, 4)).sum()  # graph with C++ gradient hooks
    mon.remove()
    pending.backward()
    ref = weakref.ref(mon)
    del mon
    gc.collect()
    assert ref() is None
    # the C++ parameter hooks are out of the slots: gradients accumulate as unwatched
    model(torch.randn(2, 4)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


class _Attn(nn.Module):
    """Returns (output, None), as attention layers do without attention weights."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.proj(x)), None


class _TwoHeads(nn.Module):
    """A policy's shape: a flat tuple whose second item is an inner module's output."""

    def __init__(self, d=6):
        super().__init__()
        self.attn = _Attn(d)
        self.action = nn.Linear(d, 2)
        self.value = nn.Linear(d, 1)
        self.poison = False

    def forward(self, x):
        h, _ = self.attn(x)
        logits = self.action(h)
        if self.poison:
            logits = logits * torch.tensor(float("nan"))
        return torch.log_softmax(logits, -1), self.value(h)


def _run_two_heads(monkeypatch, fast: bool, poison_step: int = -1):
    monkeypatch.setenv("HEALTHMON_FASTPATH", "1" if fast else "0")
    torch.manual_seed(0)
    model = _TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rows, python_records = [], []

    class Keep:
        def write_step(self, step, step_rows):
            rows.append([(r["site"], r["phase"], r["role"], r["call"], r["nan"],
                          round(r["sum"], 9)) for r in step_rows])

    mon = healthmon.watch(model, on_anomaly="log", sinks=[Keep()])
    original = mon._record_ok
    monkeypatch.setattr(mon, "_record_ok", lambda *a, **k: (
        python_records.append((mon._cur.index, a[3] or a[7].phase)), original(*a, **k))[1])
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        model.poison = step == poison_step
        loss = 0
        for _ in range(3):  # several forwards before one backward (calls 0, 1, 2)
            logp, value = model(torch.randn(2, 6, generator=gen))
            loss = loss + logp[:, 0].sum() + value.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mon.check()
    findings = [(a.step, a.site, a.phase, a.role) for a in mon.anomalies]
    mon.remove()
    return rows, findings, python_records


@pytest.mark.parametrize("poison_step", [-1, 3])
def test_tuple_outputs_take_the_fast_path_with_the_same_records(monkeypatch, poison_step):
    """Flat tuple outputs (an item None, an item an inner module's output) are recorded
    in C++ from the second step on, with the records and findings of the Python path."""
    slow, slow_found, _ = _run_two_heads(monkeypatch, False, poison_step)
    fast, fast_found, python = _run_two_heads(monkeypatch, True, poison_step)
    assert fast == slow and fast_found == slow_found
    assert bool(fast_found) == (poison_step >= 0)
    roles = {r[2] for step in fast for r in step}
    assert {"output[0]", "grad_output[0]"} <= roles  # the root's and the attention's item
    # after the first step only the root's inputs, the loss and the parameters are Python
    # records
    later = {phase for step, phase in python if 1 <= step < poison_step or
             (poison_step < 0 and step >= 1)}
    assert later <= {"input", "loss", "param", "grad"}, later
