"""Synthetic but realistic monitor rows (real TensorStats of real tensors) and an Anomaly,
for the sink and report tests."""
from __future__ import annotations

import traceback
from typing import List

import torch

from healthmon import stats
from healthmon.errors import Anomaly

LAYERS = ["<input>", "encoder.0.conv", "encoder.1.conv", "encoder.2.conv",
          "decoder.blocks.0.upsample_and_concatenate.conv", "decoder.1.conv", "head"]
PARAMS = ["weight", "bias"]
BAD_LAYER, BAD_STEP = "decoder.1.conv", 20


def _row(site: str, phase: str, role: str, order: int, t: torch.Tensor) -> dict:
    return {"site": site, "phase": phase, "role": role, "call": 0, "order": order,
            **stats(t).as_dict()}


def make_step(step: int, seed: int = 0, bad: bool = False) -> List[dict]:
    """One step's rows in execution order: forward outputs (inputs first), output gradients
    and parameter gradients backwards; gradients shrink towards the input (vanishing), the
    ``head`` activations grow with the step; ``bad`` puts NaN/Inf into ``BAD_LAYER``."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    rows, order = [], 0
    for i, site in enumerate(LAYERS):
        scale = 1.0 + 0.3 * i + (0.2 * step if site == "head" else 0.0)
        t = torch.randn(2, 8, 16, 16, generator=g) * scale
        if site != "<input>":
            t = t.relu() if site != "head" else t
        if bad and site == BAD_LAYER:
            t[0, 0, :3, 0] = float("nan")
            t[1, 0, 0, 0] = float("inf")
        rows.append(_row(site, "input" if site == "<input>" else "forward",
                         "input[0]" if site == "<input>" else "output", order, t))
        order += 1
    for i, site in reversed(list(enumerate(LAYERS[1:], start=1))):
        gscale = 10.0 ** (-(len(LAYERS) - i) * 0.7)
        go = torch.randn(2, 8, 16, 16, generator=g) * gscale
        if bad and i <= LAYERS.index(BAD_LAYER):
            go[0, 0, 0, 0] = float("nan")
        rows.append(_row(site, "backward", "grad_output", order, go))
        order += 1
        for p in PARAMS:
            shape = (8, 8, 3, 3) if p == "weight" else (8,)
            gp = torch.randn(*shape, generator=g) * gscale * (3.0 if p == "weight" else 1.0)
            if bad and i <= LAYERS.index(BAD_LAYER):
                gp.view(-1)[0] = float("nan")
            rows.append(_row(site, "grad", p, order, gp))
            order += 1
    return rows


def make_anomaly(step: int = BAD_STEP, rank=None) -> Anomaly:
    """A NaN anomaly in ``BAD_LAYER``'s forward output, with a real stack."""
    t = torch.ones(2, 8, 16, 16)
    t[0, 0, :3, 0] = float("nan")
    t[1, 0, 0, 0] = float("inf")
    later = Anomaly(site="head", phase="forward", role="output", step=step, kind="nan",
                    stats=stats(t))
    return Anomaly(site=BAD_LAYER, phase="forward", role="output", step=step, kind="nan",
                   stats=stats(t), stack=traceback.extract_stack(), rank=rank,
                   last_healthy=stats(torch.ones(4)), consequences=[later])
