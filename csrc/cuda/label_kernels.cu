// Range check of integer labels on CUDA, one pass, with an optional sanitised int64 copy.
//
// No torch here (plain nvcc compiles this file in CI). Bad labels are counted, never asserted
// on: a device assert would kill the CUDA context, which is exactly what this op exists to
// avoid (nll_loss / cross_entropy do that on an out-of-range target).
//   label_partials_kernel<T>: persistent grid, 16-byte loads over the aligned body; one
//     LabelPartial per block.
//   label_finalize_kernel: one block combines the block partials into the record. Every field
//     is an integer sum, min or max, so the result is exact whatever the grid.
#include <cuda_runtime.h>

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
constexpr int kBlocksPerSm = 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr long long kInt64Max = 0x7fffffffffffffffLL;
constexpr long long kInt64Min = -kInt64Max - 1;

struct LabelRed {
  long long bad, ignored, mn, mx, first_bad;

  __device__ __forceinline__ static LabelRed identity() {
    return LabelRed{0, 0, kInt64Max, kInt64Min, kInt64Max};
  }
  __device__ __forceinline__ void merge(const LabelRed& o) {
    bad += o.bad;
    ignored += o.ignored;
    mn = o.mn < mn ? o.mn : mn;
    mx = o.mx > mx ? o.mx : mx;
    first_bad = o.first_bad < first_bad ? o.first_bad : first_bad;
  }
  __device__ __forceinline__ LabelRed shfl_down(int offset) const {
    return LabelRed{__shfl_down_sync(kFullMask, bad, offset),
                    __shfl_down_sync(kFullMask, ignored, offset),
                    __shfl_down_sync(kFullMask, mn, offset), __shfl_down_sync(kFullMask, mx, offset),
                    __shfl_down_sync(kFullMask, first_bad, offset)};
  }
};


// A torch bool byte: any non-zero value is True (1), as torch reads it.
struct BoolByte {
  uint8_t byte;
};

// Labels as int64. A uint64 label above INT64_MAX does not fit: it saturates to INT64_MAX (the
// min / max it reports) and `overflows` marks it, which makes it bad whatever ignore_index is
// (as in the CPU kernel and healthmon.reference.label_check_ref).
template <typename T>
__device__ __forceinline__ long long widen(T v) {
  if constexpr (std::is_same<T, uint64_t>::value) {
    return v > static_cast<uint64_t>(kInt64Max) ? kInt64Max : static_cast<long long>(v);
  } else if constexpr (std::is_same<T, BoolByte>::value) {
    return v.byte != 0;
  } else {
    return static_cast<long long>(v);
  }
}

template <typename T>
__device__ __forceinline__ bool overflows(T v) {
  if constexpr (std::is_same<T, uint64_t>::value) {
    return v > static_cast<uint64_t>(kInt64Max);
  } else {
    return false;
  }
}

struct Check {
  long long num_classes, ignore_index;
  long long* clean;  // nullptr: check only

  template <typename T>
  __device__ __forceinline__ void operator()(T raw, long long i, LabelRed& r) const {
    const long long v = widen(raw);
    const bool over = overflows(raw);
    const bool ignored = !over && v == ignore_index;
    const bool bad = !ignored && (over || v < 0 || v >= num_classes);
    r.ignored += ignored;
    r.bad += bad;
    r.mn = v < r.mn ? v : r.mn;
    r.mx = v > r.mx ? v : r.mx;
    r.first_bad = (bad && i < r.first_bad) ? i : r.first_bad;
    if (clean != nullptr) clean[i] = bad ? ignore_index : v;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    label_partials_kernel(const T* __restrict__ x, long long n, Check check,
                          LabelPartial* __restrict__ partials) {
  constexpr long long kVec = 16 / sizeof(T);
  __shared__ LabelRed smem[kWarps];
  LabelRed r = LabelRed::identity();
  const long long g = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;

  const uintptr_t addr = reinterpret_cast<uintptr_t>(x);
  long long head = static_cast<long long>((16u - (addr & 15u)) & 15u) / static_cast<long long>(sizeof(T));
  head = head < n ? head : n;
  if (g < head) check(x[g], g, r);

  const uint4* body = reinterpret_cast<const uint4*>(x + head);
  const long long nvec = (n - head) / kVec;
  for (long long v = g; v < nvec; v += stride) {
    const uint4 raw = __ldg(body + v);
    T vals[kVec];
    memcpy(vals, &raw, sizeof(raw));
    const long long base = head + v * kVec;
#pragma unroll
    for (int k = 0; k < kVec; ++k) check(vals[k], base + k, r);
  }

  const long long done = head + nvec * kVec;
  if (g < n - done) check(x[done + g], done + g, r);

  r = block_reduce<kWarps>(r, smem);
  if (threadIdx.x == 0) partials[blockIdx.x] = LabelPartial{r.bad, r.ignored, r.mn, r.mx, r.first_bad};
}

__global__ void __launch_bounds__(kThreads)
    label_finalize_kernel(const LabelPartial* __restrict__ partials, long long num_partials,
                          long long n, int64_t* __restrict__ record) {
  __shared__ LabelRed smem[kWarps];
  LabelRed r = LabelRed::identity();
  for (long long b = threadIdx.x; b < num_partials; b += kThreads) {
    const LabelPartial& p = partials[b];
    r.merge(LabelRed{p.bad, p.ignored, p.min, p.max, p.first_bad});
  }
  r = block_reduce<kWarps>(r, smem);
  if (threadIdx.x == 0) {
    record[kLabelNumel] = n;
    record[kLabelBad] = r.bad;
    record[kLabelIgnored] = r.ignored;
    record[kLabelMin] = n > 0 ? r.mn : 0;
    record[kLabelMax] = n > 0 ? r.mx : 0;
    record[kLabelFirstBad] = r.bad > 0 ? r.first_bad : -1;
  }
}

int64_t label_grid(int64_t n, Dtype dtype, int sm_count) {
  if (n <= 0) return 0;
  const int64_t per_block = int64_t(kThreads) * (16 / dtype_size(dtype));
  const int64_t want = (n + per_block - 1) / per_block;
  const int64_t wave = int64_t(sm_count > 0 ? sm_count : 1) * kBlocksPerSm;
  return want < wave ? want : wave;
}

template <typename T>
void launch_partials(const void* labels, int64_t n, const Check& check, LabelPartial* partials,
                     unsigned grid, cudaStream_t stream) {
  label_partials_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(labels), n, check,
                                                          partials);
}

}  // namespace

int64_t label_workspace_entries(int64_t n, Dtype dtype, int sm_count) {
  return label_grid(n, dtype, sm_count);
}

cudaError_t launch_label_check(const void* labels, int64_t n, Dtype dtype, int64_t num_classes,
                               int64_t ignore_index, int64_t* clean, int64_t* record,
                               LabelPartial* workspace, int sm_count, cudaStream_t stream) {
  const int64_t grid = label_grid(n, dtype, sm_count);
  if (grid > 0) {
    const Check check{num_classes, ignore_index, reinterpret_cast<long long*>(clean)};
    const unsigned g = static_cast<unsigned>(grid);
    switch (dtype) {
      case Dtype::kBool: launch_partials<BoolByte>(labels, n, check, workspace, g, stream); break;
      case Dtype::kUInt8: launch_partials<uint8_t>(labels, n, check, workspace, g, stream); break;
      case Dtype::kInt8: launch_partials<int8_t>(labels, n, check, workspace, g, stream); break;
      case Dtype::kInt16: launch_partials<int16_t>(labels, n, check, workspace, g, stream); break;
      case Dtype::kInt32: launch_partials<int32_t>(labels, n, check, workspace, g, stream); break;
      case Dtype::kInt64: launch_partials<int64_t>(labels, n, check, workspace, g, stream); break;
      case Dtype::kUInt16: launch_partials<uint16_t>(labels, n, check, workspace, g, stream); break;
      case Dtype::kUInt32: launch_partials<uint32_t>(labels, n, check, workspace, g, stream); break;
      case Dtype::kUInt64: launch_partials<uint64_t>(labels, n, check, workspace, g, stream); break;
      default: return cudaErrorInvalidValue;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  label_finalize_kernel<<<1, kThreads, 0, stream>>>(workspace, grid, n, record);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace healthmon
