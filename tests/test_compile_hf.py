"""A Hugging Face model (transformers' GPT-2, tiny config) watched and compiled.

The records are eager's, and the watched model compiles to as many graphs as the unwatched
one. Without healthmon/dynamo_fix.py it compiled to 9 against 2: the gradient hooks that the
traced forward hooks register on intermediate tensors made torch 2.13's Dynamo lose
``DynamicLayer.lazy_initialization``'s ``self.device = ...`` (an ``AttributeError`` on the
next line), and it ran transformers' ``capture_outputs`` frames eagerly.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import healthmon
from test_compile import fresh_dynamo  # noqa: F401  (fixture)

transformers = pytest.importorskip("transformers")

STEPS = 3


def make():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                  n_positions=32, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def train(model, fwd) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        ids = torch.randint(0, 100, (2, 16), generator=g)
        out = fwd(input_ids=ids, labels=ids)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()


def sites(watched: bool, compiled: bool):
    """The last step's ``(site, phase, role)`` set (None unwatched) and the graph count."""
    torch._dynamo.reset()
    counters.clear()
    model = make()
    mon = healthmon.watch(model, sync=False) if watched else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' config notes
            train(model, torch.compile(model, backend="aot_eager") if compiled else model)
        if mon is None:
            return None, counters["stats"]["unique_graphs"]
        mon.check()
        assert not mon.anomalies, mon.anomalies[0].report()
        return ({(r["site"], r["phase"], r["role"]) for r in mon.records()},
                counters["stats"]["unique_graphs"])
    finally:
        if mon is not None:
            mon.remove()


def test_compiled_gpt2_records_what_eager_records():
    eager, _ = sites(True, False)
    compiled, _ = sites(True, True)
    assert any(s.startswith("transformer.h.1.") for s, _, _ in eager)
    assert compiled == eager, (f"missing {sorted(eager - compiled)[:8]}, "
                               f"extra {sorted(compiled - eager)[:8]}")


def test_compiled_gpt2_adds_no_graph():
    _, unwatched = sites(False, True)
    _, watched = sites(True, True)
    assert watched == unwatched
