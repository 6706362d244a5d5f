"""healthmon under ``torch.compile`` (issue 13): no added graph break or recompile, the same
findings as eager, gradients under AOTAutograd and compiled autograd, export, ``healthmon
run`` on compiling scripts, fixed record buffers (CUDA-graph readiness, checked on CPU).

Every count is taken against the *unwatched* model compiled the same way in the same
process (``torch._dynamo.reset()`` between cases), so the tests do not depend on how many
graphs this torch version happens to make. Graphs are counted by a counting backend
(``torch._dynamo.testing.CompileCounterWithBackend``, which wraps ``eager`` / ``aot_eager``
/ ``inductor``), graph breaks by ``torch._dynamo.utils.counters["graph_break"]``, and
recompiles as graphs compiled after the warm-up steps. Failure messages print the break
reasons, so whoever reads a failure sees what breaks.

Backends: ``aot_eager`` (AOTAutograd, so backward graphs and their hooks are real, without
Inductor's code generation time) almost everywhere; ``inductor`` in the main break-count
test and in one detection-parity test.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import healthmon
from healthmon import HealthError
from healthmon.sinks import Sink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)


# ----------------------------------------------------------------- private access (one place)

def record_buffers(mon) -> List[torch.Tensor]:
    """The monitor's device record buffers. The only place this file reaches into the
    monitor's private state: when the recorder renames or splits its buffers (forward /
    backward), update this function and nothing else."""
    out = []
    for buf in mon._rec.buffers.values():
        for name in ("records", "forward", "backward", "fwd", "bwd"):
            t = getattr(buf, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def compiled_slots(mon, key: int) -> List[int]:
    """Rows of compiled sites in the buffer registered under ``key``."""
    buf = healthmon._C.registered_buffer(key)
    return [s.slot for s in mon._rec.sites.values() if s.compiled and s.buffer.records is buf]


def traced_buffer_keys(mon) -> List[int]:
    """The keys under which the monitor registered buffers for compiled code."""
    return list(mon._rec._traced_keys.values())


def python_forward_hooks(mon, fn):
    """Run ``fn()``; returns its result and the module indexes whose output the monitor's
    Python forward path handled (the C++ fast path's misses). Seen by a profile function:
    a wrapper would add a frame and change the stacks the fast path re-checks."""
    code, seen = type(mon)._on_forward.__code__, []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is code:
            seen.append(frame.f_locals.get("index"))

    sys.setprofile(profile)
    try:
        return fn(), seen
    finally:
        sys.setprofile(None)


# ----------------------------------------------------------------- models

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


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class _GradAdd(torch.autograd.Function):
    """Identity forward; the backward adds ``add`` (zeros, or a NaN / Inf in element 0) to
    the incoming gradient. ``add`` is a tensor, so switching it on changes no guard."""

    @staticmethod
    def forward(ctx, x, add):
        ctx.save_for_backward(add)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (add,) = ctx.saved_tensors
        return g + add, None


class Inject(nn.Module):
    """``x * scale`` (``scale`` a parameter of ones) with three tensor switches (buffers of
    zeros; the test writes a NaN / Inf into element 0 to switch one on):
    ``fwd_add`` into the output, ``bwd_add`` into the gradient of the input (an activation
    gradient), ``param_add`` into the gradient of ``scale`` only (activation gradients stay
    finite). Plain tensor values: eager and compiled runs execute the same graph."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))
        self.register_buffer("fwd_add", torch.zeros(d), persistent=False)
        self.register_buffer("bwd_add", torch.zeros(d), persistent=False)
        self.register_buffer("param_add", torch.zeros(d), persistent=False)

    def forward(self, x):
        x = _GradAdd.apply(x, self.bwd_add)
        x = x * _GradAdd.apply(self.scale, self.param_add)
        return x + self.fwd_add

    @torch.no_grad()
    def switch(self, where: Optional[str], value: float = 0.0) -> None:
        for b in (self.fwd_add, self.bwd_add, self.param_add):
            b.zero_()
        if where is not None:
            getattr(self, {"forward": "fwd_add", "backward": "bwd_add",
                           "param": "param_add"}[where])[0] = value


class TinyLM(nn.Module):
    """Decoder LM: 2 layers, d=32, 4 heads, vocab 64, context 16; ``inject`` between the
    blocks."""

    def __init__(self, vocab: int = 64, ctx: int = 16, d: int = 32, layers: int = 2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.inject = Inject(d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        x = self.blocks[0](x)
        x = self.inject(x)
        for block in self.blocks[1:]:
            x = block(x)
        return self.head(self.ln_f(x))


class MLP(nn.Module):
    def __init__(self, d: int = 16, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.ReLU()
        self.inject = Inject(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(self.inject(self.act(self.fc1(x))))


def make(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyLM() if kind == "lm" else MLP()


def batch(kind: str, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "lm":
        return torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16),
                                                                         generator=g)
    return torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


def loss_of(out, y):
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


# ----------------------------------------------------------------- Dynamo bookkeeping

_MONITORS: list = []  # every monitor a test made, removed at its end (even on failure)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every case starts from an empty Dynamo cache and empty counters, and leaves no live
    monitor behind (the loss guard is process-wide: a stale monitor would check the next
    test's losses, inside its compiled regions too)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    while _MONITORS:
        _MONITORS.pop().remove()
    torch._dynamo.reset()
    counters.clear()


def breaks() -> int:
    return sum(counters["graph_break"].values())


def break_reasons(limit: int = 12) -> str:
    """The graph-break reasons Dynamo counted, first line of each, most frequent first."""
    items = sorted(counters["graph_break"].items(), key=lambda kv: -kv[1])
    if not items:
        return "  (no graph break)"
    lines = []
    for reason, n in items[:limit]:
        text = " | ".join(ln.strip() for ln in reason.splitlines() if ln.strip())
        lines.append(f"  {n:3d} x {text[:400]}")
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more reasons")
    return "\n".join(lines)


class TooManyGraphs(Exception):
    """Raised by :class:`CappedCounter` (fail fast instead of compiling every extra graph
    with Inductor: today's watched LM takes minutes that way)."""


class CappedCounter(CompileCounterWithBackend):
    """Counts graphs like its base; with ``cap``, refuses to compile graph ``cap + 1``."""

    def __init__(self, backend: str, cap: Optional[int] = None):
        super().__init__(backend)
        self.cap = cap

    def __call__(self, gm, example_inputs, **kw):
        if self.cap is not None and self.frame_count >= self.cap:
            self.frame_count += 1
            raise TooManyGraphs(f"graph {self.frame_count} requested; the unwatched model "
                                f"compiles to {self.cap}")
        return super().__call__(gm, example_inputs, **kw)


def _caused_by(exc: Optional[BaseException], kind) -> Optional[BaseException]:
    """The first exception of type ``kind`` in ``exc``'s cause / context chain."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class Count:
    """Graphs, graph breaks and reasons of one compiled run."""

    def __init__(self, cnt: CompileCounterWithBackend, after_warmup: Optional[int] = None,
                 stopped: Optional[str] = None):
        self.graphs = cnt.frame_count
        self.breaks = breaks()
        self.reasons = break_reasons()
        self.after_warmup = after_warmup  # graphs compiled after the warm-up steps
        self.stopped = stopped  # the run was cut short at a graph over the cap

    def __repr__(self):
        stop = f" (STOPPED: {self.stopped})" if self.stopped else ""
        return (f"{self.graphs} graphs, {self.breaks} graph breaks, "
                f"{self.after_warmup} graphs compiled after warm-up{stop}\n"
                f"break reasons:\n{self.reasons}")


def train(fwd, model: nn.Module, kind: str, steps: int, *, warmup: int = 0,
          cnt: Optional[CompileCounterWithBackend] = None, inject=None,
          restore: bool = False, compiled_backward: Optional[str] = None) -> Optional[int]:
    """``steps`` SGD steps of ``model`` through ``fwd`` (the model or its compiled form).

    Args:
        inject: ``{step: (where, value)}`` switched on for that step only.
        restore: copy the initial weights back after every step (a bad step then does not
            poison the next one; every step computes the same function).
        compiled_backward: run ``loss.backward()`` under compiled autograd with this
            backend (the forward stays as ``fwd`` is).
    Returns:
        graphs compiled after ``warmup`` steps (when ``cnt`` is given).
    """
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()} if restore else None
    seen = None
    for step in range(steps):
        if cnt is not None and step == warmup:
            seen = cnt.frame_count
        if inject is not None:
            where, value = inject.get(step, (None, 0.0))
            model.inject.switch(where, value)
        x, y = batch(kind, step)
        out = fwd(x)  # the user line every forward-site stack must end at
        loss = loss_of(out, y)
        opt.zero_grad(set_to_none=True)
        if compiled_backward is None:
            loss.backward()
        else:
            with torch._dynamo.compiled_autograd._enable(
                    torch.compile(backend=compiled_backward)):
                loss.backward()
        opt.step()
        if restore:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(init[k])
    if inject is not None:
        model.inject.switch(None)
    return None if cnt is None else cnt.frame_count - seen


def watch(model, **kw):
    kw.setdefault("sync", False)
    mon = healthmon.watch(model, **kw)
    _MONITORS.append(mon)
    return mon


def compiled_run(kind: str, scenario: str, backend: str, steps: int = 4, warmup: int = 2,
                 fullgraph: bool = False, cap: Optional[int] = None,
                 **watch_kw) -> Tuple[Count, object]:
    """Train a fresh model compiled as ``scenario`` says; returns its counts and monitor.

    scenario: ``unwatched``; ``watch-then-compile`` (``watch(model)``, then
    ``torch.compile(model)``); ``watch-then-method`` (``watch(model)``, then
    ``model.compile()``); ``compile-then-watch`` (``torch.compile(model)``, then
    ``watch(model)`` before the first call). ``cap``: stop at the first graph beyond it
    (the count then says STOPPED).
    """
    torch._dynamo.reset()
    counters.clear()
    model = make(kind)
    cnt = CappedCounter(backend, cap)
    mon = None
    if scenario == "unwatched":
        fwd = torch.compile(model, backend=cnt, fullgraph=fullgraph)
    elif scenario == "watch-then-compile":
        mon = watch(model, **watch_kw)
        fwd = torch.compile(model, backend=cnt, fullgraph=fullgraph)
    elif scenario == "watch-then-method":
        mon = watch(model, **watch_kw)
        model.compile(backend=cnt, fullgraph=fullgraph)
        fwd = model
    elif scenario == "compile-then-watch":
        fwd = torch.compile(model, backend=cnt, fullgraph=fullgraph)
        mon = watch(model, **watch_kw)
    else:
        raise ValueError(scenario)
    try:
        after = train(fwd, model, kind, steps, warmup=warmup, cnt=cnt)
    except Exception as exc:
        cause = _caused_by(exc, TooManyGraphs)
        if cause is None:
            raise
        return Count(cnt, None, stopped=str(cause)), mon
    count = Count(cnt, after)
    if mon is not None:
        mon.check()
    return count, mon


def assert_same_as_unwatched(base: Count, got: Count, what: str) -> None:
    msg = f"{what}:\n  unwatched: {base!r}\n  watched:   {got!r}"
    if got.stopped:
        pytest.fail("healthmon adds graphs or recompiles. " + msg, pytrace=False)
    assert got.breaks == base.breaks, "healthmon adds graph breaks. " + msg
    assert got.graphs == base.graphs, "healthmon adds graphs. " + msg
    assert got.after_warmup == 0, "recompiles after warm-up. " + msg


SCENARIOS = ["watch-then-compile", "watch-then-method", "compile-then-watch"]


# ----------------------------------------------------------------- graph breaks / recompiles

@pytest.mark.parametrize("kind", ["lm", "mlp"])
def test_unwatched_baseline_compiles_to_one_graph(kind):
    """The models themselves compile without a break (so any break below is healthmon's)."""
    base, _ = compiled_run(kind, "unwatched", "eager")
    assert base.breaks == 0 and base.graphs == 1 and base.after_warmup == 0, repr(base)
    base_fg, _ = compiled_run(kind, "unwatched", "eager", fullgraph=True)
    assert base_fg.graphs == 1, repr(base_fg)


def test_no_added_break_inductor_lm():
    """The main count, with Inductor: ``watch(model)`` then ``torch.compile(model)`` on the
    LM makes exactly the unwatched graphs, no break, no recompile, and still records."""
    base, _ = compiled_run("lm", "unwatched", "inductor", steps=3)
    got, mon = compiled_run("lm", "watch-then-compile", "inductor", steps=3, cap=base.graphs)
    try:
        assert_same_as_unwatched(base, got, "lm, watch then torch.compile, inductor")
        rows = mon.records()
        phases = {r["phase"] for r in rows}
        assert {"forward", "backward", "grad"} <= phases, sorted(phases)
    finally:
        mon.remove()


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("kind", ["lm", "mlp"])
def test_no_added_break_or_recompile(kind, scenario):
    base, _ = compiled_run(kind, "unwatched", "aot_eager")
    # capped (fail fast), except the cheap MLP case, whose message then has every reason
    cap = None if (kind, scenario) == ("mlp", "watch-then-compile") else base.graphs
    got, mon = compiled_run(kind, scenario, "aot_eager", cap=cap)
    try:
        assert_same_as_unwatched(base, got, f"{kind}, {scenario}, aot_eager")
        assert mon.records(), "no records from the compiled model"
        assert not mon.anomalies
    finally:
        mon.remove()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fullgraph_works_watched(scenario):
    """``fullgraph=True`` compiles unwatched, so it must compile watched (a break raises)."""
    compiled_run("lm", "unwatched", "aot_eager", fullgraph=True)  # raises if it cannot
    mon = None
    try:
        got, mon = compiled_run("lm", scenario, "aot_eager", fullgraph=True)
    except Exception as exc:
        pytest.fail(f"fullgraph=True fails when watched ({scenario}): "
                    f"{type(exc).__name__}: {str(exc)[:1500]}")
    try:
        assert got.graphs == 1 and got.breaks == 0, repr(got)
        assert mon.records()
    finally:
        mon.remove()


class StepSink(Sink):
    """Remembers which steps were decoded and how many rows each had."""

    def __init__(self):
        self.steps: Dict[int, int] = {}

    def write_step(self, step, rows):
        self.steps[step] = len(rows)

    def write_anomaly(self, anomaly):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("every", [1, 3])
def test_cadence_no_recompile_over_50_steps(every):
    """52 training steps with ``every=N``: no graph compiled after warm-up (the cadence
    must be a device-side flag or equivalent, not a guard), the unwatched graph and break
    counts, and the monitored steps are exactly those the cadence says."""
    steps, warmup = 52, 2 * every
    base, _ = compiled_run("mlp", "unwatched", "aot_eager", steps=steps, warmup=warmup)
    sink = StepSink()
    got, mon = compiled_run("mlp", "watch-then-compile", "aot_eager", steps=steps,
                            warmup=warmup, every=every, sinks=[sink], cap=base.graphs)
    try:
        assert_same_as_unwatched(base, got, f"mlp, every={every}, {steps} steps")
        recorded = sorted(s for s, n in sink.steps.items() if n)
        assert recorded == list(range(0, steps, every)), recorded
        assert len(set(n for n in sink.steps.values() if n)) == 1, sink.steps
        assert not mon.anomalies
    finally:
        mon.remove()


def test_cadence_skips_the_record_kernels_in_compiled_code():
    """``every=2`` under compile: in a step the cadence skips, the compiled graph's record
    op writes nothing (its rows keep the "not written" marker, -1): the work is skipped,
    not just the decode, and the graph is the same."""
    model = make("mlp")
    mon = watch(model, every=2)
    fwd = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    written = []
    for step in range(4):
        x, y = batch("mlp", step)
        loss = loss_of(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        rows = [healthmon._C.registered_buffer(k)[compiled_slots(mon, k), 0]
                for k in traced_buffer_keys(mon)]
        written.append(all(bool((r >= 0).all()) for r in rows if r.numel()))
        assert any(r.numel() for r in rows)
        if not written[-1]:
            assert all(bool((r == -1).all()) for r in rows)
        opt.step()
    mon.check()
    assert written == [True, False, True, False], written


# ----------------------------------------------------------------- detection parity

SCHEDULE = {  # step -> (where, value); every other step is healthy
    2: ("forward", float("nan")),
    4: ("forward", float("inf")),
    6: ("backward", float("nan")),
    8: ("backward", float("-inf")),
    10: ("param", float("nan")),
    12: ("param", float("inf")),
}


def user_frame(stack) -> Optional[Tuple[str, int, str]]:
    """The innermost frame of the stack in this test file (the user's code here)."""
    for fr in reversed(stack or []):
        if os.path.abspath(fr.filename) == HERE:
            return (os.path.basename(fr.filename), fr.lineno, fr.name)
    return None


def findings(mon) -> List[tuple]:
    return [(a.step, a.site, a.phase, a.role, a.kind, user_frame(a.stack))
            for a in mon.anomalies]


def run_schedule(kind: str, backend: Optional[str], steps: int, schedule: dict,
                 compiled_backward: Optional[str] = None):
    """A monitored run (``on_anomaly="log"``, weights restored after every step) in eager
    (``backend`` None) or compiled, its backward under compiled autograd with
    ``compiled_backward``; returns (findings, rows of the healthy step 0)."""
    torch._dynamo.reset()
    model = make(kind)
    mon = watch(model, on_anomaly="log")
    fwd = model if backend is None else torch.compile(model, backend=backend)
    try:
        train(fwd, model, kind, 1, compiled_backward=compiled_backward)
        mon.check()
        rows0 = {(r["site"], r["phase"], r["role"], r["call"]): r for r in mon.records()}
        # start again from the same weights: step 0 above changed them
        model.load_state_dict(make(kind).state_dict())
        train(fwd, model, kind, steps, inject=schedule, restore=True,
              compiled_backward=compiled_backward)
        mon.check()
        return findings(mon), rows0
    finally:
        mon.remove()


STAT_KEYS = ("numel", "nan", "posinf", "neginf", "zeros", "finite", "min", "max", "sum",
             "sumsq", "absmax")


def assert_rows_close(eager: dict, comp: dict, rtol: float, atol: float) -> None:
    assert set(comp) == set(eager), (
        f"compiled records other sites than eager:\n  only eager: "
        f"{sorted(set(eager) - set(comp))}\n  only compiled: {sorted(set(comp) - set(eager))}")
    bad = []
    for key, e in eager.items():
        c = comp[key]
        for s in STAT_KEYS:
            if c[s] != pytest.approx(e[s], rel=rtol, abs=atol, nan_ok=True):
                bad.append(f"{key} {s}: eager {e[s]!r}, compiled {c[s]!r}")
    assert not bad, "statistics differ:\n  " + "\n  ".join(bad[:20])


@pytest.mark.parametrize("backend,kind", [("aot_eager", "lm"), ("aot_eager", "mlp"),
                                          ("inductor", "mlp")])
def test_detection_parity_eager_vs_compiled(backend, kind):
    """Injected NaN / Inf in a forward output, an activation gradient and a parameter
    gradient: the compiled run reports each at the same step, site, phase, role, kind and
    user line as eager; a healthy compiled step records the same sites with the same
    statistics."""
    steps = max(SCHEDULE) + 2
    want, rows_e = run_schedule(kind, None, steps, SCHEDULE)
    # the eager run is the reference: it must itself see every injection, once per step
    # (monitor steps are one ahead of the schedule: the healthy step 0 ran first)
    assert [f[0] for f in want] == [s + 1 for s in sorted(SCHEDULE)], want
    assert all(f[5] is not None for f in want), f"eager stack has no frame here: {want}"
    got, rows_c = run_schedule(kind, backend, steps, SCHEDULE)
    assert got == want, ("compiled findings differ from eager\n  eager:    "
                         + "\n            ".join(map(str, want)) + "\n  compiled: "
                         + "\n            ".join(map(str, got)))
    tol = dict(rtol=1e-5, atol=1e-6) if backend != "inductor" else dict(rtol=1e-3, atol=1e-5)
    assert_rows_close(rows_e, rows_c, **tol)


def several_forwards_run(backend: Optional[str], steps: int, schedule: dict,
                         forwards: int = 3, explicit_step: bool = False
                         ) -> Tuple[List[tuple], int, int]:
    """Like an RL policy called once per environment step: ``forwards`` compiled (or eager)
    forwards of batch 1, summed into one loss, one backward per step; ``explicit_step``:
    ``mon.step()`` after every ``opt.step()`` (a boundary with nothing in it). Returns
    (findings, backward records of the last healthy step, the monitor's step number)."""
    torch._dynamo.reset()
    model = make("mlp")
    mon = watch(model, on_anomaly="log")
    fwd = model if backend is None else torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for step in range(steps):
            where, value = schedule.get(step, (None, 0.0))
            model.inject.switch(where, value)
            x, y = batch("mlp", step)
            loss = sum(loss_of(fwd(x[i:i + 1]), y[i:i + 1]) for i in range(forwards))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if explicit_step:
                mon.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(init[k])
        model.inject.switch(None)
        mon.check()
        grads = [r for r in mon.records() if r["phase"] in ("backward", "grad")]
        return findings(mon), len(grads), mon.step_index
    finally:
        mon.remove()


def test_explicit_step_after_the_optimizer_step_counts_one_step():
    """``mon.step()`` right after ``opt.step()`` ends nothing more under compile than in
    eager (on the CPU, where the monitor sees that no compiled record was written since the
    boundary): same step numbers, same finding."""
    schedule = {3: ("forward", float("nan"))}
    want = several_forwards_run(None, 5, schedule, forwards=1, explicit_step=True)
    assert [f[0] for f in want[0]] == [3] and want[2] == 5
    assert several_forwards_run("aot_eager", 5, schedule, forwards=1,
                                explicit_step=True) == want


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_several_compiled_forwards_feed_one_backward(backend):
    """Several compiled forwards before one backward (the batch-1 policy): no autograd
    version-counter error (the graphs neither save nor mutate the record buffers), and
    NaN / Inf injected forward, into an activation gradient and into a parameter gradient
    are found at the same step, site, phase and line as eager."""
    schedule = {1: ("forward", float("nan")), 3: ("backward", float("inf")),
                5: ("param", float("nan"))}
    want, eager_grads, _ = several_forwards_run(None, 7, schedule)
    assert [f[0] for f in want] == [1, 3, 5], want
    got, compiled_grads, _ = several_forwards_run(backend, 7, schedule)
    assert got == want, f"compiled {got}\n eager {want}"
    assert compiled_grads > 0


def test_compiled_model_runs_on_after_remove():
    """After ``remove()`` the compiled model trains on, and a graph that still calls the
    monitor's record op (traced while watched) writes nothing and raises nothing: the
    buffers are unregistered."""
    model = make("mlp")
    mon = watch(model)
    fwd = torch.compile(model, backend="aot_eager")
    train(fwd, model, "mlp", 2)
    keys = traced_buffer_keys(mon)
    assert keys, "compiled code registered no record buffer"
    mon.remove()
    train(fwd, model, "mlp", 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for key in keys:
        torch.ops.healthmon.record_to(torch.full((3,), float("nan")), key, 0)  # dropped
        with pytest.raises(RuntimeError, match="no record buffer under key"):
            healthmon._C.registered_buffer(key)


def test_sync_mode_compiled_raises_at_same_site():
    """Sync mode under compile: a forward NaN still raises a HealthError naming the same
    site and phase as eager (no silent pass because the hook was traced away)."""
    out = {}
    for backend in (None, "aot_eager"):
        torch._dynamo.reset()
        model = make("mlp")
        mon = watch(model, sync=True)
        fwd = model if backend is None else torch.compile(model, backend=backend)
        try:
            with pytest.raises(HealthError) as info:
                train(fwd, model, "mlp", 3, inject={1: ("forward", float("nan"))})
            a = info.value.anomaly
            out[backend] = (a.step, a.site, a.phase, a.role, a.kind)
        finally:
            mon.remove()
    assert out["aot_eager"] == out[None], out


def several_runs_per_step_findings(backend: Optional[str]) -> List[tuple]:
    """Three forwards of one graph before one backward per step; a NaN in the input batch
    of the second forward of step 2 only. Returns the findings without the call number
    (eager: call 1 of the step; compiled: the graph's one site)."""
    torch._dynamo.reset()
    model = make("mlp")
    mon = watch(model, on_anomaly="log")
    fwd = model if backend is None else torch.compile(model, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    try:
        for step in range(4):
            losses = []
            for run in range(3):
                x, y = batch("mlp", 3 * step + run)
                if (step, run) == (2, 1):
                    x[0, 0] = math.nan
                losses.append(loss_of(fwd(x), y))
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).nan_to_num().sum().backward()
            opt.step()
        mon.check()
        return [(a.step, a.site, a.phase, a.role, a.kind) for a in mon.anomalies]
    finally:
        mon.remove()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_graph_run_several_times_per_step_keeps_a_nan_of_any_run(backend):
    """The rows of a compiled graph run several times in one step (a policy, gradient
    accumulation) merge every run: a NaN in one run is reported where eager reports it,
    not overwritten by the next healthy run."""
    want = several_runs_per_step_findings(None)
    assert want and want[0][:3] == (2, "<input>", "input"), want
    got = several_runs_per_step_findings(backend)
    assert got[:1] == want[:1], (got, want)


# ----------------------------------------------------------------- compiled autograd

def compiled_autograd_run(watched: bool, steps: int = 3):
    """A compiled train step (forward, loss and backward in one compiled function) with
    compiled autograd; returns (records of the last step or None, compiled-autograd
    captures)."""
    model = make("mlp")
    mon = watch(model) if watched else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    # the flag is read when torch.compile wraps the function: set it before
    with torch._dynamo.config.patch(compiled_autograd=True):
        @torch.compile(backend="aot_eager")
        def fwd_bwd(x, y):
            loss = loss_of(model(x), y)
            loss.backward()
            return loss

        try:
            for step in range(steps):
                x, y = batch("mlp", step)
                opt.zero_grad(set_to_none=True)
                fwd_bwd(x, y)
                opt.step()
            rows = None
            if mon is not None:
                mon.check()
                rows = mon.records()
        finally:
            if mon is not None:
                mon.remove()
    return model, rows, counters["compiled_autograd"]["captures"]


def test_compiled_autograd_train_step_records_param_grads():
    """A compiled train step with compiled autograd: no crash, and every parameter gradient
    and some output gradients are recorded (the unwatched run proves compiled autograd
    really ran)."""
    _, _, captures = compiled_autograd_run(watched=False)
    assert captures > 0, "compiled autograd did not run unwatched (test set-up)"
    base_breaks, base_reasons = breaks(), break_reasons()
    torch._dynamo.reset()
    counters.clear()
    model, rows, captures = compiled_autograd_run(watched=True)
    assert captures > 0, "compiled autograd did not run watched"
    # unwatched, Tensor.backward inside the compiled function is a graph break already
    assert breaks() == base_breaks, f"unwatched:\n{base_reasons}\nwatched:\n{break_reasons()}"
    params = {tuple(n.rsplit(".", 1)) for n, _ in model.named_parameters()}
    for phase in ("grad", "param"):  # gradients, and the weights after the update
        got = {(r["site"], r["role"]) for r in rows if r["phase"] == phase}
        assert got == params, f"{phase} records: {sorted(got)}"
    assert any(r["phase"] == "backward" for r in rows), "no output gradient recorded"


@pytest.mark.parametrize("fast", ["1", "0"])
def test_eager_forward_compiled_autograd_backward(monkeypatch, fast):
    """Eager forward, backward under compiled autograd (the eager gradient hooks, C++ fast
    path or Python, are traced into the compiled backward): no graph break, the same records
    as eager (parameters included) and the same findings at the same user lines."""
    monkeypatch.setenv("HEALTHMON_FASTPATH", fast)
    kind = "mlp"
    steps = max(SCHEDULE) + 2
    want, rows_e = run_schedule(kind, None, steps, SCHEDULE)
    assert [f[0] for f in want] == [s + 1 for s in sorted(SCHEDULE)], want
    torch._dynamo.reset()
    counters.clear()
    got, rows_c = run_schedule(kind, None, steps, SCHEDULE, compiled_backward="aot_eager")
    assert counters["compiled_autograd"]["captures"] > 0, "compiled autograd did not run"
    assert breaks() == 0, break_reasons()
    assert got == want, ("findings differ from eager\n  eager:    "
                         + "\n            ".join(map(str, want)) + "\n  compiled: "
                         + "\n            ".join(map(str, got)))
    assert {k[1] for k in rows_c} >= {"forward", "backward", "grad", "param"}, sorted(rows_c)
    assert_rows_close(rows_e, rows_c, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- watch after compiled code ran

def test_watch_after_compiled_code_ran_is_never_silent():
    """``watch()`` on a model whose compiled code already ran either works (records appear
    and an injected NaN is named at the right site with a stack), or says so: an exception
    or a warning mentioning compile. Silently recording nothing fails."""
    model = make("mlp")
    fwd = torch.compile(model, backend="aot_eager")
    train(fwd, model, "mlp", 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mon = watch(model, on_anomaly="log")
        except Exception as exc:
            assert "compile" in str(exc).lower(), f"unclear error: {exc!r}"
            return
        try:
            train(fwd, model, "mlp", 3, inject={1: ("param", float("nan"))}, restore=True)
            mon.check()
            rows = mon.records()
            found = findings(mon)
        finally:
            mon.remove()
    said = [str(w.message) for w in caught if "compile" in str(w.message).lower()
            and "healthmon" in (str(w.message).lower() + w.filename)]
    if said:
        return  # warned clearly
    assert rows, "watch() after compiled code ran: no records and no warning (silent)"
    assert found and found[0][:5] == (1, "inject", "grad", "scale", "nan"), found
    assert found[0][5] is not None, f"no user frame in the stack: {found}"


# ----------------------------------------------------------------- export

@pytest.mark.parametrize("strict", [True, False])
def test_export_of_watched_model(strict):
    model = make("lm")
    mon = watch(model)
    try:
        x, _ = batch("lm", 0)
        ep = torch.export.export(model, (x,), strict=strict)
        with torch.no_grad():
            ref = model(x)
        assert torch.allclose(ep.module()(x), ref, atol=1e-5)
    finally:
        mon.remove()


# ----------------------------------------------------------------- buffers (CUDA-graph readiness)

def test_record_buffers_fixed_after_warmup():
    """After warm-up the record buffers never move (CUDA graphs capture their addresses):
    same tensors, same ``data_ptr()``, never inference tensors, over compiled steps with a
    cadence."""
    model = make("mlp")
    mon = watch(model, every=2)
    fwd = torch.compile(model, backend="aot_eager")
    try:
        train(fwd, model, "mlp", 4)
        before = [(t.data_ptr(), t.shape, t.device) for t in record_buffers(mon)]
        assert before, "no record buffer found (update record_buffers())"
        train(fwd, model, "mlp", 6)
        mon.check()
        after = [(t.data_ptr(), t.shape, t.device) for t in record_buffers(mon)]
        assert after == before
        assert not any(t.is_inference() for t in record_buffers(mon))
        assert mon.records()
    finally:
        mon.remove()


# ----------------------------------------------------------------- healthmon run

RUN_SCRIPT = """\
import torch
from torch import nn


class Normalise(nn.Module):
    def forward(self, x, div):
        return x / div


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = Normalise()

    def forward(self, x, div):
        return self.norm(self.fc(x) * 0, div)  # 0 / 0 where div is 0


model = Net()
{compile}
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(5):
    div = torch.ones(4)
    if step == 3:
        div[1] = 0.0
    loss = fwd(torch.randn(2, 4), div).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
print("finished, weights finite:", all(bool(p.isfinite().all()) for p in model.parameters()))
"""


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
def test_healthmon_run_monitors_compiling_scripts(tmp_path, how):
    code = ("fwd = torch.compile(model, backend='aot_eager')" if how == "torch.compile"
            else "model.compile(backend='aot_eager')\nfwd = model")
    script = tmp_path / "train.py"
    script.write_text(RUN_SCRIPT.format(compile=code))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHMON")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "healthmon", "run", str(script)],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
    out = p.stdout + p.stderr
    assert p.returncode == 1, f"exit {p.returncode} (want 1: NaN reported)\n{out[-3000:]}"
    assert "NaN" in out and "norm" in out and "step 3" in out, out[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_reduce_overhead_watched():
    """``mode="reduce-overhead"`` (CUDA graphs) on a watched model: no error, an injected
    forward NaN reported at its step and site, record buffers that stay put."""
    def run(watched: bool, inject=None):
        torch._dynamo.reset()
        model = make("mlp").cuda()
        mon = watch(model, on_anomaly="log") if watched else None
        fwd = torch.compile(model, mode="reduce-overhead")
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        ptrs = None
        for step in range(6):
            model.inject.switch(*(inject or {}).get(step, (None, 0.0)))
            x, y = (t.cuda() for t in batch("mlp", step))
            loss = loss_of(fwd(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if mon is not None and step == 2:
                ptrs = [t.data_ptr() for t in record_buffers(mon)]
        return mon, ptrs

    run(False)
    mon, ptrs = run(True, inject={4: ("forward", float("nan"))})
    mon.check()
    assert [t.data_ptr() for t in record_buffers(mon)] == ptrs
    found = findings(mon)
    assert found and found[0][:5] == (4, "inject", "forward", "output", "nan"), found


def test_compiled_eval_loop_with_explicit_steps_and_cadence():
    """A compiled forward-only loop ended by ``mon.step()`` with ``every=2``: every call is
    a step (the skipped ones too), and a NaN in an active step is reported at its step."""
    torch._dynamo.reset()
    model = make("mlp")
    mon = watch(model, on_anomaly="log", every=2)
    model.compile(backend="aot_eager")
    try:
        with torch.no_grad():
            for step in range(6):
                model.inject.switch("forward" if step == 4 else None, float("nan"))
                model(batch("mlp", step)[0])
                mon.step()
        model.inject.switch(None)
        mon.check()
        assert mon.step_index == 6
        assert [(a.step, a.site) for a in mon.anomalies] == [(4, "inject")]
    finally:
        mon.remove()


class TwoHeads(nn.Module):
    """A policy's shape: the root returns a tuple whose second item is a submodule's output
    (recorded there, as the innermost module) and whose first is the root's own op."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.action = nn.Linear(8, 2)
        self.value = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return torch.log_softmax(self.action(h), dim=-1), self.value(h)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_tuple_output_of_a_compiled_root_records_what_eager_records(backend):
    """The eager hook of a compiled root skips the items compiled code recorded: the same
    sites as eager (no second record of ``value``'s output as ``<model>`` output[1]), and
    from the second step on in C++ (the fast path skips them by their marker)."""
    sites = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TwoHeads()
        mon = watch(model, warn=False)
        fwd = torch.compile(model, backend=backend) if compiled else model
        try:
            for _ in range(3):
                (logp, value), python_calls = python_forward_hooks(
                    mon, lambda: fwd(torch.randn(3, 4)))
                (logp.sum() + value.sum()).backward()
                mon.step()
            mon.check()
            sites[compiled] = sorted((r["site"], r["phase"], r["role"], r["call"])
                                     for r in mon.records())
        finally:
            mon.remove()
    assert sites[True] == sites[False]
    assert ("<model>", "forward", "output[0]", 0) in sites[True]
    if healthmon.extension_available():  # the C++ fast path took the root's hook
        assert python_calls == [], "the compiled root's eager hook ran in Python"
