"""Random test tensors with NaN / ±Inf / -0 / subnormal / huge values injected (shared by the
op tests)."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
FLOAT8_DTYPES = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2")
                 if hasattr(torch, n)]
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool]

# Relative tolerance of sum / sumsq (to the sum of |x| / to sumsq) per dtype: accumulation
# order differs from the float64 reference; min / max / absmax and counts must match exactly.
SUM_RTOL = {torch.float64: 1e-12}
DEFAULT_SUM_RTOL = 1e-5


def special_values(dtype: torch.dtype) -> list:
    info = torch.finfo(dtype)
    big = info.max if dtype != torch.float64 else 1e300  # float64 sums must not overflow
    values = [math.nan, math.inf, -math.inf, -0.0, 0.0, info.tiny / 4, -info.tiny / 2,
              big, -big, big / 3]
    if dtype in FLOAT8_DTYPES and dtype == getattr(torch, "float8_e4m3fn", None):
        values = [v for v in values if not math.isinf(v)]  # e4m3fn has no Inf
    return values


def random_tensor(shape, dtype, gen: torch.Generator, inject: float = 0.05) -> torch.Tensor:
    """A random tensor of ``shape`` and ``dtype`` with specials at ~``inject`` of positions."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        lo, hi = max(info.min, -1000), min(info.max, 1000)
        return torch.randint(lo, hi + 1, shape, generator=gen, dtype=torch.int64).to(dtype)
    scale = torch.exp(torch.randn(shape, generator=gen, dtype=torch.float64) * 3)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale)
    x = x.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    flat = x.view(-1)
    if flat.numel():
        specials = special_values(dtype)
        mask = torch.rand(flat.numel(), generator=gen) < inject
        picks = torch.randint(0, len(specials), (flat.numel(),), generator=gen)
        for i in torch.nonzero(mask).view(-1).tolist():
            flat[i] = specials[picks[i]]
    return x


def layouts(x: torch.Tensor):
    """The same data under several layouts: contiguous, transposed, sliced, expanded,
    channels_last (4-d)."""
    yield "contiguous", x
    if x.dim() >= 2:
        yield "transposed", x.transpose(0, -1)
        yield "sliced", x[::2, 1:]
    if x.dim() >= 1 and x.shape[0] > 0:
        yield "strided", x[::3]
        yield "expanded", x[:1].expand(3, *x.shape[1:]) if x.dim() > 1 else x[:1].expand(5)
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)


def assert_stats_match(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, ctx: str = ""):
    """Counts and selections exact, sums within the dtype's tolerance."""
    from healthmon._layout import STAT
    got, want = got.cpu().tolist(), want.cpu().tolist()
    for name in ("numel", "nan", "posinf", "neginf", "zeros", "finite"):
        assert got[STAT[name]] == want[STAT[name]], f"{ctx}: {name} {got} != {want}"
    for name in ("min", "max", "absmax"):
        g, w = got[STAT[name]], want[STAT[name]]
        assert (math.isnan(g) and math.isnan(w)) or g == w, f"{ctx}: {name} {g} != {w}"
    rtol = SUM_RTOL.get(dtype, DEFAULT_SUM_RTOL)
    g, w = got[STAT["sumsq"]], want[STAT["sumsq"]]
    assert (math.isinf(g) and math.isinf(w)) or abs(g - w) <= rtol * abs(w) + 1e-300, \
        f"{ctx}: sumsq {g} != {w}"
    # the error of a sum is relative to the sum of magnitudes: sqrt(n * sumsq) bounds it
    scale = math.sqrt(max(got[STAT["finite"]], 1) * abs(w)) if not math.isinf(w) else math.inf
    g, w = got[STAT["sum"]], want[STAT["sum"]]
    assert abs(g - w) <= rtol * scale + 1e-300 or (math.isinf(scale)), f"{ctx}: sum {g} != {w}"
