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
