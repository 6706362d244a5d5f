"""healthmon inside real training stacks (issue 12): a Lightning Trainer with its default
sanity validation and checkpointing, whole-model checkpoints with ``torch.save(model)``, an
EMA copy made with ``copy.deepcopy``, per-sample gradients with ``torch.func.vmap``, and a
Hugging Face GPT-2 built from a tiny config (no download) with its causal mask. Each is
silent when healthy, and a NaN injected mid-model is found and named.

lightning and transformers are test dependencies (installed by ``make``).
"""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import healthmon
import healthmon.sinks


class Scale(nn.Module):
    """Multiplies by a buffer: the place a NaN is injected mid-model."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("factor", torch.ones(n))

    def forward(self, x):
        return x * self.factor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.scale = Scale(16)
        self.l2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.l2(self.scale(self.act(self.l1(x))))


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def _train(model, opt, batches, inject_at=None):
    for i, (x, y) in enumerate(batches):
        if i == inject_at:
            model.scale.factor[2] = math.nan
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# ----------------------------------------------------------------------------- Lightning

def _loader(n, seed=0):
    from torch.utils.data import DataLoader, TensorDataset
    xs, ys = zip(*_batches(n, seed))
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=8)


def _lightning_module(inject_at=None):
    import lightning as L

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Net()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if batch_idx == inject_at:
                self.net.scale.factor[2] = math.nan
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            return _loader(8)

        def val_dataloader(self):
            return _loader(2, seed=1)

    return Lit()


def _trainer(tmp_path):
    import lightning as L
    return L.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp_path)  # default: 2 sanity val steps, checkpoints


class Collect(healthmon.sinks.Sink):
    def __init__(self):
        self.steps = {}

    def write_step(self, step, rows):
        self.steps.setdefault(step, []).extend(rows)


def test_lightning_trainer_with_sanity_validation_is_silent_when_healthy(tmp_path):
    module = _lightning_module()
    sink = Collect()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        with healthmon.watch(module, sinks=[sink]) as mon:
            trainer = _trainer(tmp_path)
            trainer.validate(module)  # a baseline evaluation, under torch.inference_mode
            trainer.fit(module)
            mon.check()
    assert mon.anomalies == []
    grads = [s for s, rows in sink.steps.items()
             if any(r["site"] == "net.l2" and r["phase"] == "grad" for r in rows)]
    assert len(grads) == 8  # every training step recorded, with its parameter gradients
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))  # Lightning's checkpoint written


def test_lightning_trainer_finds_and_names_a_nan_mid_model(tmp_path):
    module = _lightning_module(inject_at=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        with pytest.raises(healthmon.HealthError) as err:
            with healthmon.watch(module):
                _trainer(tmp_path).fit(module)
    a = err.value.anomaly
    assert (a.site, a.phase, a.kind) == ("net.scale", "forward", "nan")
    # the sanity validation (no_grad) is not a step: batch 3 is the fourth optimizer step
    assert a.step == 3
    assert all(torch.isfinite(p).all() for p in module.parameters())  # weights kept


# ----------------------------------------------------------------------------- checkpoints, EMA

def test_torch_save_of_a_watched_model_and_its_reload():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with healthmon.watch(model) as mon:
        _train(model, opt, _batches(3))
        buf = io.BytesIO()
        torch.save(model, buf)  # a whole-model checkpoint, mid-training
        _train(model, opt, _batches(3, seed=2))
        mon.check()
    assert mon.anomalies == []
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    # nothing of the monitor fires in the reloaded model: a NaN there is torch's business
    loaded.scale.factor[0] = math.nan
    out = loaded(torch.randn(2, 6))
    assert torch.isnan(out).any()
    assert mon.anomalies == []


def test_ema_copy_made_with_deepcopy_is_not_the_original():
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = healthmon.watch(model)
    ema = copy.deepcopy(model)  # timm ModelEma, a teacher network
    for i, (x, y) in enumerate(_batches(6)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(0.9).add_(pm, alpha=0.1)
            ema(x)  # evaluating the copy is not a step of the original
    mon.check()
    assert mon.step_index == 6 and mon.anomalies == []
    ema.scale.factor[1] = math.nan  # a NaN in the copy is not reported as the original's
    with torch.no_grad():
        ema(torch.randn(2, 6))
    mon.check()
    assert mon.anomalies == []
    mon.remove()
    hooks = [m._forward_hooks for m in ema.modules()] + \
        [m._forward_pre_hooks for m in ema.modules()]
    assert not any(h for h in hooks)  # nothing of ours on the copy after remove()
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in ema.parameters())


# ----------------------------------------------------------------------------- vmap

def test_per_sample_gradients_with_vmap_are_silent_then_find_a_nan():
    torch.manual_seed(0)
    model = Net()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}
    x, y = _batches(1)[0]

    def loss(p, xs, ys):
        out = torch.func.functional_call(model, (p, buffers), (xs.unsqueeze(0),))
        return F.cross_entropy(out, ys.unsqueeze(0))

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    want = per_sample(params, x, y)
    with healthmon.watch(model) as mon:
        got = per_sample(params, x, y)
        mon.check()
        assert mon.anomalies == []
        for k in want:
            assert torch.equal(got[k], want[k])
        buffers["scale.factor"] = buffers["scale.factor"].clone()
        buffers["scale.factor"][5] = math.nan
        with pytest.raises(healthmon.HealthError) as err:
            per_sample(params, x, y)
            mon.check()
    a = err.value.anomaly
    assert (a.site, a.phase, a.kind) == ("scale", "forward", "nan")


# ----------------------------------------------------------------------------- GPT-2

def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _gpt2_steps(model, steps, inject_at=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        ids = torch.randint(0, 64, (2, 12), generator=g)
        attention = torch.ones_like(ids)
        attention[1, -3:] = 0  # right padding: the causal mask is combined with padding
        if i == inject_at:
            with torch.no_grad():
                model.transformer.h[1].mlp.c_fc.weight[0, 0] = math.nan
        out = model(input_ids=ids, attention_mask=attention, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def test_gpt2_from_a_config_is_silent_when_healthy():
    model = _tiny_gpt2()
    with healthmon.watch(model) as mon:
        _gpt2_steps(model, 3)
        mon.check()
    assert mon.anomalies == []
    sites = {r["site"] for r in mon.records()}
    assert {"transformer.wte", "transformer.h.1.attn.c_attn", "lm_head"} <= sites


def test_gpt2_nan_mid_model_is_found_and_named():
    model = _tiny_gpt2()
    with pytest.raises(healthmon.HealthError) as err:
        with healthmon.watch(model):
            _gpt2_steps(model, 4, inject_at=2)
    a = err.value.anomaly
    assert (a.site, a.phase, a.kind, a.step) == ("transformer.h.1.mlp.c_fc", "forward",
                                                 "nan", 2)
    assert "_gpt2_steps" in str(err.value)  # the user's line


def test_gpt2_token_ids_beyond_the_vocabulary_are_named():
    model = _tiny_gpt2()
    ids = torch.randint(0, 64, (2, 12))
    ids[1, 4] = 70  # a tokenizer with more tokens than the model's vocabulary
    with healthmon.watch(model):
        with pytest.raises(healthmon.HealthError) as err:
            model(input_ids=ids)
    a = err.value.anomaly
    assert (a.kind, a.role) == ("index", "indices")
    assert a.stats.bad_values == ((70, 1),) and a.stats.first_bad_index == (1, 4)
    assert "resize_token_embeddings" in str(err.value)
