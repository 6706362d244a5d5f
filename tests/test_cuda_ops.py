"""The CUDA ops against the float64 reference (computed on a CPU copy: the same oracle as the
CPU tests). Skipped unless a GPU is present and the extension was built with its CUDA part.

Counts and min / max / abs-max must match exactly, sums within the per-dtype tolerance of
tests/_inject.py. Also: many tensors per launch, > 2**31 elements, bad labels without a device
assert, clear errors on a wrong record buffer, and no host synchronisation.
"""
from __future__ import annotations

import math

import pytest
import torch

from healthmon import ops, reference
from healthmon._layout import LABEL, NUM_LABEL, NUM_STATS, STAT

from _inject import FLOAT8_DTYPES, FLOAT_DTYPES, INT_DTYPES, assert_stats_match, layouts, random_tensor

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not ops.extension_cuda_available(),
    reason="needs a CUDA GPU and healthmon built with its CUDA kernels (make build on a CUDA torch)")

DEV = "cuda"
FNUZ_DTYPES = [getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)]
UINT_WIDE = [torch.uint16, torch.uint32, torch.uint64]
STATS_DTYPES = FLOAT_DTYPES + FLOAT8_DTYPES + FNUZ_DTYPES + INT_DTYPES + UINT_WIDE
LABEL_DTYPES = INT_DTYPES + UINT_WIDE
# 8193 float32 = one chunk and a bit (chunks are 32 KiB); 70001 spans many chunks.
SHAPES = [(), (0,), (1,), (7,), (1000,), (8193,), (3, 0, 2), (33, 65), (4, 3, 17, 9), (70001,)]


def ref(x: torch.Tensor) -> torch.Tensor:
    return reference.stats_ref(x.cpu())


def cuda_layouts(base_cpu: torch.Tensor):
    """The layouts of tests/_inject.py on the GPU, plus a view starting off a 16-byte boundary
    (the scalar head of the vectorised loop)."""
    yield from layouts(base_cpu.to(DEV))
    if base_cpu.numel() > 3:
        yield "offset", base_cpu.to(DEV).reshape(-1)[3:]


@pytest.mark.parametrize("dtype", STATS_DTYPES, ids=str)
def test_stats_matches_reference(dtype):
    gen = torch.Generator().manual_seed(2024)
    for shape in SHAPES:
        base = random_tensor(shape, dtype, gen)
        for name, x in cuda_layouts(base):
            got = ops.stats_record(x)
            assert got.device == x.device and got.dtype == torch.float64 and got.shape == (NUM_STATS,)
            assert_stats_match(got, ref(x), dtype, f"{dtype} {shape} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_stats_large_extremes_and_all_nonfinite(dtype):
    gen = torch.Generator().manual_seed(11)
    x = random_tensor((3_000_017,), dtype, gen, inject=0.001).to(DEV)
    assert_stats_match(ops.stats_record(x), ref(x), dtype, "large")
    for value in (math.nan, math.inf, -math.inf):
        rec = ops.stats_record(torch.full((100_000,), value, dtype=dtype, device=DEV)).tolist()
        assert rec[STAT["finite"]] == 0 and math.isnan(rec[STAT["min"]])
        assert math.isnan(rec[STAT["max"]]) and rec[STAT["absmax"]] == 0 and rec[STAT["sum"]] == 0
    # squares beyond the float range, and squares that underflow it, stay accurate
    finfo = torch.finfo(dtype)
    for value in (finfo.max, finfo.tiny / 4, -finfo.tiny):
        x = torch.full((10_001,), value, dtype=dtype, device=DEV)
        x[::7] = -x[::7]
        assert_stats_match(ops.stats_record(x), ref(x), dtype, f"value {value}")


def test_stats_is_deterministic_and_independent_of_neighbours():
    gen = torch.Generator().manual_seed(5)
    x = random_tensor((1_234_567,), torch.float32, gen).to(DEV)
    first = ops.stats_record(x)
    for _ in range(3):
        assert torch.equal(ops.stats_record(x).view(torch.int64), first.view(torch.int64))
    others = [random_tensor((n,), torch.bfloat16, gen).to(DEV) for n in (5, 100_000)]
    rows = ops.multi_stats([others[0], x, others[1]])
    assert torch.equal(rows[1].view(torch.int64), first.view(torch.int64))


def test_empty_and_zero_dim():
    for x in (torch.empty(0, device=DEV), torch.empty(3, 0, 2, device=DEV, dtype=torch.float16),
              torch.tensor(-0.0, device=DEV), torch.tensor(7, device=DEV, dtype=torch.int32)):
        assert_stats_match(ops.stats_record(x), ref(x), x.dtype, f"{x.dtype} {tuple(x.shape)}")
    rec = ops.stats_record(torch.empty(0, device=DEV)).tolist()
    assert rec[STAT["numel"]] == 0 and math.isnan(rec[STAT["min"]]) and rec[STAT["absmax"]] == 0


def _many(gen, count=300):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8]
    xs = []
    for i in range(count):
        n = int(torch.randint(0, 5000, (1,), generator=gen)) if i % 50 else (i % 3) * 40_000
        x = random_tensor((n,), dtypes[i % len(dtypes)], gen).to(DEV)
        xs.append(x.t() if i % 7 == 3 else x)
    xs[10] = torch.empty(0, device=DEV)
    xs[11] = torch.tensor(3.5, device=DEV)
    xs[12] = random_tensor((2, 3, 5, 7), torch.float32, gen).to(DEV).contiguous(
        memory_format=torch.channels_last)
    return xs


def test_multi_stats_300_tensors():
    gen = torch.Generator().manual_seed(300)
    xs = _many(gen)
    rows = ops.multi_stats(xs)
    assert rows.shape == (len(xs), NUM_STATS) and rows.device.type == "cuda"
    for i, x in enumerate(xs):
        assert_stats_match(rows[i], ref(x), x.dtype, f"tensor {i} {x.dtype} {tuple(x.shape)}")


def test_multi_stats_into_writes_only_its_slots():
    gen = torch.Generator().manual_seed(301)
    xs = _many(gen)
    records = torch.full((len(xs) + 20, NUM_STATS), -7.0, dtype=torch.float64, device=DEV)
    slots = torch.randperm(len(xs) + 20, generator=gen)[: len(xs)].tolist()
    ops.multi_stats_into(xs, records, slots)
    for x, slot in zip(xs, slots):
        assert_stats_match(records[slot], ref(x), x.dtype, f"slot {slot}")
    untouched = sorted(set(range(len(xs) + 20)) - set(slots))
    assert (records[untouched] == -7.0).all()


def test_stats_into_writes_only_its_slot():
    gen = torch.Generator().manual_seed(3)
    records = torch.full((5, NUM_STATS), -7.0, dtype=torch.float64, device=DEV)
    x = random_tensor((100, 3), torch.bfloat16, gen).to(DEV)
    ops.stats_into(x, records, 4)
    assert_stats_match(records[4], ref(x), torch.bfloat16)
    assert (records[:4] == -7.0).all()


def test_more_than_2_pow_31_elements():
    n = 2**31 + 77
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 2**30:
        pytest.skip("needs 3 GiB of free GPU memory")
    x = torch.zeros(n, dtype=torch.uint8, device=DEV)
    x[0], x[2**31 + 10], x[-1] = 5, 200, 1
    for view, shift in ((x, 0), (x[1:], 1)):  # aligned, and starting off a 16-byte boundary
        rec = ops.stats_record(view).tolist()
        nz = 2 if shift else 3
        assert rec[STAT["numel"]] == n - shift and rec[STAT["finite"]] == n - shift
        assert rec[STAT["zeros"]] == n - shift - nz
        assert rec[STAT["min"]] == 0 and rec[STAT["max"]] == 200 and rec[STAT["absmax"]] == 200
        assert rec[STAT["sum"]] == 201 + (0 if shift else 5)
        assert rec[STAT["sumsq"]] == 40_001 + (0 if shift else 25)
    del x
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------- labels

def _labels(dtype, shape, gen, num_classes):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    lo = 0 if not dtype.is_signed else -150
    t = torch.randint(lo, num_classes + 20, shape, generator=gen, dtype=torch.int64)
    return t.to(dtype)


def _ignore_for(dtype):
    return -100 if dtype.is_signed else (255 if dtype == torch.uint8 else 7)


@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
def test_labels_match_reference(dtype):
    gen = torch.Generator().manual_seed(42)
    num_classes, ignore = 10, _ignore_for(dtype)
    for shape in [(), (0,), (1,), (37,), (8, 1000), (4, 33, 17), (300_001,)]:
        t_cpu = _labels(dtype, shape, gen, num_classes)
        if t_cpu.numel() > 2 and dtype != torch.bool:
            t_cpu.view(-1)[1] = ignore
        t = t_cpu.to(DEV)
        views = [("contiguous", t)]
        if t.dim() >= 2:
            views.append(("transposed", t.transpose(0, -1)))  # first_bad is row-major logical
        if t.numel() > 5:
            views.append(("offset", t.reshape(-1)[3:]))
        for name, v in views:
            ctx = f"{dtype} {shape} {name}"
            want = reference.label_check_ref(v.cpu(), num_classes, ignore)
            got = ops.label_record(v, num_classes, ignore)
            assert got.device == v.device and got.dtype == torch.int64 and got.shape == (NUM_LABEL,)
            assert got.cpu().tolist() == want.tolist(), ctx
            rec, clean = ops.label_sanitize(v, num_classes, ignore)
            want_rec, want_clean = reference.label_sanitize_ref(v.cpu(), num_classes, ignore)
            assert rec.cpu().tolist() == want_rec.tolist(), ctx
            assert clean.dtype == torch.int64 and clean.shape == v.shape and clean.is_contiguous()
            assert torch.equal(clean.cpu(), want_clean), ctx


def test_bad_labels_do_not_kill_the_context():
    t = torch.tensor([[0, 3, 99], [-5, -100, 2]], device=DEV)
    rec, clean = ops.label_sanitize(t, 4, -100)
    torch.cuda.synchronize()  # a device assert would surface here
    assert rec.tolist()[LABEL["bad"]] == 2 and rec.tolist()[LABEL["first_bad"]] == 2
    assert clean.tolist() == [[0, 3, -100], [-100, -100, 2]]
    # the context lives: the sanitised target feeds a real loss, and other ops still run
    logits = torch.randn(6, 4, device=DEV)
    loss = torch.nn.functional.cross_entropy(logits, clean.view(-1), ignore_index=-100)
    assert math.isfinite(loss.item())
    assert ops.stats_record(logits).tolist()[STAT["numel"]] == 24


def test_labels_empty_record():
    rec = ops.label_record(torch.empty(0, dtype=torch.int64, device=DEV), 5).tolist()
    assert rec == [0, 0, 0, 0, 0, -1]


# ------------------------------------------------------------------------------ bad buffers

def test_stats_into_rejects_wrong_buffers_without_writing():
    x = torch.randn(10, device=DEV)
    good = torch.zeros(4, NUM_STATS, dtype=torch.float64, device=DEV)
    native = torch.ops.healthmon
    bad_cases = [
        (torch.zeros(4, NUM_STATS, dtype=torch.float32, device=DEV), 0, "dtype"),
        (torch.zeros(4, NUM_STATS - 1, dtype=torch.float64, device=DEV), 0, "shape"),
        (torch.zeros(NUM_STATS, 4, dtype=torch.float64, device=DEV).t(), 0, "non-contiguous"),
        (torch.zeros(4, NUM_STATS, dtype=torch.float64), 0, "device"),
        (good, 4, "slot past the end"),
        (good, -1, "negative slot"),
    ]
    for records, slot, what in bad_cases:
        with pytest.raises(RuntimeError):
            native.stats_into(x, records, slot)
        assert (records == 0).all(), what
    with pytest.raises(RuntimeError):
        native.multi_stats_into([x, x], good, [0, 9])
    with pytest.raises(RuntimeError):
        native.multi_stats_into([x, x.cpu()], good, [0, 1])
    with pytest.raises(RuntimeError):
        native.multi_stats_into([x], good, [0, 1])
    torch.cuda.synchronize()
    assert (good == 0).all()


# ---------------------------------------------------------------------------- no host sync

def test_a_monitored_step_does_not_synchronise():
    gen = torch.Generator().manual_seed(9)
    xs = _many(gen, 300)
    x = xs[1]
    records = torch.zeros(len(xs) + 1, NUM_STATS, dtype=torch.float64, device=DEV)
    target = torch.randint(-1, 12, (64, 32), device=DEV)
    slots = list(range(1, len(xs) + 1))
    ops.multi_stats_into(xs, records, slots)  # warm-up: first-time allocations
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ops.stats_into(x, records, 0)
            ops.multi_stats_into(xs, records, slots)
            ops.stats_record(x)
            ops.multi_stats(xs[:5])
            ops.label_record(target, 10, -100)
            ops.label_sanitize(target.t(), 10, -100)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    assert_stats_match(records[0], ref(x), x.dtype)


# -------------------------------------------------------------------------------- opcheck

def test_opcheck_cuda():
    x = torch.randn(33, 7, device=DEV)
    records = torch.zeros(3, NUM_STATS, dtype=torch.float64, device=DEV)
    t = torch.randint(-2, 6, (5, 9), device=DEV)
    native = torch.ops.healthmon
    torch.library.opcheck(native.stats, (x,))
    torch.library.opcheck(native.stats_into, (x, records, 1))
    torch.library.opcheck(native.multi_stats, ([x, x.half()],))
    torch.library.opcheck(native.multi_stats_into, ([x, x.half()], records, [2, 0]))
    torch.library.opcheck(native.label_check, (t, 5, -100))
    torch.library.opcheck(native.label_sanitize, (t, 5, -100))
    from healthmon import _C
    key = 1 << 20
    _C.set_record_buffer(key, records)
    try:
        torch.library.opcheck(native.record_to, (x, key, 2))
    finally:
        _C.clear_record_buffer(key)


def test_record_to_merge_on_the_device_matches_the_cpu():
    """A second write of a row in one step merges on the device (ATen ops, no host read)
    exactly as the CPU merges."""
    from healthmon import _C
    key = 1 << 20
    a = torch.tensor([1.0, -2.0, float("nan"), float("inf")])
    b = torch.tensor([5.0, 0.0, -7.5])
    rows = {}
    for dev in ("cpu", DEV):
        records = torch.zeros(2, NUM_STATS, dtype=torch.float64, device=dev)
        _C.set_record_buffer(key, records)
        try:
            _C.begin_record_step(key)
            torch.ops.healthmon.record_to(a.to(dev), key, 1)
            torch.ops.healthmon.record_to(b.to(dev), key, 1)
        finally:
            _C.clear_record_buffer(key)
        rows[dev] = records[1].cpu()
    assert torch.equal(rows["cpu"], rows[DEV]), rows


# ------------------------------------------------------------------- edge cases (CPU parity)

def test_uint64_labels_at_or_above_2_pow_63_are_bad_and_saturate():
    int64_max = 2**63 - 1
    values = [3, 2**63, 0, 2**64 - 1, int64_max, 7, 2**63 + 5, 1] * 5  # some in the vector body
    t_cpu = torch.tensor(values, dtype=torch.uint64)
    for name, v in (("contiguous", t_cpu.to(DEV)), ("offset", t_cpu.to(DEV)[1:]),
                    ("transposed", t_cpu.view(5, 8).to(DEV).t())):
        for ignore in (-100, -1, int64_max, -2**63):
            want = reference.label_check_ref(v.cpu(), 8, ignore)
            assert ops.label_record(v, 8, ignore).cpu().tolist() == want.tolist(), f"{name} {ignore}"
            rec, clean = ops.label_sanitize(v, 8, ignore)
            want_rec, want_clean = reference.label_sanitize_ref(v.cpu(), 8, ignore)
            assert rec.cpu().tolist() == want_rec.tolist() and torch.equal(clean.cpu(), want_clean)
            assert want.tolist()[LABEL["max"]] == int64_max


def test_bool_bytes_other_than_one_count_as_true():
    b = torch.tensor([2, 0, 1, 255, 0, 7] * 7, dtype=torch.uint8).view(torch.bool)
    assert_stats_match(ops.stats_record(b.to(DEV)), ref(b), torch.bool, "bool bytes")
    assert ops.label_record(b.to(DEV), 2, -100).cpu().tolist() == \
        reference.label_check_ref(b, 2, -100).tolist()


def test_tiny_values_keep_their_squares():
    for dtype in (torch.float32, torch.bfloat16):
        for value in (1e-38, 1e-30, 3e-22):
            x = torch.full((70_001,), value, dtype=torch.float64)
            x[::7] = -x[::7]
            x = x.to(dtype).to(DEV)
            assert_stats_match(ops.stats_record(x), ref(x), dtype, f"{dtype} {value}")


def test_multi_stats_into_refuses_repeated_slots():
    x = torch.randn(10, device=DEV)
    records = torch.zeros(4, NUM_STATS, dtype=torch.float64, device=DEV)
    with pytest.raises(RuntimeError, match="slot 2 .*more than once"):
        torch.ops.healthmon.multi_stats_into([x, x * 2, x], records, [2, 0, 2])
    with pytest.raises(ValueError, match="slot 2 .*more than once"):
        ops.multi_stats_into([x, x * 2, x], records, [2, 0, 2])
    assert (records == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] + FLOAT8_DTYPES + FNUZ_DTYPES,
                         ids=str)
def test_every_bit_pattern_of_narrow_floats(dtype):
    """All 2**8 / 2**16 encodings (the float8 decoders are our own code): NaN payloads, ±Inf, -0,
    subnormals, the extremes; aligned and off a 16-byte boundary."""
    bits = 8 * torch.empty(0, dtype=dtype).element_size()
    ity = torch.int16 if bits == 16 else torch.uint8
    x = torch.arange(2**bits, dtype=torch.int32).to(ity).view(dtype).repeat(3)
    for name, v in (("all", x), ("offset", x[1:]), ("strided", x[1::3])):
        assert_stats_match(ops.stats_record(v.to(DEV)), ref(v), dtype, f"{dtype} {name}")
