"""Child-process side of tests/test_distributed.py: real torch.distributed (gloo, CPU).

:func:`run_group` starts ``world`` spawned processes that each initialise the process group
once and run a list of scenarios in order; every scenario returns a JSON-able dict that is
written to ``<out>/<scenario>.rank<R>.json`` (an unexpected exception is written as
``{"error": traceback}``). The parent asserts on those files. :func:`run_group` joins with a
hard deadline and kills what is left, so no test can hang.
"""
from __future__ import annotations

import copy
import datetime
import gc
import json
import os
import socket
import time
import traceback
import warnings
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ENV = ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG")


# --------------------------------------------------------------------------- parent side

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, scenarios: List[str], out: str, timeout: float) -> Dict[str, list]:
    """Run ``scenarios`` on ``world`` ranks; ``{scenario: [result of rank 0, ...]}``.

    Raises AssertionError when a process fails, or is still running after ``timeout``
    seconds (then every process is killed)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_main, args=(rank, world, port, scenarios, out), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert not hung, f"ranks {hung} still running after {timeout}s (a hang): killed"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"exit codes {codes}"
    results = {}
    for name in scenarios:
        results[name] = []
        for rank in range(world):
            with open(os.path.join(out, f"{name}.rank{rank}.json")) as f:
                results[name].append(json.load(f))
    return results


def _main(rank: int, world: int, port: int, scenarios: List[str], out: str) -> None:
    for var in ENV:
        os.environ.pop(var, None)
    os.environ["LOCAL_RANK"] = str(rank)  # as torchrun sets it
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)

    def init():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=30))
    if not scenarios or scenarios[0] != "lazy_init":
        init()
    try:
        for name in scenarios:
            try:  # lazy_init (first only) initialises the group itself, after watch()
                result = lazy_init(rank, world, out, init) if name == "lazy_init" else \
                    SCENARIOS[name](rank, world, out)
            except Exception:  # reported to the parent, which fails the test
                result = {"error": traceback.format_exc()}
            with open(os.path.join(out, f"{name}.rank{rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        gc.collect()  # free DDP / FSDP modules (they hold the group) before destroying it
        dist.destroy_process_group()


# --------------------------------------------------------------------------- models

class Poison(nn.Module):
    """Identity (``x * 1``), except ``x * NaN`` on rank ``rank`` at its ``step``-th call."""

    def __init__(self, rank: int = -1, step: int = -1):
        super().__init__()
        self.bad_rank, self.bad_step, self.calls = rank, step, 0

    def forward(self, x):
        bad = dist.get_rank() == self.bad_rank and self.calls == self.bad_step
        self.calls += 1
        return x * (float("nan") if bad else 1.0)


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bad):
        ctx.bad = bad
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g * float("nan") if ctx.bad else g), None


class GradPoison(Poison):
    """Identity forward; NaN gradient on rank ``rank`` at its ``step``-th call."""

    def forward(self, x):
        bad = dist.get_rank() == self.bad_rank and self.calls == self.bad_step
        self.calls += 1
        return _NanGrad.apply(x * 1.0, bad)


class _NanWeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bad):
        ctx.save_for_backward(x, w)
        ctx.bad = bad
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gw = (g * x).sum(0)
        return g * w, (gw * float("nan") if ctx.bad else gw), None


class Scale(Poison):
    """``x * w`` whose *weight* gradient (only) is NaN on rank ``rank`` at ``step``: its
    output gradient stays finite, so only the ``grad`` phase record can see it."""

    def __init__(self, width: int, rank: int = -1, step: int = -1):
        super().__init__(rank, step)
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        bad = dist.get_rank() == self.bad_rank and self.calls == self.bad_step
        self.calls += 1
        return _NanWeightGrad.apply(x, self.weight, bad)


class Net(nn.Module):
    def __init__(self, poison=None, grad_poison=None, scale=None):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.poison = poison or Poison()
        self.gradpoison = grad_poison or GradPoison()
        self.scale = scale or Scale(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.scale(self.gradpoison(self.poison(self.layers(x)))))


def batch(step: int, rank: int, nan: bool = False) -> torch.Tensor:
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1000 * rank + step))
    if nan:
        x[1, 2] = float("nan")
    return x


def ddp(model: nn.Module, **kw) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model, **kw)


def train(model, mon, steps: int, rank: int, nan_input_at=(-1, -1), check_each=False):
    """Plain loop; returns ``{"steps": completed, "error": {...}}`` (error None when
    the run finished)."""
    import healthmon
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    done = 0
    try:
        for step in range(steps):
            x = batch(step, rank, nan=(rank, step) == nan_input_at)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if check_each and mon.check():
                return {"steps": done, "stopped_at": step, "error": None}
            done += 1
        mon.check()
    except healthmon.HealthError as err:
        return {"steps": done, "error": error_dict(err)}
    return {"steps": done, "error": None}


def error_dict(err) -> dict:
    a = err.anomaly
    return {"type": type(err).__name__, "message": str(err), "site": a.site,
            "phase": a.phase, "role": a.role, "step": a.step, "rank": a.rank,
            "first_ranks": getattr(err, "first_ranks", None),
            "by_rank": sorted(getattr(err, "by_rank", {}) or {})}


# --------------------------------------------------------------------------- scenarios

def ddp_healthy(rank, world, out, bucket_view=False):
    """6 steps; every grad record must equal this rank's local gradient (a non-DDP replica
    on the same batch), not the all-reduced one."""
    import healthmon
    from healthmon.distributed import rank_state
    net = Net()
    ref = copy.deepcopy(net)
    model = ddp(net, gradient_as_bucket_view=bucket_view)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = os.path.join(out, f"healthy{int(bucket_view)}.jsonl")
    local_match, reduced_differs = [], []
    t0 = time.perf_counter()
    with healthmon.watch(model, log=log) as mon:
        for step in range(6):
            ref.load_state_dict(net.state_dict())
            x = batch(step, rank)
            model(x).pow(2).mean().backward()
            ref.zero_grad()
            ref(x).pow(2).mean().backward()
            opt.step()  # step boundary: records decoded, ranks agree
            grads = {(r["site"], r["role"]): r for r in mon.records() if r["phase"] == "grad"}
            for (name, p), q in zip(net.named_parameters(), ref.parameters()):
                site, pname = name.rsplit(".", 1)
                rec = grads[(site, f"{pname} [before all-reduce]")]
                local_match.append(abs(rec["sum"] - q.grad.sum().item())
                                   <= 1e-5 * (1 + abs(rec["sumsq"]) ** 0.5))
                reduced_differs.append(abs(rec["sum"] - p.grad.sum().item()) > 1e-7)
            opt.zero_grad()
        sites = sorted({r["site"] for r in mon.records()})
        roles = sorted({r["role"] for r in mon.records() if r["phase"] == "grad"})
        state = rank_state(mon)
    return {"anomalies": len(mon.anomalies), "sites": sites, "roles": roles,
            "local_match": all(local_match), "n_checked": len(local_match),
            "reduced_differs": sum(reduced_differs), "collectives": state.collectives,
            "collective_s": state.seconds, "loop_s": time.perf_counter() - t0,
            "rank_info": [state.rank, state.world_size, state.device.type]}


def lazy_init(rank, world, out, init):
    """watch() before init_process_group; the monitor finds the group at the next forward
    (and compares the settings there), then behaves as if distributed from the start."""
    import healthmon
    from healthmon.distributed import rank_state
    net = Net(poison=Poison(1, 2))
    mon = healthmon.watch(net)
    before = rank_state(mon) is not None
    init()
    model = ddp(net)
    try:
        res = train(model, mon, 5, rank)
    finally:
        mon.remove()
    state = rank_state(mon)
    res.update(before=before, after=state is not None and state.world_size == world,
               roles=sorted(set(mon._param_records.grad_roles)))
    return res


def ddp_healthy_bucket_view(rank, world, out):
    return ddp_healthy(rank, world, out, bucket_view=True)


def ddp_forward_nan(rank, world, out, bad_rank=1, step=3):
    import healthmon
    model = ddp(Net(poison=Poison(bad_rank, step)))
    mon = healthmon.watch(model, log=os.path.join(out, f"fwd{world}.jsonl"))
    try:
        return train(model, mon, 8, rank)
    finally:
        mon.remove()


def ddp_forward_nan_w4(rank, world, out):
    return ddp_forward_nan(rank, world, out, bad_rank=2, step=3)


def ddp_input_nan(rank, world, out):
    import healthmon
    model = ddp(Net())
    with healthmon.watch(model) as mon:
        return train(model, mon, 6, rank, nan_input_at=(0, 2))


def ddp_backward_nan(rank, world, out):
    import healthmon
    model = ddp(Net(grad_poison=GradPoison(1, 2)))
    with healthmon.watch(model) as mon:
        return train(model, mon, 6, rank)


def ddp_grad_only_nan(rank, world, out):
    """NaN only in rank 1's local weight gradient, with gradient_as_bucket_view=True: after
    the all-reduce every rank's gradient is NaN, so only a local record names rank 1."""
    import healthmon
    model = ddp(Net(scale=Scale(16, 1, 3)), gradient_as_bucket_view=True)
    with healthmon.watch(model) as mon:
        return train(model, mon, 6, rank)


def two_bad_ranks(rank, world, out):
    """Rank 1: NaN weight gradient (phase grad); rank 3: NaN forward output, same step."""
    import healthmon
    model = ddp(Net(poison=Poison(3, 2), scale=Scale(16, 1, 2)))
    with healthmon.watch(model) as mon:
        return train(model, mon, 5, rank)


def warn_mode(rank, world, out):
    import healthmon
    model = ddp(Net(poison=Poison(1, 3)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with healthmon.watch(model, on_anomaly="warn") as mon:
            res = train(model, mon, 8, rank, check_each=True)
    msgs = [str(w.message) for w in caught if "healthmon" in str(w.message)]
    res.update(warnings=msgs, anomaly_ranks=[a.rank for a in mon.anomalies])
    return res


def sync_mode(rank, world, out):
    import healthmon
    model = ddp(Net(poison=Poison(1, 2)))
    with healthmon.watch(model, sync=True) as mon:
        return train(model, mon, 6, rank)


def skip_mode(rank, world, out):
    """NaN forward on rank 1 at step 3 with on_anomaly=skip: every rank skips that update
    (rank 0's local gradients are finite; DDP averages the NaN into them), training goes on,
    the weights stay finite and identical on every rank."""
    import healthmon
    model = ddp(Net(poison=Poison(1, 3)))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with healthmon.watch(model, on_anomaly="skip") as mon:
            res = train(model, mon, 6, rank)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.zeros_like(flat) for _ in range(world)]
    torch.distributed.all_gather(everyone, flat)
    res.update(skipped=list(mon.skipped_steps), finite=bool(torch.isfinite(flat).all()),
               same=all(torch.equal(everyone[0], w) for w in everyone),
               anomaly_steps=[a.step for a in mon.anomalies])
    return res


def _expect_mismatch(rank, **kw):
    import healthmon
    try:
        mon = healthmon.watch(Net(), **kw)
    except healthmon.RankMismatchError as err:
        return {"raised": True, "message": str(err)}
    mon.remove()
    return {"raised": False}


def mismatch_off(rank, world, out):
    if rank == 1:
        os.environ["HEALTHMON"] = "off"
    try:
        return _expect_mismatch(rank)
    finally:
        os.environ.pop("HEALTHMON", None)


def mismatch_every(rank, world, out):
    return _expect_mismatch(rank, every=1 + rank)


def fsdp_run(rank, world, out, poison=None):
    import healthmon
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (world,))
    net = Net(poison=poison)
    net.layers[2] = checkpoint_wrapper(net.layers[2])
    for layer in (net.layers[0], net.layers[2], net.head):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    shard_match = []
    with healthmon.watch(net) as mon:
        try:
            for step in range(5):
                net(batch(step, rank)).pow(2).mean().backward()
                opt.step()
                grads = {(r["site"], r["role"]): r for r in mon.records()
                         if r["phase"] == "grad"}
                for name, p in net.named_parameters():
                    site, pname = name.replace("._checkpoint_wrapped_module", "").rsplit(".", 1)
                    rec = grads[(site, f"{pname} [shard, after reduce-scatter]")]
                    local = p.grad.to_local()
                    shard_match.append(rec["numel"] == local.numel() and
                                       abs(rec["sum"] - local.sum().item()) < 1e-5)
                opt.zero_grad()
        except healthmon.HealthError as err:
            return {"error": error_dict(err), "steps": step}
        sites = sorted({r["site"] for r in mon.records()})
    return {"error": None, "anomalies": len(mon.anomalies), "sites": sites,
            "shard_match": all(shard_match), "n_checked": len(shard_match)}


def fsdp_healthy(rank, world, out):
    return fsdp_run(rank, world, out)


def fsdp_forward_nan(rank, world, out):
    return fsdp_run(rank, world, out, poison=Poison(1, 3))


SCENARIOS = {f.__name__: f for f in (
    ddp_healthy, ddp_healthy_bucket_view, ddp_forward_nan, ddp_forward_nan_w4, ddp_input_nan,
    ddp_backward_nan, ddp_grad_only_nan, two_bad_ranks, warn_mode, sync_mode, skip_mode,
    mismatch_off,
    mismatch_every, fsdp_healthy, fsdp_forward_nan)}
