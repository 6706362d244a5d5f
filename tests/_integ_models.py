"""Tiny models for tests/test_integrations.py, importable by spawned DDP processes.

Run as a script (``python _integ_models.py OUT_DIR``) it trains :class:`TinyModule` with
Lightning's ``ddp`` strategy on 2 CPU processes (gloo), a NaN injected on rank 1 at global
step 3; each rank writes what ``fit`` raised to ``OUT_DIR/rank<R>.json``.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import lightning as L
import torch
from torch import nn


class Inject(nn.Module):
    """Identity, except that it returns NaN while ``armed`` (a fresh tensor: the NaN is this
    module's own forward output)."""

    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, x):
        return x * float("nan") if self.armed else x


class TinyModule(L.LightningModule):
    """Linear -> Inject -> ReLU -> Linear; ``net.1`` returns NaN at ``bad_step`` on
    ``bad_rank`` (None: every rank); records the global step of every training batch."""

    def __init__(self, bad_step=None, bad_rank=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), Inject(), nn.ReLU(), nn.Linear(8, 1))
        self.bad_step, self.bad_rank = bad_step, bad_rank
        self.batch_steps = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.batch_steps.append(self.trainer.global_step)
        self.net[1].armed = (self.trainer.global_step == self.bad_step and
                             self.bad_rank in (None, self.global_rank))
        loss = ((self.net(x) - y) ** 2).mean()
        self.net[1].armed = False
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(batches: int, batch_size: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ds = torch.utils.data.TensorDataset(torch.randn(batches * batch_size, 4, generator=g),
                                        torch.randn(batches * batch_size, 1, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size)


def _ddp_main(out: str) -> None:
    """One rank of a 2-process Lightning ``ddp`` run (rank 0 is this process; Lightning
    starts rank 1 by running this script again)."""
    from healthmon.integrations.lightning import HealthmonCallback

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=6,
                        callbacks=[HealthmonCallback()], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    model = TinyModule(bad_step=3, bad_rank=1)
    rec = {"type": None}
    try:
        trainer.fit(model, loader(8))
    except Exception as exc:  # what fit raised on this rank
        a = getattr(exc, "anomaly", None)
        rec = {"type": type(exc).__name__, "message": str(exc),
               "step": a.step if a else None, "site": a.site if a else None}
    rec["global_step"] = trainer.global_step
    rec["batch_steps"] = model.batch_steps
    rec["hooks_left"] = sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                            for m in model.modules()) + sum(
        len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    _ddp_main(sys.argv[1])
