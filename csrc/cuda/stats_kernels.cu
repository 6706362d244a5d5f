// Fused tensor statistics on CUDA, one pass over each tensor, many tensors per launch.
//
// No torch here (plain nvcc compiles this file in CI). Layout of the work:
//   stats_partials_kernel<dtype>: persistent grid; block b takes chunks b, b + grid, ... of a
//     flat chunk list spanning every tensor of the launch (binary search over first_chunk finds
//     the tensor), reduces its chunk in a fixed order and writes one StatsPartial per chunk (or
//     the record itself for a one-chunk tensor).
//   stats_finalize_kernel: one block per tensor combines its partials in chunk order and writes
//     its record row.
// Every result depends only on the tensor's bytes: not on the grid, the GPU or the neighbours.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "block_reduce.cuh"
#include "kernels.cuh"

namespace healthmon {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ double quiet_nan() { return __longlong_as_double(0x7ff8000000000000LL); }

// ------------------------------------------------------------------------- element decoding

// Float8 without a CUDA type (and one code path for all four): sign, exponent, mantissa.
// fnuz formats have no Inf and no -0; their only NaN is 0x80. e4m3fn has no Inf; NaN is S.1111.111.
template <int kExpBits, int kManBits, int kBias, bool kFnuz>
__device__ __forceinline__ float decode_fp8(uint8_t b) {
  const uint32_t mag = b & 0x7fu;
  const uint32_t e = mag >> kManBits;
  const uint32_t m = mag & ((1u << kManBits) - 1u);
  float v = e == 0 ? float(m) * __uint_as_float(uint32_t(127 + 1 - kBias - kManBits) << 23)
                   : __uint_as_float(((e + 127u - kBias) << 23) | (m << (23 - kManBits)));
  v = (b & 0x80u) ? -v : v;
  const bool is_nan = kFnuz ? b == 0x80u : mag == 0x7fu;
  return is_nan ? __uint_as_float(0x7fc00000u) : v;
}

// Per dtype: S = storage type, V = value type handed to the accumulator, Acc = accumulator.
struct FloatAcc;
struct DoubleAcc;
template <typename T> struct IntAcc;

template <Dtype D> struct Traits;
template <> struct Traits<Dtype::kFloat64> {
  using S = double; using V = double; using Acc = DoubleAcc;
  static __device__ __forceinline__ V value(S x) { return x; }
};
template <> struct Traits<Dtype::kFloat32> {
  using S = float; using V = float; using Acc = FloatAcc;
  static __device__ __forceinline__ V value(S x) { return x; }
};
template <> struct Traits<Dtype::kFloat16> {
  using S = uint16_t; using V = float; using Acc = FloatAcc;
  static __device__ __forceinline__ V value(S x) { return __half2float(__ushort_as_half(x)); }
};
template <> struct Traits<Dtype::kBFloat16> {  // bfloat16 is the top half of a float
  using S = uint16_t; using V = float; using Acc = FloatAcc;
  static __device__ __forceinline__ V value(S x) { return __uint_as_float(uint32_t(x) << 16); }
};
template <> struct Traits<Dtype::kFloat8E5M2> {  // e5m2 is the top byte of a float16
  using S = uint8_t; using V = float; using Acc = FloatAcc;
  static __device__ __forceinline__ V value(S x) {
    return __half2float(__ushort_as_half(uint16_t(uint16_t(x) << 8)));
  }
};
template <> struct Traits<Dtype::kFloat8E4M3FN> {
  using S = uint8_t; using V = float; using Acc = FloatAcc;
  static __device__ __forceinline__ V value(S x) { return decode_fp8<4, 3, 7, false>(x); }
};
template <> struct Traits<Dtype::kFloat8E4M3FNUZ> {
  using S = uint8_t; using V = float; using Acc = FloatAcc;
  static __device__ __forceinline__ V value(S x) { return decode_fp8<4, 3, 8, true>(x); }
};
template <> struct Traits<Dtype::kFloat8E5M2FNUZ> {
  using S = uint8_t; using V = float; using Acc = FloatAcc;
  static __device__ __forceinline__ V value(S x) { return decode_fp8<5, 2, 16, true>(x); }
};
#define HM_INT_TRAITS(D, T)                                                 \
  template <> struct Traits<D> {                                            \
    using S = T; using V = T; using Acc = IntAcc<T>;                        \
    static __device__ __forceinline__ V value(S x) { return x; }            \
  };
HM_INT_TRAITS(Dtype::kInt8, int8_t)
HM_INT_TRAITS(Dtype::kInt16, int16_t)
HM_INT_TRAITS(Dtype::kInt32, int32_t)
HM_INT_TRAITS(Dtype::kInt64, int64_t)
HM_INT_TRAITS(Dtype::kUInt8, uint8_t)
HM_INT_TRAITS(Dtype::kUInt16, uint16_t)
HM_INT_TRAITS(Dtype::kUInt32, uint32_t)
HM_INT_TRAITS(Dtype::kUInt64, uint64_t)
#undef HM_INT_TRAITS
template <> struct Traits<Dtype::kBool> {  // any non-zero byte is true, as in torch
  using S = uint8_t; using V = uint8_t; using Acc = IntAcc<uint8_t>;
  static __device__ __forceinline__ V value(S x) { return x != 0; }
};

// ------------------------------------------------------------------------------- reduction

// Statistics of a set of elements; C is the count type (32-bit per chunk, 64-bit per tensor).
template <typename C>
struct Red {
  C nan, posinf, neginf, zeros;
  double mn, mx, am, s, ss;

  __device__ __forceinline__ static Red identity() {
    return Red{0, 0, 0, 0, __longlong_as_double(0x7ff0000000000000LL),
               __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL)), 0.0, 0.0,
               0.0};
  }
  __device__ __forceinline__ void merge(const Red& o) {
    nan += o.nan; posinf += o.posinf; neginf += o.neginf; zeros += o.zeros;
    mn = fmin(mn, o.mn); mx = fmax(mx, o.mx); am = fmax(am, o.am);
    s += o.s; ss += o.ss;
  }
  __device__ __forceinline__ Red shfl_down(int offset) const {
    return Red{__shfl_down_sync(kFullMask, nan, offset), __shfl_down_sync(kFullMask, posinf, offset),
               __shfl_down_sync(kFullMask, neginf, offset), __shfl_down_sync(kFullMask, zeros, offset),
               __shfl_down_sync(kFullMask, mn, offset), __shfl_down_sync(kFullMask, mx, offset),
               __shfl_down_sync(kFullMask, am, offset), __shfl_down_sync(kFullMask, s, offset),
               __shfl_down_sync(kFullMask, ss, offset)};
  }
};
using ChunkRed = Red<unsigned int>;
using TensorRed = Red<unsigned long long>;


// ----------------------------------------------------------------------------- accumulators

// float16 / bfloat16 / float8 / float32: compare and accumulate in float, per 16-byte vector,
// then add the vector's sums to double accumulators. The fast path assumes the vector is all
// finite (no masking; abs-max from min / max: about 7 operations per element, which keeps
// bfloat16 / float8 memory-bound); a vector holding NaN / ±Inf is redone with masks. A vector
// whose float sum of squares overflowed (|x| > ~1.8e19) or may have underflowed (squares of
// |x| < ~1e-15) has its sums redone in double, so both extremes stay close to the float64
// reference.
struct FloatAcc {
  unsigned int nan = 0, posinf = 0, neginf = 0, zeros = 0;
  float mn = HUGE_VALF, mx = -HUGE_VALF, am = 0.f;
  double s = 0.0, ss = 0.0;

  template <int N>
  __device__ __forceinline__ void add(const float (&v)[N]) {
    const float inf = __uint_as_float(0x7f800000u);
    float vmn = inf, vmx = -inf, vs = 0.f, vss = 0.f;
    unsigned int vz = 0;
    bool all_finite = true;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float x = v[i];
      all_finite &= fabsf(x) < inf;  // false for NaN and ±Inf
      vz += x == 0.f;
      vmn = fminf(vmn, x);
      vmx = fmaxf(vmx, x);
      vs += x;
      vss = fmaf(x, x, vss);
    }
    if (!all_finite) {
      add_masked(v);
      return;
    }
    zeros += vz;
    mn = fminf(mn, vmn);
    mx = fmaxf(mx, vmx);
    const float va = fmaxf(-vmn, vmx);
    am = fmaxf(am, va);
    add_sums(v, vs, vss, va);
  }

  // Rare: the vector holds a NaN or an Inf.
  template <int N>
  __device__ __forceinline__ void add_masked(const float (&v)[N]) {
    const float inf = __uint_as_float(0x7f800000u);
    float vs = 0.f, vss = 0.f, va = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float x = v[i], ax = fabsf(x);
      const bool fin = ax < inf;
      nan += x != x;
      posinf += x == inf;
      neginf += x == -inf;
      zeros += x == 0.f;
      const float f = fin ? x : 0.f;
      vs += f;
      vss = fmaf(f, f, vss);
      mn = fminf(mn, fin ? x : inf);
      mx = fmaxf(mx, fin ? x : -inf);
      va = fmaxf(va, fin ? ax : 0.f);
    }
    am = fmaxf(am, va);
    add_sums(v, vs, vss, va);
  }

  template <int N>
  __device__ __forceinline__ void add_sums(const float (&v)[N], float vs, float vss, float va) {
    if (vss <= FLT_MAX && !(vss < 0x1p-100f && va > 0.f)) {
      s += vs;
      ss += vss;
      return;
    }
    const float inf = __uint_as_float(0x7f800000u);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const double d = fabsf(v[i]) < inf ? double(v[i]) : 0.0;
      s += d;
      ss = fma(d, d, ss);
    }
  }

  __device__ __forceinline__ ChunkRed result() const {
    return ChunkRed{nan, posinf, neginf, zeros, mn, mx, am, s, ss};
  }
};

struct DoubleAcc {
  unsigned int nan = 0, posinf = 0, neginf = 0, zeros = 0;
  double mn = HUGE_VAL, mx = -HUGE_VAL;
  double am = 0.0, s = 0.0, ss = 0.0;

  template <int N>
  __device__ __forceinline__ void add(const double (&v)[N]) {
    const double inf = __longlong_as_double(0x7ff0000000000000LL);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const double x = v[i], ax = fabs(x);
      const bool fin = ax < inf;
      nan += x != x;
      posinf += x == inf;
      neginf += x == -inf;
      zeros += x == 0.0;
      const double f = fin ? x : 0.0;
      s += f;
      ss = fma(f, f, ss);
      mn = fmin(mn, fin ? x : inf);
      mx = fmax(mx, fin ? x : -inf);
      am = fmax(am, fin ? ax : 0.0);
    }
  }
  __device__ __forceinline__ ChunkRed result() const {
    return ChunkRed{nan, posinf, neginf, zeros, mn, mx, am, s, ss};
  }
};

// Integers and bool: exact min / max / abs-max in 64 bits; 8- and 16-bit sums are exact in
// 64-bit integers (a thread sees at most a few hundred elements per chunk), wider ones in double.
template <typename T>
struct IntAcc {
  static constexpr bool kSigned = std::is_signed<T>::value;
  static constexpr bool kExactSums = sizeof(T) <= 2;
  using Wide = typename std::conditional<kSigned, long long, unsigned long long>::type;

  unsigned int zeros = 0;
  Wide mn = kSigned ? Wide(0x7fffffffffffffffLL) : Wide(~0ULL);
  Wide mx = kSigned ? Wide(-0x7fffffffffffffffLL - 1) : Wide(0);
  unsigned long long am = 0;
  long long isum = 0;
  unsigned long long isumsq = 0;
  double s = 0.0, ss = 0.0;

  template <int N>
  __device__ __forceinline__ void add(const T (&v)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const Wide x = static_cast<Wide>(v[i]);
      zeros += x == 0;
      mn = x < mn ? x : mn;
      mx = x > mx ? x : mx;
      unsigned long long a = static_cast<unsigned long long>(x);
      if constexpr (kSigned) a = x < 0 ? 0ULL - a : a;  // |INT64_MIN| fits unsigned
      am = a > am ? a : am;
      if constexpr (kExactSums) {
        isum += static_cast<long long>(x);
        isumsq += static_cast<unsigned long long>(static_cast<long long>(x) * static_cast<long long>(x));
      } else {
        const double d = static_cast<double>(x);
        s += d;
        ss = fma(d, d, ss);
      }
    }
  }
  // Converting after min / max is exact enough: double() is monotonic, so min(double(x)) ==
  // double(min(x)), as in the float64 reference.
  __device__ __forceinline__ ChunkRed result() const {
    const double inf = __longlong_as_double(0x7ff0000000000000LL);
    const bool any = mn <= mx;
    return ChunkRed{0u, 0u, 0u, zeros, any ? static_cast<double>(mn) : inf,
                    any ? static_cast<double>(mx) : -inf, static_cast<double>(am),
                    kExactSums ? static_cast<double>(isum) : s,
                    kExactSums ? static_cast<double>(isumsq) : ss};
  }
};

// -------------------------------------------------------------------------------- kernels

template <Dtype D>
__device__ __forceinline__ void add_vector(typename Traits<D>::Acc& acc, const uint4& raw) {
  using T = Traits<D>;
  constexpr int kVec = 16 / sizeof(typename T::S);
  typename T::S s[kVec];
  memcpy(s, &raw, sizeof(raw));
  typename T::V v[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) v[i] = T::value(s[i]);
  acc.add(v);
}

template <Dtype D>
__device__ __forceinline__ void add_scalar(typename Traits<D>::Acc& acc, typename Traits<D>::S x) {
  const typename Traits<D>::V v[1] = {Traits<D>::value(x)};
  acc.add(v);
}

// This thread's share of x[0, len): 16-byte loads over the aligned body, scalar head and tail
// (a sliced tensor may start anywhere; every chunk of a tensor has the same misalignment).
template <Dtype D>
__device__ __forceinline__ void span_stats(const typename Traits<D>::S* x, int64_t len,
                                           typename Traits<D>::Acc& acc) {
  using S = typename Traits<D>::S;
  constexpr int64_t kVec = 16 / sizeof(S);
  const int tid = threadIdx.x;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x);
  int64_t head = static_cast<int64_t>((16u - (addr & 15u)) & 15u) / static_cast<int64_t>(sizeof(S));
  head = head < len ? head : len;
  if (tid < head) add_scalar<D>(acc, x[tid]);

  const uint4* body = reinterpret_cast<const uint4*>(x + head);
  const int64_t nvec = (len - head) / kVec;
  for (int64_t base = 0; base < nvec; base += int64_t(kThreads) * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // issue every load before using any
      const int64_t i = base + int64_t(u) * kThreads + tid;
      raw[u] = i < nvec ? __ldg(body + i) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + int64_t(u) * kThreads + tid < nvec) add_vector<D>(acc, raw[u]);
    }
  }

  const int64_t done = head + nvec * kVec;
  if (tid < len - done) add_scalar<D>(acc, x[done + tid]);
}

template <typename C>
__device__ __forceinline__ void write_record(const Red<C>& r, int64_t numel, double* row) {
  const int64_t nonfinite = static_cast<int64_t>(r.nan) + static_cast<int64_t>(r.posinf) +
                            static_cast<int64_t>(r.neginf);
  const int64_t finite = numel - nonfinite;
  row[kNumel] = static_cast<double>(numel);
  row[kNan] = static_cast<double>(r.nan);
  row[kPosInf] = static_cast<double>(r.posinf);
  row[kNegInf] = static_cast<double>(r.neginf);
  row[kZeros] = static_cast<double>(r.zeros);
  row[kFinite] = static_cast<double>(finite);
  row[kMin] = finite > 0 ? r.mn : quiet_nan();
  row[kMax] = finite > 0 ? r.mx : quiet_nan();
  row[kSum] = r.s;
  row[kSumSq] = r.ss;
  row[kAbsMax] = r.am;
}

__device__ __forceinline__ StatsTensorMeta meta_at(const StatsMetaView& view, int64_t t) {
  return view.device != nullptr ? view.device[t] : view.one;
}

template <Dtype D>
__global__ void __launch_bounds__(kThreads)
    stats_partials_kernel(StatsMetaView view, int64_t num_tensors, int64_t chunk_begin,
                          int64_t chunk_end, StatsPartial* partials, double* records) {
  using S = typename Traits<D>::S;
  constexpr int64_t kChunkElems = kStatsChunkBytes / int64_t(sizeof(S));
  __shared__ ChunkRed smem[kWarps];
  for (int64_t c = chunk_begin + blockIdx.x; c < chunk_end; c += gridDim.x) {
    // The tensor of chunk c: the last one whose first_chunk <= c (an empty tensor shares its
    // first_chunk with the next one and is skipped). Every thread reads the same entries.
    int64_t lo = 0, hi = num_tensors;
    if (view.device != nullptr) {
      while (hi - lo > 1) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (view.device[mid].first_chunk <= c) lo = mid; else hi = mid;
      }
    }
    const StatsTensorMeta m = meta_at(view, lo);
    const int64_t start = (c - m.first_chunk) * kChunkElems;
    const int64_t len = m.numel - start < kChunkElems ? m.numel - start : kChunkElems;

    typename Traits<D>::Acc acc;
    span_stats<D>(static_cast<const S*>(m.data) + start, len, acc);
    const ChunkRed r = block_reduce<kWarps>(acc.result(), smem);
    if (threadIdx.x == 0) {
      if (m.num_chunks == 1) {
        write_record(r, m.numel, records + m.slot * kNumStatsFields);
      } else {
        partials[c] = StatsPartial{r.nan, r.posinf, r.neginf, r.zeros, r.mn, r.mx, r.am, r.s, r.ss};
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    stats_finalize_kernel(StatsMetaView view, int64_t num_tensors, const StatsPartial* partials,
                          double* records) {
  __shared__ TensorRed smem[kWarps];
  for (int64_t t = blockIdx.x; t < num_tensors; t += gridDim.x) {
    const StatsTensorMeta m = meta_at(view, t);
    if (m.num_chunks == 1) continue;  // written by the partials kernel (uniform per block)
    TensorRed r = TensorRed::identity();
    for (int64_t k = threadIdx.x; k < m.num_chunks; k += kThreads) {  // fixed order per thread
      const StatsPartial& p = partials[m.first_chunk + k];
      r.merge(TensorRed{p.nan, p.posinf, p.neginf, p.zeros, p.min, p.max, p.absmax, p.sum,
                        p.sumsq});
    }
    r = block_reduce<kWarps>(r, smem);
    if (threadIdx.x == 0) write_record(r, m.numel, records + m.slot * kNumStatsFields);
  }
}

// Resident blocks per SM of a kernel, asked once per instantiation (pure host computation, no
// device work). The persistent grid is sm_count times this: one wave, no tail of late blocks.
template <typename Kernel>
int blocks_per_sm(Kernel kernel) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();  // not sticky; fall back to a reasonable guess
    n = 4;
  }
  return n;
}

template <Dtype D>
cudaError_t launch_partials_typed(const StatsMetaView& meta, int64_t num_tensors,
                                  int64_t chunk_begin, int64_t chunk_end, StatsPartial* partials,
                                  double* records, int sm_count, cudaStream_t stream) {
  static const int per_sm = blocks_per_sm(stats_partials_kernel<D>);
  const int64_t chunks = chunk_end - chunk_begin;
  const int64_t wave = int64_t(sm_count > 0 ? sm_count : 1) * per_sm;
  const unsigned grid = static_cast<unsigned>(chunks < wave ? chunks : wave);
  stats_partials_kernel<D><<<grid, kThreads, 0, stream>>>(meta, num_tensors, chunk_begin,
                                                          chunk_end, partials, records);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_stats_partials(StatsMetaView meta, int64_t num_tensors, Dtype dtype,
                                  int64_t chunk_begin, int64_t chunk_end, StatsPartial* partials,
                                  double* records, int sm_count, cudaStream_t stream) {
  if (num_tensors <= 0 || chunk_end <= chunk_begin) return cudaSuccess;
  switch (dtype) {
#define HM_CASE(D)                                                                          \
  case D:                                                                                   \
    return launch_partials_typed<D>(meta, num_tensors, chunk_begin, chunk_end, partials,   \
                                    records, sm_count, stream);
    HM_CASE(Dtype::kFloat64)
    HM_CASE(Dtype::kFloat32)
    HM_CASE(Dtype::kFloat16)
    HM_CASE(Dtype::kBFloat16)
    HM_CASE(Dtype::kFloat8E4M3FN)
    HM_CASE(Dtype::kFloat8E5M2)
    HM_CASE(Dtype::kFloat8E4M3FNUZ)
    HM_CASE(Dtype::kFloat8E5M2FNUZ)
    HM_CASE(Dtype::kInt8)
    HM_CASE(Dtype::kInt16)
    HM_CASE(Dtype::kInt32)
    HM_CASE(Dtype::kInt64)
    HM_CASE(Dtype::kUInt8)
    HM_CASE(Dtype::kUInt16)
    HM_CASE(Dtype::kUInt32)
    HM_CASE(Dtype::kUInt64)
    HM_CASE(Dtype::kBool)
#undef HM_CASE
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_stats_finalize(StatsMetaView meta, int64_t num_tensors,
                                  const StatsPartial* partials, double* records,
                                  cudaStream_t stream) {
  if (num_tensors <= 0) return cudaSuccess;
  constexpr int64_t kMaxGrid = 1 << 16;  // grid-stride beyond this many tensors
  const unsigned grid = static_cast<unsigned>(num_tensors < kMaxGrid ? num_tensors : kMaxGrid);
  stats_finalize_kernel<<<grid, kThreads, 0, stream>>>(meta, num_tensors, partials, records);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace healthmon
