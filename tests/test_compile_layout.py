"""What Inductor generates around the record op: no copy of a recorded tensor.

``healthmon::record_to`` is tagged ``flexible_layout`` (statistics do not depend on element
order): Inductor passes a recorded tensor in whatever layout it produced. Without the tag it
copied every recorded tensor to eager's strides first, in kernels named after the record op
(``cpp_fused_..._record_to_...``): on a BatchNorm CNN the watched compiled step's kernels
took 2.4x the unwatched ones'.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

import healthmon
from test_compile import fresh_dynamo  # noqa: F401  (fixture)


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        return self.head(h.mean((2, 3)))


def test_recorded_tensors_are_not_copied_for_the_record_op():
    torch.manual_seed(0)
    model = ConvBlock().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    eager = ConvBlock().to(memory_format=torch.channels_last)
    eager.load_state_dict(model.state_dict())
    mon = healthmon.watch(model, sync=False)
    ref = healthmon.watch(eager, sync=False)
    try:
        fwd = torch.compile(model, backend="inductor")

        def step(f):
            f(x).sum().backward()

        _, codes = run_and_get_code(step, fwd)
        eager(x).sum().backward()
        mon.step()
        ref.step()
        mon.check()
        ref.check()
        source = "\n".join(codes)
        assert "record_to" in source  # the records are in the compiled code
        copies = sorted(set(re.findall(r"\b(cpp_fused\w*record_to\w*)\s*=", source)))
        assert not copies, f"kernels that copy a tensor for the record op: {copies}"
        got = {(r["site"], r["phase"], r["role"]): r for r in mon.records()}
        want = {(r["site"], r["phase"], r["role"]): r for r in ref.records()}
        assert ("bn", "forward", "output") in got
        assert got.keys() == want.keys()
        for key, row in want.items():
            for field in ("numel", "nan", "posinf", "neginf", "finite"):
                assert got[key][field] == row[field], (key, field)
            scale = 1 + math.sqrt(row["sumsq"])  # a sum near 0 (BatchNorm) has no scale
            for field in ("min", "max", "sum", "sumsq"):
                assert abs(got[key][field] - row[field]) <= 1e-4 * (abs(row[field]) + scale), \
                    (key, field, got[key][field], row[field])
    finally:
        mon.remove()
        ref.remove()
