// CPU kernels of the stats ops: one pass, vectorised block kernels, parallel over fixed-size
// chunks with a deterministic in-order combine (results do not depend on the thread count).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../record.h"

namespace healthmon {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per parallel task (fixed: determinism)
constexpr int64_t kBlock = 1 << 10;  // elements per float-accumulated block inside a chunk

// Statistics of a run of elements; combined in a fixed order.
struct Partial {
  int64_t nan = 0, posinf = 0, neginf = 0, zeros = 0;
  double min = std::numeric_limits<double>::infinity();
  double max = -std::numeric_limits<double>::infinity();
  double sum = 0, sumsq = 0, absmax = 0;

  void merge(const Partial& o) {
    nan += o.nan; posinf += o.posinf; neginf += o.neginf; zeros += o.zeros;
    min = std::min(min, o.min); max = std::max(max, o.max);
    sum += o.sum; sumsq += o.sumsq; absmax = std::max(absmax, o.absmax);
  }
};

// Exact statistics of a short block: branch-free, vectorised by the compiler (omp simd
// reductions), accumulating in T. Used for blocks that hold a non-finite value.
template <typename T>
inline __attribute__((always_inline)) void block_stats(const T* __restrict x, int64_t n,
                                                       Partial& p) {
  const T inf = std::numeric_limits<T>::infinity();
  int32_t nan = 0, posinf = 0, neginf = 0, zeros = 0;
  T mn = inf, mx = -inf, s = 0, ss = 0, am = 0;
#pragma omp simd reduction(+ : nan, posinf, neginf, zeros, s, ss) reduction(min : mn) \
    reduction(max : mx, am)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    const T a = v < 0 ? -v : v;
    const bool finite = a < inf;  // false for NaN and ±Inf
    nan += !(v == v);
    posinf += v == inf;
    neginf += v == -inf;
    zeros += v == 0;
    const T f = finite ? v : T(0);
    const T f_lo = finite ? v : inf;
    const T f_hi = finite ? v : -inf;
    const T f_abs = finite ? a : T(0);
    s += f;
    ss += f * f;
    mn = f_lo < mn ? f_lo : mn;
    mx = f_hi > mx ? f_hi : mx;
    am = f_abs > am ? f_abs : am;
  }
  p.nan += nan; p.posinf += posinf; p.neginf += neginf; p.zeros += zeros;
  p.min = std::min(p.min, double(mn)); p.max = std::max(p.max, double(mx));
  p.sum += double(s); p.sumsq += double(ss); p.absmax = std::max(p.absmax, double(am));
}

// Fast path of a block assumed all finite: no masking, and abs-max comes from min / max.
// Returns false when the assumption fails: any NaN or ±Inf makes the sum of squares NaN or
// Inf (as does a square beyond T's range); the caller then reruns the exact kernel on the
// block, which is still in L1.
template <typename T>
inline __attribute__((always_inline)) bool block_stats_finite(const T* __restrict x, int64_t n,
                                                              Partial& p) {
  const T inf = std::numeric_limits<T>::infinity();
  int32_t zeros = 0;
  T mn = inf, mx = -inf, s = 0, ss = 0;
#pragma omp simd reduction(+ : zeros, s, ss) reduction(min : mn) reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    zeros += v == 0;
    s += v;
    ss += v * v;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  if (!std::isfinite(ss) || !std::isfinite(s)) return false;
  p.zeros += zeros;
  if (n > 0) {
    p.min = std::min(p.min, double(mn));
    p.max = std::max(p.max, double(mx));
    p.absmax = std::max(p.absmax, std::max(-double(mn), double(mx)));
  }
  p.sum += double(s);
  p.sumsq += double(ss);
  return true;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HM_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HM_TARGET_CLONES
#endif

// Sum and sum of squares of the finite values in double: the slow path of a float block whose
// float sums left the float range. Inlined into the clones of its caller, so it vectorises.
inline __attribute__((always_inline)) void block_sums_f64(const float* __restrict x, int64_t n,
                                                          double& sum, double& sumsq) {
  const double inf = std::numeric_limits<double>::infinity();
  double s = 0, ss = 0;
#pragma omp simd reduction(+ : s, ss)
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i];
    const double f = (v < 0 ? -v : v) < inf ? v : 0.0;  // NaN and ±Inf contribute nothing
    s += f;
    ss += f * f;
  }
  sum = s;
  sumsq = ss;
}

// A float block's sum of squares below this may have lost squares to underflow: |x| < 2^-63
// squares to a float subnormal, |x| < 2^-75 to zero. At or above it, rounding the subnormal
// squares of a block (at most kBlock * 2^-150) costs under 2^-40 relative: nothing to redo.
constexpr double kTinySumSq = 0x1p-100;

// Sum of squares of the finite values of a block whose float sum of squares is below
// kTinySumSq: every finite |x| is then below ~2^-50, so x * 2^100 is exact (a power of two; the
// smallest subnormal 2^-149 becomes 2^-49) and its square a normal float well inside the range.
// Squared and summed in float (as fast as the common path), scaled back by 2^-200 in double.
inline __attribute__((always_inline)) double block_tiny_sumsq(const float* __restrict x,
                                                              int64_t n) {
  const float inf = std::numeric_limits<float>::infinity();
  float ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float f = (v < 0 ? -v : v) < inf ? v * 0x1p100f : 0.f;  // NaN and ±Inf: nothing
    ss += f * f;
  }
  return double(ss) * 0x1p-200;
}

HM_TARGET_CLONES void span_stats_f32(const float* x, int64_t n, Partial& p) {
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    Partial block;
    if (!block_stats_finite<float>(x + i, m, block)) {
      block = Partial();
      block_stats<float>(x + i, m, block);
      // squares beyond the float range (|x| above ~1.8e19 overflows the float accumulator)
      if (!std::isfinite(block.sum) || !std::isfinite(block.sumsq)) {
        block_sums_f64(x + i, m, block.sum, block.sumsq);
      }
    }
    // squares below the float range (values ~1e-38 square to 0 in float): one compare per
    // block on the common path. (The float sum needs no redo: adding floats never underflows.)
    if (block.sumsq < kTinySumSq && block.absmax > 0) block.sumsq = block_tiny_sumsq(x + i, m);
    p.merge(block);
  }
}

HM_TARGET_CLONES void span_stats_f64(const double* x, int64_t n, Partial& p) {
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    Partial block;
    if (!block_stats_finite<double>(x + i, m, block)) {
      block = Partial();
      block_stats<double>(x + i, m, block);
    }
    p.merge(block);
  }
}

// Reduced-precision floats: widen a block to float on the stack, then the float kernel.
template <typename T>
void span_stats_widened(const T* x, int64_t n, Partial& p) {
  alignas(64) float buf[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    for (int64_t j = 0; j < m; ++j) buf[j] = static_cast<float>(x[i + j]);
    span_stats_f32(buf, m, p);
  }
}

// bfloat16 is the top half of a float: widening is a shift, which vectorises.
HM_TARGET_CLONES void widen_bf16(const uint16_t* __restrict x, int64_t n, float* __restrict out) {
  uint32_t* bits = reinterpret_cast<uint32_t*>(out);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) bits[j] = uint32_t(x[j]) << 16;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// float16 through the compiler's _Float16: F16C conversions in the x86-64-v3/v4 clones.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void widen_f16(const uint16_t* __restrict x, int64_t n, float* __restrict out) {
  const _Float16* h = reinterpret_cast<const _Float16*>(x);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(h[j]);
}
#else
void widen_f16(const uint16_t* __restrict x, int64_t n, float* __restrict out) {
  const at::Half* h = reinterpret_cast<const at::Half*>(x);
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(h[j]);
}
#endif

void span_stats_f16(const at::Half* x, int64_t n, Partial& p) {
  alignas(64) float buf[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    widen_f16(reinterpret_cast<const uint16_t*>(x + i), m, buf);
    span_stats_f32(buf, m, p);
  }
}

void span_stats_bf16(const at::BFloat16* x, int64_t n, Partial& p) {
  alignas(64) float buf[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    widen_bf16(reinterpret_cast<const uint16_t*>(x + i), m, buf);
    span_stats_f32(buf, m, p);
  }
}

// Integer and bool tensors: no NaN / Inf; exact min / max / abs-max, sums in double. A bool
// is read as its byte != 0, as torch reads it (a bool viewed from bytes may hold 2 or 255).
template <typename T, bool kBool = false>
void span_stats_integer(const T* x, int64_t n, Partial& p) {
  using Wide = std::conditional_t<std::is_signed_v<T>, int64_t, uint64_t>;
  Wide mn = std::numeric_limits<Wide>::max(), mx = std::numeric_limits<Wide>::min();
  int64_t zeros = 0;
  double s = 0, ss = 0;
  uint64_t am = 0;
  for (int64_t i = 0; i < n; ++i) {
    const Wide v = kBool ? Wide(x[i] != 0) : static_cast<Wide>(x[i]);
    zeros += v == 0;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    const double d = static_cast<double>(v);
    s += d;
    ss += d * d;
    uint64_t a = static_cast<uint64_t>(v);
    if constexpr (std::is_signed_v<T>) a = v < 0 ? uint64_t(0) - a : a;  // |INT64_MIN| = 2^63
    am = a > am ? a : am;
  }
  p.zeros += zeros;
  if (n > 0) {
    p.min = std::min(p.min, double(mn));
    p.max = std::max(p.max, double(mx));
    p.absmax = std::max(p.absmax, double(am));
  }
  p.sum += s;
  p.sumsq += ss;
}

void span_stats(const void* data, at::ScalarType dtype, int64_t n, Partial& p) {
  switch (dtype) {
    case at::kFloat: return span_stats_f32(static_cast<const float*>(data), n, p);
    case at::kDouble: return span_stats_f64(static_cast<const double*>(data), n, p);
    case at::kHalf: return span_stats_f16(static_cast<const at::Half*>(data), n, p);
    case at::kBFloat16: return span_stats_bf16(static_cast<const at::BFloat16*>(data), n, p);
    case at::kFloat8_e4m3fn:
      return span_stats_widened(static_cast<const c10::Float8_e4m3fn*>(data), n, p);
    case at::kFloat8_e5m2:
      return span_stats_widened(static_cast<const c10::Float8_e5m2*>(data), n, p);
    case at::kFloat8_e4m3fnuz:
      return span_stats_widened(static_cast<const c10::Float8_e4m3fnuz*>(data), n, p);
    case at::kFloat8_e5m2fnuz:
      return span_stats_widened(static_cast<const c10::Float8_e5m2fnuz*>(data), n, p);
    case at::kBool:
      return span_stats_integer<uint8_t, true>(static_cast<const uint8_t*>(data), n, p);
    case at::kByte: return span_stats_integer(static_cast<const uint8_t*>(data), n, p);
    case at::kChar: return span_stats_integer(static_cast<const int8_t*>(data), n, p);
    case at::kShort: return span_stats_integer(static_cast<const int16_t*>(data), n, p);
    case at::kInt: return span_stats_integer(static_cast<const int32_t*>(data), n, p);
    case at::kLong: return span_stats_integer(static_cast<const int64_t*>(data), n, p);
    case at::kUInt16: return span_stats_integer(static_cast<const uint16_t*>(data), n, p);
    case at::kUInt32: return span_stats_integer(static_cast<const uint32_t*>(data), n, p);
    case at::kUInt64: return span_stats_integer(static_cast<const uint64_t*>(data), n, p);
    default: TORCH_CHECK(false, "healthmon: unsupported dtype ", dtype);
  }
}

void write_record(const Partial& p, int64_t numel, double* row) {
  const int64_t finite = numel - p.nan - p.posinf - p.neginf;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  row[kNumel] = double(numel);
  row[kNan] = double(p.nan);
  row[kPosInf] = double(p.posinf);
  row[kNegInf] = double(p.neginf);
  row[kZeros] = double(p.zeros);
  row[kFinite] = double(finite);
  row[kMin] = finite > 0 ? p.min : nan;
  row[kMax] = finite > 0 ? p.max : nan;
  row[kSum] = p.sum;
  row[kSumSq] = p.sumsq;
  row[kAbsMax] = p.absmax;
}

// All tensors' chunks form one task list for one parallel pass; partials are combined per
// tensor in chunk order.
void stats_many(const std::vector<at::Tensor>& xs, double* records, at::IntArrayRef slots) {
  std::vector<at::Tensor> spans;
  std::vector<int64_t> first_chunk(xs.size() + 1, 0);
  spans.reserve(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    spans.push_back(as_flat_span(xs[i]));
    first_chunk[i + 1] = first_chunk[i] + (xs[i].numel() + kChunk - 1) / kChunk;
  }
  const int64_t total_chunks = first_chunk.back();
  std::vector<Partial> partials(total_chunks);
  at::parallel_for(0, total_chunks, 1, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(first_chunk.begin(), first_chunk.end(), begin) -
               first_chunk.begin() - 1;
    for (int64_t c = begin; c < end; ++c) {
      while (c >= first_chunk[t + 1]) ++t;
      const at::Tensor& x = spans[t];
      const int64_t start = (c - first_chunk[t]) * kChunk;
      const int64_t n = std::min(kChunk, x.numel() - start);
      const char* base = static_cast<const char*>(x.const_data_ptr());
      span_stats(base + start * x.element_size(), x.scalar_type(), n, partials[c]);
    }
  });
  for (size_t t = 0; t < xs.size(); ++t) {
    Partial total;
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) total.merge(partials[c]);
    write_record(total, xs[t].numel(), records + slots[t] * kNumStatsFields);
  }
}

void stats_into_cpu(const at::Tensor& x, at::Tensor& records, int64_t slot) {
  check_stats_input(x, "stats_into");
  check_records(records, x.device(), {slot}, "stats_into");
  stats_many({x}, records.data_ptr<double>(), {slot});
}

at::Tensor stats_cpu(const at::Tensor& x) {
  check_stats_input(x, "stats");
  at::Tensor out = at::empty({1, kNumStatsFields}, x.options().dtype(at::kDouble));
  stats_many({x}, out.data_ptr<double>(), {0});
  return out.view({kNumStatsFields});
}

void multi_stats_into_cpu(at::TensorList xs, at::Tensor& records, at::IntArrayRef slots) {
  TORCH_CHECK(xs.size() == slots.size(), "healthmon.multi_stats_into: ", xs.size(),
              " tensors but ", slots.size(), " slots");
  for (const auto& x : xs) check_stats_input(x, "multi_stats_into");
  check_records(records, records.device(), slots, "multi_stats_into");
  for (const auto& x : xs) {
    TORCH_CHECK(x.device() == records.device(), "healthmon.multi_stats_into: a tensor is on ",
                x.device(), " but the records are on ", records.device());
  }
  stats_many(xs.vec(), records.data_ptr<double>(), slots);
}

at::Tensor multi_stats_cpu(at::TensorList xs) {
  for (const auto& x : xs) check_stats_input(x, "multi_stats");
  at::Tensor out = at::empty({int64_t(xs.size()), kNumStatsFields}, at::dtype(at::kDouble));
  std::vector<int64_t> slots(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) slots[i] = int64_t(i);
  stats_many(xs.vec(), out.data_ptr<double>(), slots);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(healthmon, CPU, m) {
  m.impl("stats", &stats_cpu);
  m.impl("stats_into", &stats_into_cpu);
  m.impl("multi_stats", &multi_stats_cpu);
  m.impl("multi_stats_into", &multi_stats_into_cpu);
}

}  // namespace healthmon
