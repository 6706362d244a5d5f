"""Every native op against the float64 reference: random shapes, dtypes, layouts, with
NaN / ±Inf / -0 / subnormal / huge values injected. Counts match exactly."""
from __future__ import annotations

import math

import pytest
import torch

from healthmon import ops, reference
from healthmon._layout import LABEL, NUM_STATS, STAT

from _inject import (FLOAT8_DTYPES, FLOAT_DTYPES, INT_DTYPES, assert_stats_match, layouts,
                     random_tensor)

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="native extension not built (make build)")

SHAPES = [(), (0,), (1,), (7,), (1000,), (3, 0, 2), (33, 65), (4, 3, 17, 9), (70001,)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + FLOAT8_DTYPES + INT_DTYPES, ids=str)
def test_stats_matches_reference(dtype):
    gen = torch.Generator().manual_seed(1234)
    for shape in SHAPES:
        base = random_tensor(shape, dtype, gen)
        for name, x in layouts(base):
            assert_stats_match(ops.stats_record(x), reference.stats_ref(x), dtype,
                               f"{dtype} {shape} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_stats_large_and_fully_nonfinite(dtype):
    gen = torch.Generator().manual_seed(7)
    x = random_tensor((3_000_017,), dtype, gen, inject=0.001)
    assert_stats_match(ops.stats_record(x), reference.stats_ref(x), dtype, "large")
    allnan = torch.full((1000,), math.nan, dtype=dtype)
    rec = ops.stats_record(allnan).tolist()
    assert rec[STAT["nan"]] == 1000 and rec[STAT["finite"]] == 0
    assert math.isnan(rec[STAT["min"]]) and math.isnan(rec[STAT["max"]])
    assert rec[STAT["absmax"]] == 0 and rec[STAT["sum"]] == 0


def test_float32_squares_beyond_float_range_do_not_overflow():
    x = torch.full((4096,), 3e38, dtype=torch.float32)
    x[::2] = -3e38
    rec = ops.stats_record(x)
    assert_stats_match(rec, reference.stats_ref(x), torch.float32, "huge")
    assert math.isfinite(rec[STAT["sumsq"]].item())


def test_stats_into_writes_only_its_slot():
    gen = torch.Generator().manual_seed(3)
    records = torch.full((5, NUM_STATS), -7.0, dtype=torch.float64)
    x = random_tensor((100, 3), torch.float32, gen)
    ops.stats_into(x, records, 2)
    assert_stats_match(records[2], reference.stats_ref(x), torch.float32)
    untouched = torch.cat([records[:2], records[3:]])
    assert (untouched == -7.0).all()


def test_multi_stats_many_tensors_mixed_dtypes():
    gen = torch.Generator().manual_seed(5)
    dtypes = FLOAT_DTYPES + INT_DTYPES
    xs = [random_tensor((int(torch.randint(0, 3000, (1,), generator=gen)),), dtypes[i % len(dtypes)], gen)
          for i in range(300)]
    got = ops.multi_stats(xs)
    assert got.shape == (300, NUM_STATS)
    for i, x in enumerate(xs):
        assert_stats_match(got[i], reference.stats_ref(x), x.dtype, f"tensor {i}")
    records = torch.zeros(400, NUM_STATS, dtype=torch.float64)
    slots = list(range(399, 99, -1))
    ops.multi_stats_into(xs, records, slots)
    for i, x in enumerate(xs):
        assert_stats_match(records[slots[i]], got[i], x.dtype, f"slot {slots[i]}")
    assert (records[:100] == 0).all()


def test_results_do_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(11)
    x = random_tensor((2_000_003,), torch.float32, gen, inject=0.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.stats_record(x)
        torch.set_num_threads(max(2, threads))
        many = ops.stats_record(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_label_check_matches_reference(dtype):
    gen = torch.Generator().manual_seed(99)
    for shape in [(), (0,), (17,), (4, 9, 11), (70001,)]:
        base = random_tensor(shape, dtype, gen)
        for name, t in layouts(base):
            for num_classes, ignore in [(8, -100), (1, 0), (300, 255), (1000, -1)]:
                want = reference.label_check_ref(t, num_classes, ignore)
                got = ops.label_record(t, num_classes, ignore)
                assert torch.equal(got, want), f"{dtype} {shape} {name} {num_classes}: {got} {want}"
                rec2, clean = ops.label_sanitize(t, num_classes, ignore)
                want_rec, want_clean = reference.label_sanitize_ref(t, num_classes, ignore)
                assert torch.equal(rec2, want) and torch.equal(clean, want_clean)
                assert clean.dtype == torch.int64 and clean.shape == t.shape


def test_label_first_bad_is_row_major_even_for_permuted_targets():
    t = torch.zeros(4, 5, dtype=torch.int64)
    t[3, 0] = 9   # row-major index 15
    t[1, 4] = 9   # row-major index 9: the first
    tt = t.t().contiguous().t()  # same values, column-major storage
    for target in (t, tt):
        rec = ops.label_record(target, 8, -100)
        assert rec[LABEL["first_bad"]].item() == 9 and rec[LABEL["bad"]].item() == 2


def test_over_2_31_elements():
    n = 2**31 + 1000
    x = torch.zeros(n, dtype=torch.uint8)
    x[5] = 200
    x[2**31 + 17] = 255
    x[-1] = 9
    rec = ops.stats_record(x).tolist()
    assert rec[STAT["numel"]] == n and rec[STAT["zeros"]] == n - 3
    assert rec[STAT["max"]] == 255 and rec[STAT["sum"]] == 464
    lab = ops.label_record(x, 10, -100).tolist()
    assert lab[LABEL["bad"]] == 2 and lab[LABEL["first_bad"]] == 5
    x[5] = 0
    lab = ops.label_record(x, 10, -100).tolist()
    assert lab[LABEL["first_bad"]] == 2**31 + 17


# ------------------------------------------------------------------ extremes and edge cases

def _smallest_subnormal(dtype):
    info = torch.finfo(dtype)
    return info.tiny * info.eps  # 2**-149 for float32, 2**-133 for bfloat16, 2**-24 for float16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16] + FLOAT8_DTYPES,
                         ids=str)
def test_tiny_values_keep_their_squares(dtype):
    """Squares below the float range (values ~1e-38, subnormals) are not lost: the float64
    reference gives sumsq ~1e-73, not 0. Several blocks (5000 elements), mixed signs."""
    info = torch.finfo(dtype)
    values = [info.tiny, info.tiny / 4, _smallest_subnormal(dtype), 3 * _smallest_subnormal(dtype)]
    if dtype in (torch.float32, torch.bfloat16):
        values += [1e-38, 1e-30, 1e-20, 3e-22]
    for value in values:
        x = torch.full((5000,), value, dtype=torch.float64)
        x[::7] = -x[::7]
        x = x.to(dtype)
        want = reference.stats_ref(x)
        assert want[STAT["sumsq"]] > 0, f"{dtype} {value}"
        assert_stats_match(ops.stats_record(x), want, dtype, f"{dtype} value {value}")
    # a spread of magnitudes (most squares underflow float), and tiny blocks between normal ones
    gen = torch.Generator().manual_seed(17)
    spread = (torch.randn(70001, generator=gen, dtype=torch.float64)
              * torch.exp(torch.randn(70001, generator=gen, dtype=torch.float64) * 3) * 1e-36)
    x = spread.clamp(-info.max, info.max).to(dtype)
    assert_stats_match(ops.stats_record(x), reference.stats_ref(x), dtype, f"{dtype} spread")
    spread[:1024] = 1.0
    spread[-5] = math.nan
    x = spread.clamp(-info.max, info.max).to(dtype)
    assert_stats_match(ops.stats_record(x), reference.stats_ref(x), dtype, f"{dtype} mixed")


def test_integer_extremes_match_reference():
    cases = [
        torch.tensor([-2**63, 5, 2**63 - 1, 0], dtype=torch.int64),  # |INT64_MIN| = 2**63
        torch.tensor([-2**63], dtype=torch.int64),
        torch.tensor([-2**31, 2**31 - 1], dtype=torch.int32),
        torch.tensor([-128, 127], dtype=torch.int8),
        torch.tensor([0, 3, 2**63, 2**64 - 1, 2**63 - 1], dtype=torch.uint64),
        torch.tensor([0, 2**32 - 1, 2**31], dtype=torch.uint32),
        torch.tensor([0, 2**16 - 1], dtype=torch.uint16),
    ]
    for x in cases:
        assert_stats_match(ops.stats_record(x), reference.stats_ref(x), x.dtype, f"{x.tolist()}")
    rec = ops.stats_record(cases[1]).tolist()
    assert rec[STAT["absmax"]] == 2.0**63 and rec[STAT["min"]] == -2.0**63


def test_bool_bytes_other_than_one_count_as_true():
    """A bool tensor viewed from bytes may hold 2 or 255; torch (and the reference, and the
    CUDA kernel) reads any non-zero byte as True, i.e. 1."""
    b = torch.tensor([2, 0, 1, 255, 0, 7], dtype=torch.uint8).view(torch.bool)
    assert_stats_match(ops.stats_record(b), reference.stats_ref(b), torch.bool, "bool bytes")
    assert ops.stats_record(b).tolist()[STAT["max"]] == 1
    assert torch.equal(ops.label_record(b, 2, -100), reference.label_check_ref(b, 2, -100))
    rec, clean = ops.label_sanitize(b, 1, -100)
    want_rec, want_clean = reference.label_sanitize_ref(b, 1, -100)
    assert torch.equal(rec, want_rec) and torch.equal(clean, want_clean)
    assert clean.tolist() == [-100, 0, -100, -100, 0, -100]


INT64_MAX = 2**63 - 1


def test_uint64_labels_at_or_above_2_pow_63_are_bad_and_saturate():
    """A uint64 label >= 2**63 does not fit int64: it is always bad (never ignored, whatever
    ignore_index is), min / max report it saturated to INT64_MAX, and the sanitised copy holds
    ignore_index in its place. The reference and the kernels agree on every layout."""
    values = [3, 2**63, 0, 2**64 - 1, INT64_MAX, 7, 2**63 + 5, 1]
    t = torch.tensor(values, dtype=torch.uint64)
    # (ignore_index, bad, ignored, min, max, first_bad, clean)
    M = INT64_MAX
    expected = [
        (-100, 4, 0, 0, M, 1, [3, -100, 0, -100, -100, 7, -100, 1]),
        (-1, 4, 0, 0, M, 1, [3, -1, 0, -1, -1, 7, -1, 1]),  # 2**64 - 1 is not -1
        (M, 3, 1, 0, M, 1, [3, M, 0, M, M, 7, M, 1]),  # only the label that *is* M is ignored
        (-2**63, 4, 0, 0, M, 1, [3, -2**63, 0, -2**63, -2**63, 7, -2**63, 1]),
    ]
    for ignore, bad, ignored, lo, hi, first, clean_want in expected:
        for impl, check, sanitize in (("reference", reference.label_check_ref,
                                       reference.label_sanitize_ref),
                                      ("native", ops.label_record, ops.label_sanitize)):
            rec = check(t, 8, ignore).tolist()
            assert rec == [len(values), bad, ignored, lo, hi, first], f"{impl} ignore={ignore}: {rec}"
            rec2, clean = sanitize(t, 8, ignore)
            assert rec2.tolist() == rec and clean.tolist() == clean_want, f"{impl} ignore={ignore}"
    grid = torch.tensor(values * 3, dtype=torch.uint64).view(4, 6)
    for name, v in layouts(grid):
        for ignore in (-100, -1, INT64_MAX):
            assert torch.equal(ops.label_record(v, 8, ignore),
                               reference.label_check_ref(v, 8, ignore)), f"{name} {ignore}"
            got = ops.label_sanitize(v, 8, ignore)
            want = reference.label_sanitize_ref(v, 8, ignore)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{name} {ignore}"
    only_big = torch.tensor([2**64 - 1, 2**63], dtype=torch.uint64)
    assert ops.label_record(only_big, 8, -1).tolist() == [2, 2, 0, INT64_MAX, INT64_MAX, 0]
    assert reference.label_check_ref(only_big, 8, -1).tolist() == [2, 2, 0, INT64_MAX, INT64_MAX, 0]


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64], ids=str)
def test_wide_unsigned_labels_match_reference(dtype):
    gen = torch.Generator().manual_seed(8)
    t = torch.randint(0, 40, (4, 9, 11), generator=gen, dtype=torch.int64).to(dtype)
    for name, v in layouts(t):
        for num_classes, ignore in [(8, -100), (30, 7), (1, 0)]:
            assert torch.equal(ops.label_record(v, num_classes, ignore),
                               reference.label_check_ref(v, num_classes, ignore)), name
            got, want = ops.label_sanitize(v, num_classes, ignore), \
                reference.label_sanitize_ref(v, num_classes, ignore)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        assert_stats_match(ops.stats_record(v), reference.stats_ref(v), dtype, name)


FNUZ_DTYPES = [getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz")
               if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] + FLOAT8_DTYPES + FNUZ_DTYPES,
                         ids=str)
def test_every_bit_pattern_of_narrow_floats(dtype):
    """All 2**8 / 2**16 encodings at once: NaN payloads, ±Inf, -0, subnormals, the extremes."""
    bits = 8 * torch.empty(0, dtype=dtype).element_size()
    ity = torch.int16 if bits == 16 else torch.uint8
    x = torch.arange(2**bits, dtype=torch.int32).to(ity).view(dtype)
    assert_stats_match(ops.stats_record(x), reference.stats_ref(x), dtype, f"{dtype} all")
    assert_stats_match(ops.stats_record(x[1::3]), reference.stats_ref(x[1::3]), dtype,
                       f"{dtype} strided")


@pytest.mark.parametrize("dtype, ity, bits", [
    (torch.float32, torch.int32, [0x7FC00000, -0x00400000, 0x7F800001, -0x007FFFFF, 0x7FFFFFFF,
                                  -0x80000000, 0x00000001, -0x7FFFFFFF]),
    (torch.float64, torch.int64, [0x7FF8000000000000, -0x0008000000000000, 0x7FF0000000000001,
                                  -0x8000000000000000, 1, 0x7FF0000000000000]),
], ids=["float32", "float64"])
def test_nan_payloads_signs_and_signalling_nans(dtype, ity, bits):
    """Quiet / signalling / negative NaNs are NaN, -0 is a zero, subnormals are finite."""
    raw = torch.tensor(bits * 300 + [1, 2, 3], dtype=ity)
    x = raw.view(dtype)
    rec = ops.stats_record(x)
    assert_stats_match(rec, reference.stats_ref(x), dtype, f"{dtype} payloads")
    assert rec[STAT["nan"]] > 0 and rec[STAT["zeros"]] == 300


def test_parallel_kernels_are_deterministic_across_thread_counts():
    """Chunks are fixed-size and combined in order: the record does not depend on how many
    threads ran (the CPU kernels are OpenMP-parallel)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3_000_017, generator=gen) * 1e3
    x[123_456] = float("nan")
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.stats_record(x)
        many = ops.multi_stats([x, x[::3]])
        torch.set_num_threads(max(2, saved))
        assert torch.equal(one, ops.stats_record(x))
        assert torch.equal(many, ops.multi_stats([x, x[::3]]))
    finally:
        torch.set_num_threads(saved)
