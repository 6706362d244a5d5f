"""Tiny healthy and degrading training runs for the early-warning tests and evidence script.

Every ``run_*`` function trains a small model with a real torch optimizer (and scheduler)
under ``healthmon.watch`` and returns a :class:`Run`: the monitor's warnings, the first
anomaly (error) if one was raised, and the step it came at. ``sink`` (optional) receives
the monitor's step records (the evidence script reads them).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import healthmon


@dataclass
class Run:
    steps: int
    warnings: list = field(default_factory=list)   # mon.warnings (Anomaly, severity warning)
    caught: list = field(default_factory=list)     # HealthWarning objects seen by warnings.warn
    error: Optional[healthmon.HealthError] = None
    losses: List[float] = field(default_factory=list)

    @property
    def first_bad_step(self) -> Optional[int]:
        return self.error.anomaly.step if self.error is not None else None

    def kinds(self) -> set:
        return {w.kind for w in self.warnings}

    def first(self, kind: str):
        return next((w for w in self.warnings if w.kind == kind), None)


def _train(model, opt, batches, loss_fn, steps, sched=None, clip=None, every_step=None,
           watch_kwargs=None, sink=None, autocast=None) -> Run:
    run = Run(0)
    kw = dict(watch_kwargs or {})
    if sink is not None:
        kw["sinks"] = [sink]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mon = healthmon.watch(model, **kw)
        try:
            for step in range(steps):
                if every_step is not None:
                    every_step(step, model, opt, mon)
                x, y = batches(step)
                model.train()
                if autocast is not None:
                    with torch.autocast("cpu", dtype=autocast):
                        loss = loss_fn(model(x), y)
                else:
                    loss = loss_fn(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                if sched is not None:
                    sched.step()
                run.losses.append(float(loss.detach()))
                run.steps = step + 1
            mon.check()
        except healthmon.HealthError as err:
            run.error = err
        finally:
            mon.remove()
        run.warnings = list(mon.warnings)
    run.caught = [w.message for w in seen if isinstance(w.message, healthmon.HealthWarning)]
    return run


# ----------------------------------------------------------------------------- healthy

class TinyLM(nn.Module):
    def __init__(self, vocab=48, d=32, layers=2, ctx=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx, dtype=torch.bool), 1))

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        h = self.blocks(h, mask=self.mask[:idx.shape[1], :idx.shape[1]])
        return self.head(self.norm(h))


def _lm_batches(vocab=48, ctx=16, batch=8, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def batches(step):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        stride = torch.randint(1, 4, (batch, 1), generator=gen)
        seq = (start + stride * torch.arange(ctx + 1)) % vocab
        noise = torch.rand(seq.shape, generator=gen) < 0.05
        seq = torch.where(noise, torch.randint(0, vocab, seq.shape, generator=gen), seq)
        return seq[:, :-1], seq[:, 1:]
    return batches


def run_transformer_lm(steps=300, watch_kwargs=None, sink=None) -> Run:
    """AdamW, linear warmup then cosine decay, clipping at 1.0."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    warm = 30
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else
        0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / (steps - warm)))))
    loss_fn = lambda logits, y: F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                y.reshape(-1))
    return _train(model, opt, _lm_batches(), loss_fn, steps, sched=sched, clip=1.0,
                  watch_kwargs=watch_kwargs, sink=sink)


class TinyCNN(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(self.features(x))


def _image_batches(batch=16, classes=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, 1, 8, 8, generator=gen)

    def batches(step):
        y = torch.randint(0, classes, (batch,), generator=gen)
        x = protos[y] + 0.8 * torch.randn(batch, 1, 8, 8, generator=gen)
        return x * 3 + 1, y  # unnormalised inputs: BatchNorm's job
    return batches


def run_cnn_bn(steps=300, watch_kwargs=None, sink=None, eval_every=25) -> Run:
    """BatchNorm CNN, SGD with momentum and step decay, an eval pass every ``eval_every``."""
    torch.manual_seed(1)
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100, gamma=0.1)
    batches = _image_batches()
    held = _image_batches(batch=32, seed=7)(0)

    def evaluate(step, model, opt, mon):
        if step and step % eval_every == 0:
            model.eval()
            with torch.no_grad():
                model(held[0])
            model.train()
    return _train(model, opt, batches, F.cross_entropy, steps, sched=sched,
                  every_step=evaluate, watch_kwargs=watch_kwargs, sink=sink)


class TinyLSTM(nn.Module):
    def __init__(self, vocab=32, d=16, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb.weight.requires_grad_(False)  # frozen embedding: never "frozen"
        self.lstm = nn.LSTM(d, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, idx):
        h, _ = self.lstm(self.emb(idx))
        return self.out(h)


def run_lstm(steps=300, watch_kwargs=None, sink=None) -> Run:
    """LSTM language model, Adam, clipping at 0.5, embedding with requires_grad=False."""
    torch.manual_seed(2)
    model = TinyLSTM()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = lambda logits, y: F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                y.reshape(-1))
    return _train(model, opt, _lm_batches(vocab=32, ctx=12, seed=3), loss_fn, steps,
                  clip=0.5, watch_kwargs=watch_kwargs, sink=sink)


class SparseReLUNet(nn.Module):
    """ReLU MLP whose hidden biases start negative: 50-90% of activations are zeros."""

    def __init__(self, d_in=16, hidden=64, out=4, bias=-0.6):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), \
            nn.Linear(hidden, out)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        with torch.no_grad():
            self.fc1.bias.fill_(bias)
            self.fc2.bias.fill_(bias / 2)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def _blob_batches(d_in=16, classes=4, batch=32, seed=4):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d_in, generator=gen)

    def batches(step):
        y = torch.randint(0, classes, (batch,), generator=gen)
        return centers[y] + torch.randn(batch, d_in, generator=gen), y
    return batches


def run_bf16_relu(steps=300, watch_kwargs=None, sink=None) -> Run:
    """bf16 autocast, SGD, activations mostly zeros (sparse, not dead)."""
    torch.manual_seed(3)
    model = SparseReLUNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return _train(model, opt, _blob_batches(), F.cross_entropy, steps,
                  watch_kwargs=watch_kwargs, sink=sink, autocast=torch.bfloat16)


def run_first_steps(steps=120, watch_kwargs=None, sink=None) -> Run:
    """Large initial gradients: a regression MLP at a large init and large targets, Adam."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 1, generator=gen)

    def batches(step):
        x = torch.randn(32, 8, generator=gen)
        return x, 50 * torch.sin(x @ w)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _train(model, opt, batches, F.mse_loss, steps, watch_kwargs=watch_kwargs, sink=sink)


HEALTHY = {"transformer_lm": run_transformer_lm, "cnn_bn": run_cnn_bn, "lstm": run_lstm,
           "bf16_relu": run_bf16_relu, "first_steps": run_first_steps}


# ----------------------------------------------------------------------------- degrading

def _mlp(d_in=8, hidden=32, out=1, act=nn.ReLU):
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, out))


def _regression_batches(d_in=8, batch=32, seed=6):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, 1, generator=gen)

    def batches(step):
        x = torch.randn(batch, d_in, generator=gen)
        return x, x @ w
    return batches


def run_diverging_lr(steps=400, watch_kwargs=None, sink=None, gamma=1.08) -> Run:
    """SGD whose learning rate grows by ``gamma`` per step (ExponentialLR, a schedule bug):
    the loss and gradients grow for tens of steps, then overflow."""
    torch.manual_seed(5)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    return _train(model, opt, _regression_batches(), F.mse_loss, steps, sched=sched,
                  watch_kwargs=watch_kwargs, sink=sink)


class ScaledHalf(nn.Module):
    """Returns ``x`` in float16 times a scale that grows every training step (a model whose
    activations creep toward 65504)."""

    def __init__(self, growth=1.15):
        super().__init__()
        self.growth = growth
        self.register_buffer("scale", torch.ones((), dtype=torch.float16))

    def forward(self, x):
        if self.training:
            self.scale.mul_(self.growth)
        return x.half() * self.scale


def run_fp16_creep(steps=200, watch_kwargs=None, sink=None) -> Run:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), ScaledHalf())
    head = nn.Linear(16, 1)
    full = nn.Sequential(model, _ToFloat(), head)
    opt = torch.optim.Adam(full.parameters(), lr=1e-3)
    return _train(full, opt, _regression_batches(batch=16), F.mse_loss, steps,
                  watch_kwargs=watch_kwargs, sink=sink)


class _ToFloat(nn.Module):
    def forward(self, x):
        return x.float() / 1e4


def run_dead_relu(steps=200, kill_at=60, watch_kwargs=None, sink=None) -> Run:
    """At step ``kill_at`` the first hidden layer's bias is set to -100: its ReLU output is
    all zeros from then on (and its weight/bias gradients exactly zero)."""
    torch.manual_seed(7)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def kill(step, model, opt, mon):
        if step == kill_at:
            with torch.no_grad():
                model[0].bias.fill_(-100.0)
    return _train(model, opt, _regression_batches(), F.mse_loss, steps, every_step=kill,
                  watch_kwargs=watch_kwargs, sink=sink)


class HeadModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.body(x))


def run_head_replaced(steps=120, watch_kwargs=None, sink=None) -> Run:
    """The head is replaced after the optimizer was built: its parameters never update."""
    torch.manual_seed(8)
    model = HeadModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.head = nn.Linear(32, 1)  # the bug: opt still holds the old head's parameters
    return _train(model, opt, _regression_batches(), F.mse_loss, steps,
                  watch_kwargs=watch_kwargs, sink=sink)


def run_mse_overflow(steps=60, bad_at=30, watch_kwargs=None, sink=None) -> Run:
    """MSE against targets that jump to 1e20 at step ``bad_at``: the squared error overflows
    float32 to inf while every model tensor stays finite."""
    torch.manual_seed(9)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    base = _regression_batches()

    def batches(step):
        x, y = base(step)
        return (x, y * 1e20) if step >= bad_at else (x, y)
    return _train(model, opt, batches, F.mse_loss, steps, watch_kwargs=watch_kwargs, sink=sink)


def run_vanishing(steps=160, at=60, watch_kwargs=None, sink=None) -> Run:
    """A sigmoid MLP whose first layer's weights are scaled by 1e4 at step ``at`` (a bad
    re-initialisation): the first hidden layer saturates, its sigmoid derivative underflows,
    and the first layer's gradient collapses to ~0 while the loss stays high."""
    torch.manual_seed(10)
    model = _mlp(act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)

    def saturate(step, model, opt, mon):
        if step == at:
            with torch.no_grad():
                model[0].weight.mul_(1e4)
                model[0].bias.mul_(1e4)
    return _train(model, opt, _regression_batches(), F.mse_loss, steps, every_step=saturate,
                  watch_kwargs=watch_kwargs, sink=sink)


def run_loss_spike(steps=200, at=120, watch_kwargs=None, sink=None) -> Run:
    """One batch at step ``at`` has inputs 300x larger (a corrupt batch): loss and
    gradient norms spike for one step, nothing becomes non-finite."""
    torch.manual_seed(11)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    base = _regression_batches()

    def batches(step):
        x, y = base(step)
        return (x * 300, y) if step == at else (x, y)
    return _train(model, opt, batches, F.mse_loss, steps, watch_kwargs=watch_kwargs, sink=sink)


def run_target_scale(steps=200, watch_kwargs=None, sink=None) -> Run:
    """Healthy: a small-init MLP fitting targets of scale ~30 with Adam; its output abs-max
    grows ~100x during the first steps (fitting, not diverging: the loss falls)."""
    torch.manual_seed(12)
    model = _mlp()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(0.1)
                m.bias.zero_()
    base = _regression_batches(seed=13)

    def batches(step):
        x, y = base(step)
        return x, 30 * y
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    return _train(model, opt, batches, F.mse_loss, steps, watch_kwargs=watch_kwargs, sink=sink)


HEALTHY["target_scale"] = run_target_scale
