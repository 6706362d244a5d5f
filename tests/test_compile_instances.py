"""Several instances of one model class in a process, one of them watched, all compiled.

Dynamo caches compiled code per code object (``forward`` of the class), guarded on what the
trace read; by default it does not guard on module hooks. An unwatched instance (a teacher,
an EMA copy made before ``watch()``, a model built twice) then compiles code without the
monitor's hooks that the watched instance can run: a silent loss of every submodule record.
These tests train both instances in one process, in both orders, and compare the watched
instance's sites with eager's.
"""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch._dynamo

import torch.nn as nn

import healthmon
from test_compile import fresh_dynamo, make, train, watch  # noqa: F401  (fixture)

BACKEND = "aot_eager"


def build(kind: str, seed: int) -> nn.Module:
    """``mlp``: a custom root (its hooks run eagerly around the compiled forward);
    ``sequential``: an ``nn.Sequential`` root, whose own hooks ``torch.compile`` traces
    (no forward of it is seen on the host)."""
    if kind == "mlp":
        return make("mlp", seed)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def site_set(mon) -> set:
    return {(r["site"], r["phase"], r["role"]) for r in mon.records()}


def eager_sites(kind: str) -> set:
    model = build(kind, seed=5)
    mon = healthmon.watch(model, sync=False)
    try:
        train(model, model, "mlp", 1)
        mon.check()
        return site_set(mon)
    finally:
        mon.remove()


@pytest.mark.parametrize("kind", ["mlp", "sequential"])
@pytest.mark.parametrize("order", ["watch_first", "unwatched_compiled_first"])
def test_watched_instance_never_runs_an_unwatched_instance_code(order, kind):
    expected = eager_sites(kind)
    assert any(phase == "forward" and site != "<model>" for site, phase, _ in expected)
    teacher, student = build(kind, seed=0), build(kind, seed=1)
    if order == "unwatched_compiled_first":
        fteacher = torch.compile(teacher, backend=BACKEND)
        train(fteacher, teacher, "mlp", 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # watch() after compiled code of the class ran
            mon = watch(student)
        fstudent = torch.compile(student, backend=BACKEND)
        runs = [(fteacher, teacher), (fstudent, student)]
    else:
        mon = watch(student)
        fteacher = torch.compile(teacher, backend=BACKEND)
        fstudent = torch.compile(student, backend=BACKEND)
        runs = [(fstudent, student), (fteacher, teacher)]
    for step in range(3):
        for fwd, model in runs:
            train(fwd, model, "mlp", 1)
        mon.check()
        got = site_set(mon)
        assert got == expected, (f"step {step} ({order}): missing {sorted(expected - got)}, "
                                 f"extra {sorted(got - expected)}")
        # the teacher's loss is not the student's (no forward of the student was seen for it)
        phases = Counter(r["phase"] for r in mon.records())
        assert phases["loss"] == 1, phases


def test_dynamo_hook_guard_setting_is_restored_when_the_last_monitor_goes():
    before = torch._dynamo.config.skip_nnmodule_hook_guards
    a, b = make("mlp", seed=0), make("mlp", seed=1)
    mon_a = healthmon.watch(a)
    mon_b = healthmon.watch(b)
    try:
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
        mon_a.remove()
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False  # b still watched
    finally:
        mon_a.remove()
        mon_b.remove()
    assert torch._dynamo.config.skip_nnmodule_hook_guards == before


def test_off_monitor_leaves_dynamo_settings_alone(monkeypatch):
    monkeypatch.setenv("HEALTHMON", "off")
    before = torch._dynamo.config.skip_nnmodule_hook_guards
    model = make("mlp")
    mon = healthmon.watch(model)
    assert torch._dynamo.config.skip_nnmodule_hook_guards == before
    mon.remove()
