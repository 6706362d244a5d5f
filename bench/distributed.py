"""What does the rank agreement cost per step? (gloo on CPU, spawned ranks on this machine)

Each rank trains the same DDP MLP under ``healthmon.watch`` in two variants, interleaved
round by round (start rotated): ``agree`` (the real monitor: one 3-element int64 MIN
all-reduce per checked step) and ``local`` (the same monitor with the all-reduce replaced by
a local tensor: same host work, no collective). Printed: the median per-round ratio
agree/local of the step time, the median added time per step, and a micro-benchmark of the
bare all-reduce of 3 int64 (after a barrier). Run: ``python bench/distributed.py
[--world 2] [--rounds 15] [--steps 20]``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _no_collective(state):
    """Replace the agreement's all-reduce by a local tensor (for the ``local`` variant)."""
    from healthmon.distributed import HEALTHY, _Pending

    def start(step, local):
        return _Pending(step, local, torch.tensor([HEALTHY, step, -step], dtype=torch.int64))
    state._start = start


def _worker(rank, world, port, rounds, steps, queue):
    import healthmon
    from healthmon.distributed import rank_state
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(
        *[m for _ in range(6) for m in (nn.Linear(256, 256), nn.Tanh())], nn.Linear(256, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 256)

    def sample(name):
        with healthmon.watch(model) as mon:
            if name == "local":
                _no_collective(rank_state(mon))
            for _ in range(3):  # warm-up
                model(x).pow(2).mean().backward(); opt.step(); opt.zero_grad()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                model(x).pow(2).mean().backward(); opt.step(); opt.zero_grad()
            return (time.perf_counter() - t0) / steps

    times = {"agree": [], "local": []}
    order = ["agree", "local"]
    for r in range(rounds):
        for name in order[r % 2:] + order[:r % 2]:
            times[name].append(sample(name))
    flag = torch.zeros(3, dtype=torch.int64)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    bare = (time.perf_counter() - t0) / 200
    ratios = [a / b for a, b in zip(times["agree"], times["local"])]
    added = [a - b for a, b in zip(times["agree"], times["local"])]
    queue.put((rank, statistics.median(ratios), statistics.median(added),
               statistics.median(times["local"]), bare))
    dist.destroy_process_group()


def main() -> None:
    """Spawn the ranks and print one line per rank."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args.rounds, args.steps,
                                               queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    rows = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    print(f"gloo on CPU, world {args.world}, {os.cpu_count()} cores; DDP MLP 6x256, batch 32")
    print("rank  step agree/local  added per step  (local step)  bare 3xint64 all-reduce")
    for rank, ratio, added, local, bare in rows:
        print(f"{rank:4d}  {ratio:16.3f}  {added * 1e6:11.0f} us  {local * 1e3:9.2f} ms"
              f"  {bare * 1e6:10.0f} us")


if __name__ == "__main__":
    main()
