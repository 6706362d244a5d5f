"""Small seeded models and batches for the tests of :mod:`healthmon.checks`, each with a
deliberate bug switch; ``bug=None`` gives the correct twin."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


class SmallCNN(nn.Module):
    """(B, 3, 16, 16) float32 images -> (B, 10) logits.

    bug: None, "view" (x.view(C, B, -1) instead of a permute mixes the batch),
    "disconnected" (a layer whose output is discarded), "softmax_twice" (returns
    probabilities to a cross-entropy loss), "dead" (ReLU after conv2 killed by its bias).
    """

    def __init__(self, bug: Optional[str] = None, width: int = 16):
        super().__init__()
        self.bug = bug
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.act2 = nn.ReLU()
        self.extra = nn.Linear(2 * width, 2 * width)
        self.head = nn.Linear(2 * width, NUM_CLASSES)
        if bug == "dead":
            with torch.no_grad():
                self.conv2.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        b, c, hh, ww = h.shape
        if self.bug == "view":   # wants channel-first (C, B, HW) for a per-channel pooling
            pooled = h.view(c, b, hh * ww).mean(2).t()
        else:
            pooled = h.permute(1, 0, 2, 3).reshape(c, b, hh * ww).mean(2).t()
        if self.bug == "disconnected":
            _unused = self.extra(pooled)          # computed, never used
            feat = pooled
        else:
            feat = pooled + F.relu(self.extra(pooled))
        logits = self.head(feat)
        if self.bug == "softmax_twice":
            return logits.softmax(dim=1)
        return logits


class CirclesMLP(nn.Module):
    """(B, 2) float32 points -> (B, 2) logits. bug="no_activation" drops the ReLUs;
    bug="ignores_input" zeroes the input in forward (a learned constant model)."""

    def __init__(self, bug: Optional[str] = None, hidden: int = 64):
        super().__init__()
        self.bug = bug
        act = nn.Identity if bug == "no_activation" else nn.ReLU
        self.net = nn.Sequential(nn.Linear(2, hidden), act(), nn.Linear(hidden, hidden), act(),
                                 nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bug == "ignores_input":
            x = x * 0
        return self.net(x)


def image_batch(batch_size: int = 16, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised images float32 (B, 3, 16, 16) ~ N(0, 1) and int64 labels (B,) in [0, 10)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 16, 16, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    return x, y


def circles_batch(n: int = 64, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two concentric rings, float32 (n, 2), labels int64 (n,): not linearly separable."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    y = torch.arange(n) % 2
    radius = torch.where(y == 0, 0.5, 1.5) + 0.05 * torch.randn(n, generator=g)
    x = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return x, y


def make(model_cls, bug=None, seed: int = 0, **kw):
    """The model built under a fixed seed."""
    torch.manual_seed(seed)
    return model_cls(bug, **kw)
