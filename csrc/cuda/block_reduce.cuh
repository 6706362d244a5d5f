// Deterministic block reduction shared by the stats and label kernels (device code only:
// included by .cu files, never by the C++ glue).
#pragma once

// R: a reduction value with merge(R), shfl_down(int) and static identity().
// Fixed-shape tree: the same inputs always combine in the same order. Every thread of the
// block must call it; the result is in thread 0. Ends with a barrier so that the caller may
// reuse smem (e.g. for the next chunk). Warps = blockDim.x / 32 (at most 32).
template <int Warps, typename R>
__device__ __forceinline__ R block_reduce(R v, R* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v.merge(v.shfl_down(o));
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < Warps ? smem[lane] : R::identity();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v.merge(v.shfl_down(o));
  }
  __syncthreads();
  return v;
}
