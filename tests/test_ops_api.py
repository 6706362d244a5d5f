"""The Python API around the ops: layout agreement, opcheck, fake kernels, bad input, and the
float64 fallback when the extension is missing."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import healthmon
from healthmon import ops
from healthmon._layout import LABEL_FIELDS, NUM_STATS, STATS_FIELDS

needs_ext = pytest.mark.skipif(not ops.extension_available(),
                               reason="native extension not built (make build)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@needs_ext
def test_layout_matches_compiled_extension():
    from healthmon import _C
    assert tuple(_C.STATS_FIELDS) == STATS_FIELDS
    assert tuple(_C.LABEL_FIELDS) == LABEL_FIELDS


@needs_ext
@pytest.mark.parametrize("case", ["stats", "stats_into", "record_to", "multi_record_to",
                                  "multi_stats", "multi_stats_into", "label_check",
                                  "label_sanitize"])
def test_opcheck(case):
    x = torch.randn(5, 7)
    x[1, 2] = math.nan
    target = torch.tensor([[0, 3, 9], [-100, 2, -1]])
    records = torch.zeros(4, NUM_STATS, dtype=torch.float64)
    calls = {
        "stats": (torch.ops.healthmon.stats.default, (x,)),
        "stats_into": (torch.ops.healthmon.stats_into.default, (x, records, 1)),
        "record_to": (torch.ops.healthmon.record_to.default, (x, TEST_KEY, 1)),
        "multi_record_to": (torch.ops.healthmon.multi_record_to.default,
                            ([x, x.t()[1:], x[0]], [TEST_KEY] * 3, [1, 3, 0])),
        "multi_stats": (torch.ops.healthmon.multi_stats.default, ([x, x.t(), x[0]],)),
        "multi_stats_into": (torch.ops.healthmon.multi_stats_into.default,
                             ([x, x[:2]], records, [3, 0])),
        "label_check": (torch.ops.healthmon.label_check.default, (target, 8, -100)),
        "label_sanitize": (torch.ops.healthmon.label_sanitize.default, (target, 8, -100)),
    }
    op, args = calls[case]
    from healthmon import _C
    _C.set_record_buffer(TEST_KEY, torch.zeros(4, NUM_STATS, dtype=torch.float64))
    try:
        torch.library.opcheck(op, args)
    finally:
        _C.clear_record_buffer(TEST_KEY)


TEST_KEY = 1 << 20  # far above the keys monitors take (one per buffer, counted from 0)


@needs_ext
def test_record_to_writes_the_registered_buffer_only():
    """record_to(x, key, slot) writes what stats_into writes, into the buffer registered
    under key; under a key with no buffer (a removed monitor) it is a no-op."""
    from healthmon import _C
    x = torch.randn(6, 5)[:, ::2]  # strided
    x[0, 1] = math.inf
    want = torch.zeros(3, NUM_STATS, dtype=torch.float64)
    torch.ops.healthmon.stats_into(x, want, 2)
    got = torch.zeros(3, NUM_STATS, dtype=torch.float64)
    _C.set_record_buffer(TEST_KEY, got)
    try:
        torch.ops.healthmon.record_to(x.requires_grad_(False), TEST_KEY, 2)
        assert torch.equal(got, want)
        assert _C.registered_buffer(TEST_KEY) is not None
    finally:
        _C.clear_record_buffer(TEST_KEY)
    torch.ops.healthmon.record_to(x, TEST_KEY, 0)  # dropped
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="no record buffer under key"):
        _C.registered_buffer(TEST_KEY)


@needs_ext
def test_multi_record_to_writes_what_record_to_writes():
    """multi_record_to(xs, buffers, slots) == record_to of each, in order (a NaN, an Inf,
    a strided and an empty tensor included; a key without a buffer drops its record);
    mismatched lengths are a clear error."""
    from healthmon import _C
    x = torch.randn(6, 5)
    x[0, 1], x[2, 2] = math.nan, -math.inf
    xs = [x, x[:, ::2], x[:0], torch.tensor(3.0, dtype=torch.float64)]
    slots = [2, 0, 1, 3]
    want = torch.zeros(4, NUM_STATS, dtype=torch.float64)
    got = torch.zeros(4, NUM_STATS, dtype=torch.float64)
    try:
        _C.set_record_buffer(TEST_KEY, want)
        for t, slot in zip(xs, slots):
            torch.ops.healthmon.record_to(t, TEST_KEY, slot)
        _C.clear_record_buffer(TEST_KEY)  # a fresh registration: its rows' first writes
        _C.set_record_buffer(TEST_KEY, got)
        torch.ops.healthmon.multi_record_to(xs + [x], [TEST_KEY] * 4 + [TEST_KEY + 1],
                                            slots + [0])
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # (empty: NaN min)
        assert got[2, 1].item() == 1 and got[2, 3].item() == 1  # the NaN and the -Inf
        with pytest.raises(RuntimeError, match="need as many buffers and slots"):
            torch.ops.healthmon.multi_record_to(xs, [TEST_KEY], slots)
    finally:
        _C.clear_record_buffer(TEST_KEY)


@needs_ext
def test_record_to_merges_a_second_write_of_a_row_in_one_step():
    """A compiled graph run several times in one step writes its rows again: the first write
    of a step overwrites the row, later ones merge (counts and sums add, min / max combine),
    so a NaN of any run stays in the row. ``begin_record_step`` starts a new step."""
    from healthmon import _C
    a = torch.tensor([1.0, -2.0, math.nan])
    b = torch.tensor([5.0, 0.0])
    c = torch.tensor([3.0, 4.0])
    want = torch.zeros(3, NUM_STATS, dtype=torch.float64)
    torch.ops.healthmon.stats_into(torch.cat([a, b]), want, 0)
    torch.ops.healthmon.stats_into(c, want, 1)
    got = torch.zeros(2, NUM_STATS, dtype=torch.float64)
    _C.set_record_buffer(TEST_KEY, got)
    try:
        _C.begin_record_step(TEST_KEY)
        torch.ops.healthmon.record_to(a, TEST_KEY, 0)
        torch.ops.healthmon.record_to(b, TEST_KEY, 0)  # the same row again: merged
        assert torch.equal(got[0], want[0]), (got[0], want[0])
        _C.begin_record_step(TEST_KEY)
        torch.ops.healthmon.record_to(c, TEST_KEY, 0)  # a new step: overwritten
        assert torch.equal(got[0], want[1])
        _C.begin_record_step(TEST_KEY)  # a new step, written twice
        torch.ops.healthmon.record_to(c, TEST_KEY, 0)
        torch.ops.healthmon.record_to(c, TEST_KEY, 0)
        assert got[0, 0].item() == 4 and got[0, 8].item() == 14.0  # numel, sum
    finally:
        _C.clear_record_buffer(TEST_KEY)


@needs_ext
def test_fake_kernels_trace_under_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 4)
        assert ops.stats_record(x).shape == (NUM_STATS,)
        rec, clean = ops.label_sanitize(torch.empty(2, 3, dtype=torch.int64), 5)
        assert clean.shape == (2, 3) and clean.dtype == torch.int64


@needs_ext
def test_compiles_under_torch_compile():
    def f(x):
        return torch.ops.healthmon.stats(x * 2)
    x = torch.randn(100)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))



def run_without_extension(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with HEALTHMON_NO_EXT=1 (the fallback path)."""
    env = dict(os.environ, HEALTHMON_NO_EXT="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out

def test_tensor_stats_properties():
    s = healthmon.stats(torch.tensor([3.0, -4.0, math.nan, math.inf, 0.0]))
    assert (s.numel, s.nan, s.posinf, s.neginf, s.zeros, s.finite) == (5, 1, 1, 0, 1, 3)
    assert s.min == -4.0 and s.max == 3.0 and s.absmax == 4.0
    assert s.norm == 5.0 and s.mean == pytest.approx(-1 / 3) and s.rms == pytest.approx(5 / math.sqrt(3))
    assert s.has_nonfinite and s.nonfinite == 2
    empty = healthmon.stats(torch.empty(0))
    assert empty.numel == 0 and math.isnan(empty.min) and math.isnan(empty.mean)
    assert not empty.has_nonfinite and "1 NaN" in s.describe()


@pytest.mark.parametrize("bad, exc", [
    ([1.0, 2.0], TypeError),
    (torch.randn(3, dtype=torch.complex64), TypeError),
    (torch.randn(4, 4).to_sparse(), ValueError),
    (torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8), ValueError),
])
def test_bad_inputs_get_clear_errors(bad, exc):
    with pytest.raises(exc, match="healthmon"):
        healthmon.stats(bad)


def test_bad_record_buffers_are_refused_before_any_write():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="float64"):
        ops.stats_into(x, torch.zeros(3, NUM_STATS, dtype=torch.float32), 0)
    with pytest.raises(ValueError, match="shape"):
        ops.stats_into(x, torch.zeros(3, NUM_STATS + 1, dtype=torch.float64), 0)
    with pytest.raises(IndexError, match="slot 3"):
        ops.stats_into(x, torch.zeros(3, NUM_STATS, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="contiguous"):
        ops.stats_into(x, torch.zeros(NUM_STATS, 3, dtype=torch.float64).t(), 0)


@needs_ext
def test_native_ops_check_their_arguments_too():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="outside the record buffer"):
        torch.ops.healthmon.stats_into(x, torch.zeros(2, NUM_STATS, dtype=torch.float64), 5)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.healthmon.stats_into(x, torch.zeros(2, NUM_STATS, dtype=torch.int64), 0)
    with pytest.raises(RuntimeError, match="num_classes"):
        torch.ops.healthmon.label_check(torch.zeros(3, dtype=torch.int64), 0, -100)
    with pytest.raises(RuntimeError, match="integer"):
        torch.ops.healthmon.label_check(torch.zeros(3), 4, -100)


def test_label_api_bad_input():
    with pytest.raises(TypeError, match="dtype"):
        ops.label_record(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="num_classes"):
        ops.label_record(torch.zeros(3, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="num_classes"):
        ops.label_record(torch.zeros(3, dtype=torch.int64), 2.5)


def test_meta_tensors_go_through_the_fake_kernel():
    if not ops.extension_available():
        pytest.skip("fake kernels are registered with the native ops")
    out = ops.stats_record(torch.empty(4, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (NUM_STATS,)


def test_fallback_to_reference_warns_once_and_agrees():
    code = (
        "import warnings, torch, math\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import healthmon\n"
        "    from healthmon import ops\n"
        "    x = torch.tensor([1.0, math.nan, -math.inf, 0.0])\n"
        "    s = healthmon.stats(x); healthmon.stats(x)\n"
        "    ops.label_record(torch.tensor([0, 9]), 3)\n"
        "print(healthmon.extension_available(), s.nan, s.neginf, s.zeros, s.max)\n")
    out = run_without_extension(code)
    assert out.stdout.split() == ["False", "1", "1", "1", "1.0"]


def test_missing_extension_gives_one_warning_naming_the_build_command():
    code = (
        "import sys, warnings, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'healthmon._C': raise ImportError('no _C here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import healthmon, torch\n"
        "    healthmon.stats(torch.ones(3)); healthmon.stats(torch.ones(3))\n"
        "msgs = [str(x.message) for x in w if 'healthmon' in str(x.message)]\n"
        "print(len(msgs)); print(msgs[0])\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("HEALTHMON_NO_EXT", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    count, message = out.stdout.split("\n", 1)
    assert count == "1" and "make build" in message and "reference" in message


def _repeated_slot_cases():
    x, y = torch.randn(10), torch.randn(3, 4)
    return [([x, y, x], [2, 0, 2], 2), ([x, y], [1, 1], 1), ([y, x, y, x], [0, 3, 1, 3], 3)]


def test_multi_stats_into_refuses_repeated_slots_before_any_write():
    for xs, slots, dup in _repeated_slot_cases():
        records = torch.zeros(4, NUM_STATS, dtype=torch.float64)
        with pytest.raises(ValueError, match=f"slot {dup} .*more than once"):
            ops.multi_stats_into(xs, records, slots)
        assert (records == 0).all()


@needs_ext
def test_native_multi_stats_into_refuses_repeated_slots_too():
    for xs, slots, dup in _repeated_slot_cases():
        records = torch.zeros(4, NUM_STATS, dtype=torch.float64)
        with pytest.raises(RuntimeError, match=f"slot {dup} .*more than once"):
            torch.ops.healthmon.multi_stats_into(xs, records, slots)
        assert (records == 0).all()
    records = torch.zeros(4, NUM_STATS, dtype=torch.float64)  # distinct slots still fine
    torch.ops.healthmon.multi_stats_into([torch.ones(3), torch.zeros(2)], records, [3, 0])
    assert records[3, 0] == 3 and records[0, 0] == 2


def test_fallback_refuses_repeated_slots():
    code = (
        "import torch\n"
        "from healthmon import ops\n"
        "from healthmon._layout import NUM_STATS\n"
        "assert not ops.extension_available()\n"
        "records = torch.zeros(3, NUM_STATS, dtype=torch.float64)\n"
        "x = torch.randn(5)\n"
        "try:\n"
        "    ops.multi_stats_into([x, x * 2], records, [1, 1])\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
        "print('untouched', bool((records == 0).all()))\n"
        "ops.multi_stats_into([x, x * 2], records, [1, 2])\n"
        "print('written', records[1, 0].item(), records[2, 0].item())\n")
    out = run_without_extension(code)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("refused:") and "slot 1" in lines[0] and "more than once" in lines[0]
    assert lines[1:] == ["untouched True", "written 5.0 5.0"]
