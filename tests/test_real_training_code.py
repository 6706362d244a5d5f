"""The monitor in real training code: copies and pickles of a watched model, inference-mode
passes, a module returning its own parameter, threads, the user's steps, weights protected
from a bad update, and ``on_anomaly="skip"`` (issue 12, core items)."""
import copy
import io
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import healthmon


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def hooks_of(model):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {})
    return n


def step(model, opt, x=None, y=None):
    x = torch.randn(4, 8) if x is None else x
    y = torch.randint(0, 4, (4,)) if y is None else y
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_torch_save_of_a_watched_model_and_load():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with healthmon.watch(model):
        step(model, opt)
        buf = io.BytesIO()
        torch.save(model, buf)  # a whole-model pickle (pytorch/examples checkpoints)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        step(model, opt)
    # the loaded copy trains without the monitor and without our hooks firing
    out = loaded(torch.randn(2, 8))
    assert out.shape == (2, 4)
    assert hooks_of(loaded) == 0  # the inert stubs removed themselves at the first call
    loaded(torch.randn(2, 8)).sum().backward()


def test_deepcopy_ema_copy_is_not_monitored_and_clean_after_remove():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = healthmon.watch(model)
    step(model, opt)
    ema = copy.deepcopy(model)  # timm ModelEma, teacher models
    step_before = mon.step_index
    for _ in range(3):
        with torch.no_grad():
            ema(torch.randn(4, 8))
    assert mon.step_index == step_before  # the copy's forwards are not our steps
    with torch.no_grad():
        ema[0].weight.fill_(float("nan"))
        assert torch.isnan(ema(torch.randn(2, 8))).all()
    step(model, opt)
    mon.check()
    assert mon.anomalies == []  # a NaN in the copy is not the original's
    mon.remove()
    assert hooks_of(model) == 0
    ema(torch.randn(2, 8)).sum().backward()
    assert hooks_of(ema) == 0
    for p in model.parameters():
        assert p._post_accumulate_grad_hooks is None  # as before watch()


def test_inference_mode_before_the_first_training_step():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = healthmon.watch(model)
    with torch.inference_mode():  # Lightning's sanity validation
        model(torch.randn(4, 8))
    for _ in range(3):
        step(model, opt)
    with torch.inference_mode():
        model.eval()
        model(torch.randn(4, 8))  # an eval that reaches the same sites
        model.train()
    step(model, opt)
    mon.check()
    assert mon.anomalies == []
    for buf in mon._rec.buffers.values():
        assert not buf.records.is_inference()
    mon.remove()


class ReturnsParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.scale


def test_a_module_returning_its_parameter_adds_no_hook_per_step():
    torch.manual_seed(0)
    gate = ReturnsParameter()
    lin = nn.Linear(8, 4)
    model = nn.ModuleDict({"gate": gate, "lin": lin})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with healthmon.watch(model) as mon:
        for _ in range(20):
            out = lin(torch.randn(2, 8)) * gate(None)
            opt.zero_grad()
            out.sum().backward()
            opt.step()
        assert len(gate.scale._backward_hooks or {}) == 0
        mon.check()
    assert mon.anomalies == []


def test_threads_keep_their_own_labels():
    errors = {}
    bad_steps = {}

    def train(name, bad):
        model = mlp(seed=1 if bad else 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        mon = healthmon.watch(model, on_anomaly="log", prefix=name)
        try:
            for i in range(20):
                y = torch.randint(0, 4, (4,))
                if bad:
                    y[0] = 7  # out of range for 4 classes
                try:
                    step(model, opt, y=y)
                except IndexError:
                    pass  # torch's own error after the monitor logged it
            bad_steps[name] = [a.site for a in mon.anomalies]
        except Exception as err:  # pragma: no cover - reported below
            errors[name] = err
        finally:
            mon.remove()

    threads = [threading.Thread(target=train, args=("a", True)),
               threading.Thread(target=train, args=("b", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert bad_steps["b"] == []  # thread a's bad labels never land in b's monitor
    assert len(bad_steps["a"]) == 20


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)


def test_steps_are_the_optimizer_steps_not_forward_calls():
    torch.manual_seed(0)
    disc = Discriminator()
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    mon = healthmon.watch(disc)
    first = None
    for it in range(5):
        real, fake = torch.randn(8, 4), torch.randn(8, 4)
        # a GAN calls the discriminator three times per iteration
        loss = F.softplus(-disc(real)).mean() + F.softplus(disc(fake)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        disc(torch.randn(8, 4)).mean()  # the generator's turn (no D step)
        with torch.no_grad():
            disc(torch.randn(8, 4))  # evaluation: never a boundary
        if first is None:  # before the first optimizer step, root forwards were steps
            first = mon.step_index
    assert mon.step_index - first == 4  # one step per iteration, not three
    mon.check()  # closes the open step (the generator's turn)
    last = mon.step_index
    with torch.no_grad():
        disc.net[2].bias.fill_(float("nan"))
    disc(torch.randn(8, 4)).mean().backward()
    with pytest.raises(healthmon.HealthError) as info:
        opt.step()
    assert info.value.anomaly.step == last
    mon.remove()


def test_async_cpu_error_comes_before_the_update():
    """The README's masked division: the weights stay finite when the error is raised."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = healthmon.watch(model)
    step(model, opt)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 8)
    div = torch.tensor([1.0, 0.0, 2.0, 0.0])
    y = model(x) / div[:, None]
    loss = y[div > 0].pow(2).mean()
    opt.zero_grad()
    loss.backward()
    with pytest.raises(healthmon.HealthError) as info:
        opt.step()
    assert info.value.anomaly.phase in ("backward", "grad")
    for b, p in zip(before, model.parameters()):
        assert torch.isfinite(p).all()
        assert torch.equal(b, p.detach())  # no update at all
    mon.remove()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
], ids=["sgd-momentum", "adam-foreach", "adamw-loop", "adam-fused"])
def test_skip_leaves_weights_and_optimizer_state_untouched(make_opt):
    model = mlp()
    opt = make_opt(model.parameters())
    mon = healthmon.watch(model, on_anomaly="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(model, opt)
        weights = [p.detach().clone() for p in model.parameters()]
        state = copy.deepcopy(opt.state_dict()["state"])
        x = torch.randn(4, 8)
        x[1, 3] = float("nan")  # a bad batch
        step(model, opt, x=x)
        for w, p in zip(weights, model.parameters()):
            assert torch.equal(w, p.detach())
        after = opt.state_dict()["state"]
        for k, v in state.items():
            for name, t in v.items():
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(after[k][name])), name
        for _ in range(3):  # training goes on
            step(model, opt)
    assert mon.skipped_steps == [1]
    assert [a.step for a in mon.anomalies] == [1]
    assert any("update is skipped" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    mon.remove()


def test_skip_raises_after_max_consecutive_skips(monkeypatch):
    monkeypatch.setenv("HEALTHMON_MAX_SKIPS", "2")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = healthmon.watch(model, on_anomaly="skip")
    bad = torch.full((4, 8), float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step(model, opt, x=bad)
        step(model, opt, x=bad)
        with pytest.raises(healthmon.HealthError, match="3 consecutive steps skipped"):
            step(model, opt, x=bad)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    mon.remove()


def test_validation_batches_inside_a_step_add_no_sites():
    """A validation loop of many batches inside one step (Lightning, HF evaluate) reuses the
    same sites: call numbers do not grow with the number of evaluation batches."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = healthmon.watch(model)
    step(model, opt)
    step(model, opt)

    def validate(batches):
        model.eval()
        with torch.no_grad():
            for _ in range(batches):
                model(torch.randn(4, 8))
        model.train()

    validate(3)
    sites = mon.num_sites
    index = mon.step_index
    validate(40)
    assert mon.num_sites == sites
    assert mon.step_index == index  # evaluation is never a step
    with torch.no_grad():
        x = torch.randn(4, 8)
        x[0, 0] = float("nan")
        with pytest.raises(healthmon.HealthError) as info:
            model(x)  # a NaN in one validation batch is still found
            model(torch.randn(4, 8))
            mon.check()
    assert info.value.anomaly.step == index
    mon.remove()


def test_a_users_sink_that_raises_never_breaks_training():
    class Broken:
        def write_step(self, step, rows):
            raise RuntimeError("my dashboard is down")

        def close(self):
            pass

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = healthmon.watch(model, sinks=[Broken()])
    with pytest.warns(RuntimeWarning, match="Broken raised in write_step"):
        step(model, opt)
    step(model, opt)  # dropped: no second warning, training goes on
    assert mon.sinks == []
    mon.remove()
