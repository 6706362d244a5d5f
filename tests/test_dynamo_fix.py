"""The Dynamo bug our traced gradient hooks trigger (healthmon/dynamo_fix.py), without any
trainer library: an object whose ``__dict__`` Dynamo read before a watched module's output
got its gradient hook, and that is mutated after it. torch 2.13's ``__dict__`` proxy writes
that mutation into the side-effects table the hook's speculative trace threw away, reads
``AttributeError`` back and runs the frame eagerly (transformers' ``DynamicLayer`` does this
in every GPT-2 forward; tests/test_compile_hf.py has that model)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import healthmon
from healthmon import dynamo_fix
from test_compile import fresh_dynamo  # noqa: F401  (fixture)

needs_fix = pytest.mark.skipif(dynamo_fix._proxy_class() is None,
                               reason="this torch's Dynamo has no __dict__ proxy to fix")


class _State:
    def __init__(self):
        self.ready = False


class LazyStateNet(torch.nn.Module):
    """Reads a fresh object's ``__dict__``, calls a watched child, then sets an attribute of
    the object and reads it back (the shape of transformers' lazily initialised caches)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)

    def forward(self, x):
        state = _State()
        if not state.ready:
            h = self.a(x)
            state.scale = 2.0
        return self.b(h * state.scale)


def run(watched: bool, compiled: bool, steps: int = 3):
    """The last step's ``(site, phase, role)`` set (None unwatched) and Dynamo's graphs."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = LazyStateNet()
    mon = healthmon.watch(model, sync=False) if watched else None
    try:
        fwd = torch.compile(model, backend="aot_eager") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            fwd(torch.randn(2, 4)).pow(2).mean().backward()
            opt.step()
        graphs = counters["stats"]["unique_graphs"]
        if mon is None:
            return None, graphs
        mon.check()
        assert not mon.anomalies, mon.anomalies[0].report()
        return {(r["site"], r["phase"], r["role"]) for r in mon.records()}, graphs
    finally:
        if mon is not None:
            mon.remove()


@needs_fix
def test_watched_model_compiles_to_the_unwatched_graph_count():
    _, unwatched = run(False, True)
    sites, watched = run(True, True)
    assert unwatched == 1
    assert watched == unwatched
    eager, _ = run(True, False)
    assert ("a", "backward", "grad_output") in eager
    assert sites == eager


@needs_fix
def test_the_bug_is_real_without_the_fix(monkeypatch):
    """Red without the fix: the watched model runs part of its frame eagerly."""
    monkeypatch.setattr(dynamo_fix, "install", lambda: False)
    _, watched = run(True, True)
    assert watched > 1


@needs_fix
def test_fix_is_installed_while_a_monitor_is_attached():
    assert not dynamo_fix.installed()
    a, b = LazyStateNet(), LazyStateNet()
    mon_a, mon_b = healthmon.watch(a), healthmon.watch(b)
    try:
        assert dynamo_fix.installed()
        mon_a.remove()
        assert dynamo_fix.installed()  # b is still watched
    finally:
        mon_a.remove()
        mon_b.remove()
    assert not dynamo_fix.installed()


def test_off_monitor_installs_nothing(monkeypatch):
    monkeypatch.setenv("HEALTHMON", "off")
    mon = healthmon.watch(LazyStateNet())
    assert not dynamo_fix.installed()
    mon.remove()


@needs_fix
def test_proxy_reads_the_table_its_graph_holds_now():
    """The descriptor itself: a proxy sees the table its graph holds now, not the one
    current when it was made."""
    dynamo_fix.install()
    try:
        class Graph:
            pass

        class Table:
            def __init__(self, graph):
                self.output_graph_weakref = lambda: graph

        cls = dynamo_fix._proxy_class()
        graph = Graph()
        graph.side_effects = first = Table(graph)
        proxy = cls.__new__(cls)
        proxy.side_effects = first
        graph.side_effects = second = Table(graph)
        assert proxy.side_effects is second
        orphan = cls.__new__(cls)
        orphan.side_effects = lone = object()  # a table without a graph: kept as assigned
        assert orphan.side_effects is lone
    finally:
        dynamo_fix.uninstall()
