"""Benchmark models of ``bench/overhead.py``, written here (no torchvision / transformers).

CPU set (fp32):
    ``mlp``          4-layer MLP, 512 -> 1024 -> 1024 -> 1024 -> 10, batch 128
    ``unet``         small UNet-like segmentation CNN (3 levels, 16/32/64 channels, BatchNorm),
                     batch 8 x 3 x 64 x 64, 4 classes, per-pixel cross-entropy
    ``transformer``  transformer encoder, 6 layers, d=512, 8 heads, FF 2048, batch 8 x 128
                     tokens (vocab 1000), token-level cross-entropy
GPU set (bf16 autocast, fp32 master weights):
    ``gpt2``         GPT-2-small-sized decoder: 12 layers, d=768, 12 heads, vocab 50257,
                     context 1024, batch 8 x 1024 (124 M parameters)
    ``resnet50``     ResNet-50-sized CNN: bottleneck stages [3, 4, 6, 3], 224 x 224, batch 64,
                     1000 classes (25.6 M parameters)

``tiny=True`` shrinks every model to a few thousand parameters (smoke tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

CPU_MODELS = ("mlp", "unet", "transformer")
GPU_MODELS = ("gpt2", "resnet50")
ALL_MODELS = CPU_MODELS + GPU_MODELS


# --------------------------------------------------------------------------- MLP

class MLP(nn.Module):
    def __init__(self, d_in: int = 512, hidden: int = 1024, depth: int = 3, classes: int = 10):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.body(x))


# --------------------------------------------------------------------------- UNet-like

class ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(x)))


class SmallUNet(nn.Module):
    """Encoder 3 levels (c, 2c, 4c), bottleneck 8c, decoder with transposed convs and skips."""

    def __init__(self, cin: int = 3, classes: int = 4, c: int = 16):
        super().__init__()
        self.enc1, self.enc2, self.enc3 = ConvBlock(cin, c), ConvBlock(c, 2 * c), \
            ConvBlock(2 * c, 4 * c)
        self.mid = ConvBlock(4 * c, 8 * c)
        self.up3 = nn.ConvTranspose2d(8 * c, 4 * c, 2, stride=2)
        self.dec3 = ConvBlock(8 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = ConvBlock(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = ConvBlock(2 * c, c)
        self.head = nn.Conv2d(c, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        d3 = self.dec3(torch.cat([self.up3(m), e3], 1))
        d2 = self.dec2(torch.cat([self.up2(d3), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


# --------------------------------------------------------------------------- transformers

class TokenEncoder(nn.Module):
    """Embedding + ``nn.TransformerEncoder`` (pre-norm, GELU, no dropout) + vocabulary head."""

    def __init__(self, vocab: int = 1000, d: int = 512, layers: int = 6, heads: int = 8,
                 ff: int = 2048, ctx: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.head(self.norm(self.encoder(x)))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2-small-sized decoder (tied input / output embeddings)."""

    def __init__(self, vocab: int = 50257, ctx: int = 1024, d: int = 768, layers: int = 12,
                 heads: int = 12):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------- ResNet-50-like

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + idt)


class ResNet(nn.Module):
    """ResNet-50 layout: stem, bottleneck stages ``blocks`` of widths 64/128/256/512."""

    def __init__(self, blocks=(3, 4, 6, 3), classes: int = 1000, base: int = 64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(base), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], base
        for i, n in enumerate(blocks):
            width = base * 2 ** i
            stage = []
            for j in range(n):
                stage.append(Bottleneck(cin, width, stride=2 if (j == 0 and i > 0) else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --------------------------------------------------------------------------- specs

@dataclass
class BenchModel:
    """One model ready for a training step: ``loss = loss_fn(model(*inputs), target)``."""
    name: str
    model: nn.Module
    inputs: tuple
    target: torch.Tensor
    loss_fn: Callable
    amp_dtype: Optional[torch.dtype]
    lr: float
    description: str

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _ce_tokens(logits, target):
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten())


def _ce(logits, target):
    return F.cross_entropy(logits.float(), target)


def build(name: str, device: torch.device, tiny: bool = False, batch: Optional[int] = None,
          seed: int = 0) -> BenchModel:
    """Build model ``name`` with a fixed synthetic batch on ``device``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        b = batch or (8 if tiny else 128)
        m = MLP(32, 64, 2) if tiny else MLP()
        d_in = m.body[0].in_features
        x = torch.randn(b, d_in, generator=g)
        t = torch.randint(0, 10, (b,), generator=g)
        spec = BenchModel(name, m, (x,), t, _ce, None, 1e-3,
                          f"MLP {d_in}->{m.head.in_features}x3->10, batch {b}")
    elif name == "unet":
        b = batch or (2 if tiny else 8)
        hw = 16 if tiny else 64
        m = SmallUNet(c=4 if tiny else 16)
        x = torch.randn(b, 3, hw, hw, generator=g)
        t = torch.randint(0, 4, (b, hw, hw), generator=g)
        spec = BenchModel(name, m, (x,), t, _ce, None, 1e-3,
                          f"UNet-like 3 levels, batch {b}x3x{hw}x{hw}, 4 classes")
    elif name == "transformer":
        b = batch or (2 if tiny else 8)
        ctx = 16 if tiny else 128
        m = TokenEncoder(vocab=50, d=32, layers=2, heads=4, ff=64, ctx=ctx) if tiny \
            else TokenEncoder(ctx=ctx)
        vocab = m.head.out_features
        x = torch.randint(0, vocab, (b, ctx), generator=g)
        t = torch.randint(0, vocab, (b, ctx), generator=g)
        spec = BenchModel(name, m, (x,), t, _ce_tokens, None, 1e-4,
                          f"transformer encoder {len(m.encoder.layers)} layers "
                          f"d={m.norm.normalized_shape[0]}, batch {b}x{ctx}")
    elif name == "gpt2":
        b = batch or (2 if tiny else 8)
        ctx = 32 if tiny else 1024
        m = GPT(vocab=256, ctx=ctx, d=64, layers=2, heads=4) if tiny else GPT(ctx=ctx)
        vocab = m.head.out_features
        x = torch.randint(0, vocab, (b, ctx), generator=g)
        t = torch.randint(0, vocab, (b, ctx), generator=g)
        spec = BenchModel(name, m, (x,), t, _ce_tokens, torch.bfloat16, 3e-4,
                          f"GPT-2-small-sized decoder {len(m.blocks)}x{m.ln_f.normalized_shape[0]}, "
                          f"batch {b}x{ctx}, bf16 autocast")
    elif name == "resnet50":
        b = batch or (2 if tiny else 64)
        hw = 32 if tiny else 224
        m = ResNet(blocks=(1, 1, 1, 1), base=8, classes=10) if tiny else ResNet()
        classes = m.fc.out_features
        x = torch.randn(b, 3, hw, hw, generator=g)
        t = torch.randint(0, classes, (b,), generator=g)
        spec = BenchModel(name, m, (x,), t, _ce, torch.bfloat16, 1e-3,
                          f"ResNet-50-sized CNN, batch {b}x3x{hw}x{hw}, bf16 autocast")
    else:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(ALL_MODELS)})")
    spec.model.to(device)
    if device.type == "cuda" and name == "resnet50":
        spec.model.to(memory_format=torch.channels_last)
        spec.inputs = tuple(i.to(device, memory_format=torch.channels_last) for i in spec.inputs)
    else:
        spec.inputs = tuple(i.to(device) for i in spec.inputs)
    spec.target = spec.target.to(device)
    return spec


# --------------------------------------------------------------------------- small-model set
# ``bench/small.py`` and ``bench/compiled.py`` (issue 14: small models, where the monitor's
# fixed cost per recorded tensor is not amortised). One ``step`` = one optimizer step, which
# for the policy is one episode of several batch-1 forwards.

SMALL_MODELS = ("cnn", "lstm", "policy", "deep")


class BNConvNet(nn.Module):
    """BatchNorm CNN for 64 px images: 5 conv-BN-ReLU layers (32/32/64/64/128), 3 poolings,
    global average pooling, linear head."""

    def __init__(self, classes: int = 10, c: int = 32):
        super().__init__()
        chans = [3, c, c, 2 * c, 2 * c, 4 * c]
        layers = []
        for i in range(5):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
            if i in (1, 3, 4):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class LSTMLM(nn.Module):
    """pytorch/examples word_language_model shape: embedding, 2-layer LSTM, decoder."""

    def __init__(self, vocab: int = 2000, d: int = 200, hidden: int = 200, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, hidden, layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.decoder(out)


class Policy(nn.Module):
    """pytorch/examples actor_critic: shared layer, action head, value head. Returns
    log-probabilities (``log_softmax``: ``log(softmax)`` reaches -inf, then NaN, after a few
    hundred updates on the bench's fixed episode -- healthmon caught it)."""

    def __init__(self, obs: int = 4, hidden: int = 128, actions: int = 2):
        super().__init__()
        self.affine1 = nn.Linear(obs, hidden)
        self.action_head = nn.Linear(hidden, actions)
        self.value_head = nn.Linear(hidden, 1)

    def forward(self, x):
        x = F.relu(self.affine1(x))
        return F.log_softmax(self.action_head(x), dim=-1), self.value_head(x)


class DeepStack(nn.Module):
    """``depth`` tiny Linear+ReLU blocks: kernel time negligible, so the step time is
    host time (what a launch-bound GPU model pays per recorded tensor)."""

    def __init__(self, depth: int = 50, width: int = 32, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.ReLU())
                                      for _ in range(depth)))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.blocks(x))


@dataclass
class SmallModel:
    """One model and its optimizer step: ``step(model, opt)`` runs forward(s), loss,
    backward and ``opt.step()``; ``forward(model)`` runs the forward part only (compile
    warm-up and profiling)."""
    name: str
    model: nn.Module
    step: Callable
    description: str
    lr: float = 1e-2

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _supervised_step(x, y, loss_fn):
    def step(model, opt):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def _policy_step(obs, actions, returns):
    """One actor-critic update: ``len(obs)`` batch-1 forwards (one per environment step),
    then one backward of policy and value losses. Actions and returns are precomputed
    (no environment, no sampling): every variant does the same work."""
    def step(model, opt):
        logps, values = [], []
        for t in range(obs.shape[0]):
            logp, value = model(obs[t])
            logps.append(logp[0, actions[t]])
            values.append(value[0, 0])
        values = torch.stack(values)
        adv = returns - values.detach()
        loss = -(torch.stack(logps) * adv).sum() + F.smooth_l1_loss(values, returns)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def build_small(name: str, device: torch.device, tiny: bool = False,
                seed: int = 0) -> SmallModel:
    """Build small model ``name`` (see :data:`SMALL_MODELS`) with fixed synthetic data."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    if name == "cnn":
        b, hw = (2, 16) if tiny else (16, 64)
        m = BNConvNet(c=4 if tiny else 32)
        x, y = torch.randn(b, 3, hw, hw, generator=g), torch.randint(0, 10, (b,), generator=g)
        x, y = x.to(device), y.to(device)
        spec = SmallModel(name, m, _supervised_step(x, y, _ce),
                          f"BatchNorm CNN 5 conv, batch {b}x3x{hw}x{hw}")
    elif name == "lstm":
        b, t = (2, 8) if tiny else (20, 35)
        m = LSTMLM(vocab=50, d=16, hidden=16) if tiny else LSTMLM()
        vocab = m.decoder.out_features
        x = torch.randint(0, vocab, (b, t), generator=g).to(device)
        y = torch.randint(0, vocab, (b, t), generator=g).to(device)
        spec = SmallModel(name, m, _supervised_step(x, y, _ce_tokens),
                          f"2-layer LSTM LM d={m.rnn.hidden_size}, vocab {vocab}, batch {b}x{t}")
    elif name == "policy":
        k = 4 if tiny else 20
        m = Policy(hidden=16 if tiny else 128)
        obs = torch.randn(k, 1, 4, generator=g).to(device)
        actions = torch.randint(0, 2, (k,), generator=g).tolist()
        returns = torch.randn(k, generator=g).to(device)
        spec = SmallModel(name, m, _policy_step(obs, actions, returns),
                          f"actor-critic policy, batch 1, {k} forwards per optimizer step",
                          lr=1e-3)  # the same episode thousands of times: keep it finite
    elif name == "deep":
        depth, b = (5, 2) if tiny else (50, 8)
        m = DeepStack(depth=depth)
        x, y = torch.randn(b, 32, generator=g), torch.randint(0, 10, (b,), generator=g)
        x, y = x.to(device), y.to(device)
        spec = SmallModel(name, m, _supervised_step(x, y, _ce),
                          f"{depth} x (Linear 32x32 + ReLU), batch {b}")
    else:
        raise ValueError(f"unknown small model {name!r} (choose from {', '.join(SMALL_MODELS)})")
    spec.model.to(device)
    return spec


def as_small(spec: BenchModel) -> SmallModel:
    """A :func:`build` model as a :class:`SmallModel` (one supervised step)."""
    x = spec.inputs[0] if len(spec.inputs) == 1 else None
    if x is None:
        raise ValueError("as_small: one input only")
    return SmallModel(spec.name, spec.model, _supervised_step(x, spec.target, spec.loss_fn),
                      spec.description, spec.lr)
