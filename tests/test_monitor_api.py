"""healthmon.watch: API, environment, hooks lifetime, sync mode, model shapes that must work."""
from __future__ import annotations

import dataclasses
import inspect
import json
import traceback
import warnings
from typing import Optional

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import healthmon
from healthmon.config import resolve


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def train(model, steps=3, x=None, mon=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        inp = torch.randn(4, 8) if x is None else x
        loss = model(inp).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def hook_count(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(m._backward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        n += len(m._forward_pre_hooks_with_kwargs)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


def global_optimizer_hooks() -> int:
    from torch.optim import optimizer as O
    return len(O._global_optimizer_post_hooks) + len(O._global_optimizer_pre_hooks)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- lifetime

def test_remove_leaves_zero_hooks_and_attributes():
    model = mlp()
    before_attrs = [dict(vars(m)) for m in model.modules()]
    before_opt = global_optimizer_hooks()
    mon = healthmon.watch(model)
    assert hook_count(model) > 0 and global_optimizer_hooks() == before_opt + 2  # one pre- and post-step pair for all monitors
    train(model)
    mon.remove()
    assert hook_count(model) == 0
    assert global_optimizer_hooks() == before_opt
    assert [set(vars(m)) for m in model.modules()] == [set(a) for a in before_attrs]
    mon.remove()  # idempotent
    with healthmon.watch(model) as mon2:  # can be watched again
        train(model)
    assert hook_count(model) == 0 and not mon2.active


def test_healthmon_off_registers_nothing(monkeypatch):
    monkeypatch.setenv("HEALTHMON", "off")
    model = mlp()
    before_opt = global_optimizer_hooks()
    mon = healthmon.watch(model, sync=True, every=1, on_anomaly="raise")  # off wins
    assert hook_count(model) == 0 and global_optimizer_hooks() == before_opt
    assert not mon.active and not mon.config.enabled
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    with mon:
        train(model, x=x)
        mon.step()
        assert mon.check() == [] and mon.anomalies == []
    assert "off" in mon.summary()


def test_watch_rejects_non_modules_and_double_watch():
    with pytest.raises(TypeError, match="nn.Module"):
        healthmon.watch(lambda x: x)
    model = mlp()
    with pytest.raises(TypeError):
        healthmon.watch(model, "not a module")
    assert hook_count(model) == 0
    with healthmon.watch(model):
        n = hook_count(model)
        with pytest.raises(RuntimeError, match="already watched"):
            healthmon.watch(model)
        with pytest.raises(RuntimeError, match="already watched"):
            healthmon.watch(model[0])  # a submodule of a watched model
        assert hook_count(model) == n  # never doubled hooks


# --------------------------------------------------------------------------- environment

@pytest.mark.parametrize("var,value,accepted", [
    ("HEALTHMON", "maybe", "sync"),
    ("HEALTHMON_EVERY", "0", "integer >= 1"),
    ("HEALTHMON_EVERY", "often", "integer >= 1"),
    ("HEALTHMON_ON_ANOMALY", "explode", "raise, warn, log"),
])
def test_invalid_environment_is_a_clear_error(monkeypatch, var, value, accepted):
    monkeypatch.setenv(var, value)
    model = mlp()
    with pytest.raises(ValueError) as info:
        healthmon.watch(model)
    assert var in str(info.value) and accepted in str(info.value)
    assert hook_count(model) == 0


def test_invalid_arguments():
    for kwargs in ({"every": 0}, {"every": "x"}, {"on_anomaly": "boom"}, {"sync": "yes"}):
        with pytest.raises(ValueError):
            healthmon.watch(mlp(), **kwargs)


def test_environment_values_and_precedence():
    assert resolve(environ={}) == resolve(environ={"HEALTHMON": "on"})
    c = resolve(environ={"HEALTHMON": "SYNC", "HEALTHMON_EVERY": "4",
                         "HEALTHMON_ON_ANOMALY": "warn", "HEALTHMON_LOG": "/tmp/x.jsonl"})
    assert (c.enabled, c.sync, c.every, c.on_anomaly, c.log) == (True, True, 4, "warn",
                                                                  "/tmp/x.jsonl")
    c = resolve(sync=False, every=2, on_anomaly="log", log="y.jsonl",
                environ={"HEALTHMON": "sync", "HEALTHMON_EVERY": "4", "HEALTHMON_LOG": "x"})
    assert (c.sync, c.every, c.on_anomaly, c.log) == (False, 2, "log", "y.jsonl")
    for off in ("off", "0", "OFF", "false"):
        assert not resolve(sync=True, environ={"HEALTHMON": off}).enabled
    assert resolve(environ={"HEALTHMON": "1"}).enabled


def test_every_n_monitors_one_step_in_n(monkeypatch):
    monkeypatch.setenv("HEALTHMON_EVERY", "3")
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    bad = {4, 6}
    with healthmon.watch(model, on_anomaly="log") as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        for step in range(8):
            x = torch.randn(4, 8, generator=gen)
            if step in bad:
                x[0, 0] = float("nan")
            model(x).sum().backward()
            opt.step()
    assert [a.step for a in mon.anomalies] == [6]  # step 4 was not monitored


# --------------------------------------------------------------------------- sync mode

class Sqrt(nn.Module):
    def forward(self, x):
        return torch.sqrt(x)


def sync_forward_case():
    model = nn.Sequential(nn.Linear(8, 8), Sqrt(), nn.Linear(8, 2))
    with healthmon.watch(model, sync=True):
        out = model(torch.randn(4, 8))  # SYNC-FORWARD
        out.sum().backward()


def test_sync_mode_raises_inside_the_forward_hook():
    torch.manual_seed(0)
    with pytest.raises(healthmon.HealthError) as info:
        sync_forward_case()
    a = info.value.anomaly
    assert (a.site, a.phase, a.kind, a.step) == ("1", "forward", "nan", 0)
    lines, start = inspect.getsourcelines(sync_forward_case)
    user_line = start + next(i for i, l in enumerate(lines) if "SYNC-FORWARD" in l)
    tb = traceback.extract_tb(info.value.__traceback__)
    ours = [fr for fr in tb if fr.filename == __file__]
    # the exception came out of the model call, through the hook (not a later line)
    assert ours[-1].lineno == user_line
    assert any(fr.name == "_on_forward" and fr.filename.endswith("healthmon/monitor.py")
               for fr in tb[tb.index(ours[-1]):])
    # and the report's innermost user frame is that line
    assert a.user_frames()[0].lineno == user_line
    assert a.consequences == []


def test_sync_mode_backward_raises_in_backward():
    torch.manual_seed(0)

    class Sqrt0(nn.Module):  # sqrt at 0: finite forward, +inf gradient
        def forward(self, x):
            return torch.sqrt(torch.relu(x) * 0)

    model = nn.Sequential(nn.Linear(8, 8), Sqrt0(), nn.Linear(8, 2))
    with healthmon.watch(model, sync=True):
        out = model(torch.randn(4, 8))
        with pytest.raises(healthmon.HealthError) as info:
            out.sum().backward()
    a = info.value.anomaly
    assert a.phase == "backward" and a.kind in ("inf", "nan")
    assert a.site == "1"  # the gradient of "0"'s output was produced by "1"'s backward
    assert "gradient of 0" in a.role


# --------------------------------------------------------------------------- policy / outputs

def test_check_summary_records_and_policies(tmp_path):
    model = mlp()
    log = tmp_path / "run.jsonl"
    x = torch.randn(4, 8)
    with healthmon.watch(model, on_anomaly="warn", log=str(log)) as mon:
        train(model, steps=2)
        assert mon.check() == []
        rows = mon.records()
        phases = {r["phase"] for r in rows}
        assert phases == {"input", "forward", "backward", "grad", "param", "loss"}
        assert [r["order"] for r in rows] == list(range(len(rows)))
        assert "0.weight" in mon.summary() and "<input>" in mon.summary()
        n_sites = mon.num_sites
        x[1, 1] = float("inf")
        with pytest.warns(RuntimeWarning, match="Inf in <input>"):
            train(model, steps=1, x=x)
        assert len(mon.check()) == 1 and mon.check() == []
        assert mon.num_sites == n_sites
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    records = [l for l in lines if l["type"] == "record"]
    anomalies = [l for l in lines if l["type"] == "anomaly"]
    assert len(records) == 3 * n_sites and len(anomalies) == 1
    assert anomalies[0]["site"] == "<input>" and anomalies[0]["step"] == 2


def test_allow_inf_patterns():
    class Mask(nn.Module):
        def forward(self, x):
            # a relative-position bias with -inf on the diagonal: not a pure 0/-inf additive
            # mask (those are allowed without a pattern), so it needs allow_inf
            m = torch.full((x.shape[0], x.shape[0]), 0.5)
            m.fill_diagonal_(float("-inf"))
            return x + 0, m

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mask = Mask()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            h, m = self.mask(x)
            return torch.softmax(self.lin(h) @ h.T + m, -1)

    torch.manual_seed(0)
    model = Net()
    with healthmon.watch(model, allow_inf=["mask"]) as mon:
        train(model, steps=3)
    assert mon.anomalies == []
    with pytest.raises(healthmon.HealthError) as info:
        with healthmon.watch(model):
            train(model, steps=1)
    assert info.value.anomaly.site == "mask" and info.value.anomaly.role == "output[1]"


# --------------------------------------------------------------------------- model shapes

@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    aux: Optional[torch.Tensor]
    note: str


class Multi(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.cplx = ComplexOut()

    def forward(self, x):
        h = self.lin(x)
        h = self.lin(h)  # called twice per step: one site per call
        z = self.cplx(h)
        return {"out": Out(h * 2, None, "text"), "pair": (h.sum(), 3, None), "z": z.abs()}


class ComplexOut(nn.Module):
    def forward(self, x):
        return torch.complex(x, x)  # not supported by the kernels: skipped and counted


def test_containers_repeated_calls_and_unsupported_outputs():
    torch.manual_seed(0)
    model = Multi()
    with healthmon.watch(model) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            out = model(torch.randn(4, 8))
            (out["out"].logits.mean() + out["pair"][0] + out["z"].mean()).backward()
            opt.step()
            opt.zero_grad()
        mon.check()
        rows = mon.records()
    names = {(r["site"], r["phase"], r["role"], r["call"]) for r in rows}
    assert ("lin", "forward", "output", 0) in names and ("lin", "forward", "output", 1) in names
    assert ("lin", "backward", "grad_output", 1) in names
    assert ("<model>", "forward", "output.out.logits", 0) in names
    assert ("<model>", "forward", "output.pair[0]", 0) in names
    assert ("lin", "grad", "weight", 0) in names
    assert not any(r["site"] == "cplx" for r in rows)
    assert sum(mon.skipped.values()) >= 3 and "skipped" in mon.summary()


class SeqSub(nn.Sequential):
    def forward(self, x):
        return super().forward(x) * 2


def test_plain_sequential_gets_no_hook_but_loses_no_record():
    """A plain nn.Sequential inside the model returns its last module's output: it gets no
    hook of its own (one hook call per step saved), and the records are those of the
    innermost modules either way; a subclass or a Sequential with its own hooks is hooked."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    sub = SeqSub(nn.Linear(4, 4))
    hooked = nn.Sequential(nn.Linear(4, 4))
    hooked.register_forward_pre_hook(lambda m, a: None)
    model = nn.Sequential(inner, sub, hooked, nn.Linear(4, 2))
    with healthmon.watch(model) as mon:
        assert not inner._forward_hooks
        assert sub._forward_hooks and hooked._forward_hooks and model._forward_hooks
        out = model(torch.randn(3, 4))
        out.sum().backward()
        mon.check()
        sites = {(r["site"], r["phase"], r["role"]) for r in mon.records()}
    assert ("0.1", "forward", "output") in sites and ("0.1", "backward", "grad_output") in sites
    assert ("1", "forward", "output") in sites  # the subclass's own output (x * 2)
    assert not any(r[0] == "0" for r in sites)


def test_shared_parameters_and_eval_modes():
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(self.emb(idx))

    model = Tied()
    with healthmon.watch(model) as mon:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            model(torch.randint(0, 10, (4, 5))).logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
            mon.check()
            grads = [r for r in mon.records() if r["phase"] == "grad"]
            with torch.no_grad():
                model(torch.randint(0, 10, (4, 5)))
            with torch.inference_mode():
                model(torch.randint(0, 10, (4, 5)))
        assert mon.check() == []
        assert {r["phase"] for r in mon.records()} == {"input", "forward"}  # inference step
    assert [(r["site"], r["role"]) for r in grads] == [("emb", "weight")]  # tied: recorded once
    assert mon.anomalies == []


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(reentrant):
    class Block(nn.Module):
        def __init__(self, bad: bool):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.bad = bad

        def forward(self, x):
            h = self.lin(x)
            return torch.sqrt(h * 0) if self.bad else torch.tanh(h)  # sqrt'(0) = inf

    class Net(nn.Module):
        def __init__(self, bad: bool):
            super().__init__()
            self.pre = nn.Linear(8, 8)
            self.block = Block(bad)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            h = self.pre(x)
            h = checkpoint(self.block, h, use_reentrant=reentrant)
            return self.head(h)

    torch.manual_seed(0)
    good = Net(False)
    with healthmon.watch(good) as mon:
        train(good, steps=3)
        sites = mon.num_sites
        train(good, steps=3)
        assert mon.num_sites == sites
    assert mon.anomalies == []

    bad = Net(True)
    with pytest.raises(healthmon.HealthError) as info:
        with healthmon.watch(bad):
            train(bad, steps=2)
    a = info.value.anomaly
    # sqrt in Block's own forward code: the gradient of block.lin's output is the first
    # bad one, produced by Block's backward; reported with the original forward call
    assert (a.site, a.phase, a.step, a.call) == ("block", "backward", 0, 0)
    assert "gradient of block.lin" in a.role
    lines, start = inspect.getsourcelines(Net.forward)
    assert a.user_frames()[0].lineno == start + 2  # the checkpoint(...) line


def test_forwards_before_one_backward_are_one_step_and_sites_stay_bounded():
    """A policy called 5 times per update is one step (calls 0-4, one per forward), and a
    forward-only loop with grad enabled decodes segments instead of growing sites."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with healthmon.watch(model) as mon:
        for _ in range(3):
            loss = sum(model(torch.randn(1, 4)).sum() for _ in range(5))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert mon.step_index == 3
        calls = {r["call"] for r in mon.records() if r["site"] == "0"}
        assert calls == {0, 1, 2, 3, 4}
        sites = mon.num_sites
        for _ in range(300):  # grad on, no backward: never a new step, bounded sites
            model(torch.randn(1, 4))
        # per forward of a segment: its input and three module outputs, up to 64 forwards
        assert mon.num_sites <= sites + 4 * 64 + 8
        assert mon.check() == []


def test_lone_input_tensor_is_recorded_from_its_cached_site():
    """The root's lone input tensor is recorded from a site cached per call: after a move
    to float64 the record holds the float64 values, and a NaN in a later step (the cached
    path) is reported at the input."""
    model = nn.Sequential(nn.Linear(4, 3))
    with healthmon.watch(model, on_anomaly="log") as mon:
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            mon.step()
        model.double()
        x = torch.full((2, 4), 1 / 3, dtype=torch.float64)  # not a float32 value
        for _ in range(2):
            model(x).sum().backward()
            mon.check()
            rows = [r for r in mon.records() if r["site"] == "<input>"]
            assert [(r["role"], r["call"]) for r in rows] == [("input[0]", 0)]
            assert rows[0]["sum"] == x.sum().item()
        x[1, 2] = float("nan")
        model(x).sum().backward()
        mon.check()
        a = mon.anomalies[-1]
        assert (a.site, a.role, a.stats.nan, a.call) == ("<input>", "input[0]", 1, 0)
