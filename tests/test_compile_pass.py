"""healthmon/compile_pass.py: Inductor merges a compiled graph's small records into one
``healthmon::multi_record_to`` call, keeps large ones and never moves a record past a node
that mutates or has side effects; the records are eager's; the pass is in Inductor's config
only while a monitor is attached, after the user's own."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import healthmon
from healthmon import compile_pass, ops
from test_compile import fresh_dynamo  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="native extension not built (make build)")

RECORD = "torch.ops.healthmon.record_to.default("
MULTI = "torch.ops.healthmon.multi_record_to.default("


class Tower(nn.Module):
    """Tiny blocks (small records) and, with ``wide``, one activation over SMALL_BYTES."""

    def __init__(self, wide: bool = False):
        super().__init__()
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(16, 16), nn.ReLU())
                                      for _ in range(4)))
        self.wide = nn.Linear(16, 4096) if wide else None  # 8 x 4096 float32: 128 KiB
        self.head = nn.Linear(4096 if wide else 16, 3)

    def forward(self, x):
        h = self.blocks(x)
        return self.head(self.wide(h) if self.wide is not None else h)


def _rows(mon):
    return {(r["site"], r["phase"], r["role"]): r for r in mon.records()}


def _compiled_and_eager(wide: bool):
    """One training step of a watched compiled Tower and of a watched eager copy: Inductor's
    code and both monitors' rows."""
    torch.manual_seed(0)
    model, eager = Tower(wide), Tower(wide)
    eager.load_state_dict(model.state_dict())
    x = torch.randn(8, 16)
    mon, ref = healthmon.watch(model, sync=False), healthmon.watch(eager, sync=False)
    try:
        fwd = torch.compile(model, backend="inductor")
        _, codes = run_and_get_code(lambda: fwd(x).square().mean().backward())
        eager(x).square().mean().backward()
        mon.step()
        ref.step()
        mon.check()
        ref.check()
        return "\n".join(codes), _rows(mon), _rows(ref)
    finally:
        mon.remove()
        ref.remove()


def _assert_same_rows(got, want):
    assert got.keys() == want.keys()
    for key, row in want.items():
        for field in ("numel", "nan", "posinf", "neginf", "zeros", "finite"):
            assert got[key][field] == row[field], (key, field)
        scale = 1 + math.sqrt(row["sumsq"])
        for field in ("min", "max", "sum", "sumsq"):
            assert abs(got[key][field] - row[field]) <= 1e-4 * (abs(row[field]) + scale), \
                (key, field, got[key][field], row[field])


def test_small_records_are_one_call_per_graph_with_eager_rows():
    source, got, want = _compiled_and_eager(wide=False)
    assert source.count(MULTI) == 2, source  # one in the forward graph, one in the backward
    assert RECORD not in source
    assert ("blocks.3.1", "backward", "grad_output") in got
    _assert_same_rows(got, want)


def test_a_large_tensor_keeps_its_own_record():
    source, got, want = _compiled_and_eager(wide=True)
    assert source.count(MULTI) >= 2
    singles = re.findall(re.escape(RECORD) + r"(\w+)", source)
    assert singles, "the 128 KiB activation and its gradient should be recorded alone"
    _assert_same_rows(got, want)


# ----------------------------------------------------------------- the pass on FX graphs

def _graph(mutate_between: bool):
    """a, b small, c large: record(a); [a.add_(1)]; record(b); record(c); record(a)."""
    g = torch.fx.Graph()
    a, b, c = (g.placeholder(n) for n in "abc")
    a.meta["val"], b.meta["val"] = torch.empty(4, 4), torch.empty(8)
    c.meta["val"] = torch.empty(compile_pass.SMALL_BYTES // 4 + 1)
    rec = torch.ops.healthmon.record_to.default
    g.call_function(rec, (a, 0, 0))
    if mutate_between:
        g.call_function(torch.ops.aten.add_.Tensor, (a, 1))
    g.call_function(rec, (b, 0, 1))
    g.call_function(rec, (c, 0, 2))
    g.call_function(rec, (a, 0, 3))
    g.output(None)
    return g


def _calls(g):
    """``(op name, args)`` of each call, nodes by name, lists as tuples."""
    def arg(a):
        if isinstance(a, list):
            return tuple(arg(x) for x in a)
        return a.name if isinstance(a, torch.fx.Node) else a
    return [(n.target._opname, tuple(arg(a) for a in n.args))
            for n in g.nodes if n.op == "call_function"]


def test_pass_merges_small_records_and_keeps_large_ones():
    g = _graph(mutate_between=False)
    assert compile_pass.merge_records(g) == 3
    g.lint()
    assert _calls(g) == [("record_to", ("c", 0, 2)),
                         ("multi_record_to", (("a", "b", "a"), (0, 0, 0), (0, 1, 3)))]


def test_pass_never_moves_a_record_past_a_mutation():
    g = _graph(mutate_between=True)
    assert compile_pass.merge_records(g) == 2  # record(a) stays before a.add_(1)
    g.lint()
    assert _calls(g) == [("record_to", ("a", 0, 0)), ("add_", ("a", 1)),
                         ("record_to", ("c", 0, 2)),
                         ("multi_record_to", (("b", "a"), (0, 0), (1, 3)))]


def test_pass_groups_keep_at_most_group_bytes_alive(monkeypatch):
    monkeypatch.setattr(compile_pass, "GROUP_BYTES", 64 + 32)  # a (64 B) + b (32 B)
    g = _graph(mutate_between=False)
    assert compile_pass.merge_records(g) == 2
    assert [c[0] for c in _calls(g)] == ["multi_record_to", "record_to", "record_to"]


# ----------------------------------------------------------------- installed while attached

class _UserPass(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        _UserPass.calls += 1

    def uuid(self):
        return "user-pass"


def test_pass_is_in_inductors_config_while_attached_after_the_users(monkeypatch):
    user = _UserPass()
    monkeypatch.setattr(inductor_config, "post_grad_custom_post_pass", user)
    # a graph from Inductor's on-disk cache (an earlier run of this test) runs no pass
    monkeypatch.setattr(inductor_config, "force_disable_caches", True)
    a, b = Tower(), Tower()
    mon_a, mon_b = healthmon.watch(a), healthmon.watch(b)
    try:
        assert inductor_config.post_grad_custom_post_pass == [user, compile_pass._PASS]
        mon_a.remove()
        assert compile_pass.installed()  # b still watched
        _UserPass.calls = 0
        torch.compile(b, backend="inductor")(torch.randn(2, 16)).sum().backward()
        assert _UserPass.calls >= 1  # the user's pass still runs
    finally:
        mon_a.remove()
        mon_b.remove()
    assert inductor_config.post_grad_custom_post_pass is user
    assert not compile_pass.installed()


def test_off_monitor_leaves_inductors_config_alone(monkeypatch):
    monkeypatch.setenv("HEALTHMON", "off")
    before = inductor_config.post_grad_custom_post_pass
    mon = healthmon.watch(Tower())
    assert inductor_config.post_grad_custom_post_pass is before
    mon.remove()
