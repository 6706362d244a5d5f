// Torch-free host API of the healthmon CUDA kernels: raw pointers, int64 sizes, a dtype enum of
// our own and a cudaStream_t. Implemented in stats_kernels.cu / label_kernels.cu (plain nvcc,
// no torch headers), called by ../cuda_glue.cpp, which owns checks, memory and streams.
//
// Nothing here synchronises with the device or allocates: callers pass every buffer (from the
// torch caching allocator) and every launch is asynchronous on `stream`.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../record.h"

namespace healthmon {
namespace cuda {

// Element types the kernels read. Bool is read as uint8 (torch stores it as 0 / 1 bytes).
enum class Dtype : int32_t {
  kFloat64 = 0,
  kFloat32,
  kFloat16,
  kBFloat16,
  kFloat8E4M3FN,
  kFloat8E5M2,
  kFloat8E4M3FNUZ,
  kFloat8E5M2FNUZ,
  kInt8,
  kInt16,
  kInt32,
  kInt64,
  kUInt8,
  kUInt16,
  kUInt32,
  kUInt64,
  kBool,
  kNumDtypes
};

inline int64_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::kFloat64: case Dtype::kInt64: case Dtype::kUInt64: return 8;
    case Dtype::kFloat32: case Dtype::kInt32: case Dtype::kUInt32: return 4;
    case Dtype::kFloat16: case Dtype::kBFloat16: case Dtype::kInt16: case Dtype::kUInt16: return 2;
    default: return 1;
  }
}

// ------------------------------------------------------------------------------------ stats
//
// A tensor is cut into chunks of kStatsChunkBytes (a function of its size and dtype only, so
// results do not depend on the GPU or on which other tensors share the launch). One block
// reduces one chunk to a StatsPartial in a fixed order; a second kernel combines the partials
// of each tensor in chunk order and writes its record row. A tensor of one chunk gets its
// record written by the first kernel directly (small tensors: one launch).

constexpr int64_t kStatsChunkBytes = 32 * 1024;

inline int64_t stats_chunk_elems(Dtype d) { return kStatsChunkBytes / dtype_size(d); }

inline int64_t stats_num_chunks(int64_t numel, Dtype d) {
  const int64_t c = stats_chunk_elems(d);
  return (numel + c - 1) / c;
}

// One tensor of a multi-tensor launch (an array of these lives in device memory).
struct StatsTensorMeta {
  const void* data;     // first element of a dense span of `numel` elements
  int64_t numel;
  int64_t first_chunk;  // index of its first chunk in the partials workspace
  int64_t num_chunks;   // stats_num_chunks(numel, dtype)
  int64_t slot;         // row of the record buffer it writes
};

// Statistics of one chunk. Counts fit 32 bits: a chunk holds at most kStatsChunkBytes elements.
struct StatsPartial {
  uint32_t nan, posinf, neginf, zeros;
  double min, max, absmax, sum, sumsq;
};

// Where the kernels read the metadata: a device array, or (single tensor, no host-to-device
// copy) one entry passed by value in the launch arguments.
struct StatsMetaView {
  const StatsTensorMeta* device;  // nullptr: use `one`
  StatsTensorMeta one;
};

// Chunk partials of the tensors meta[0, num_tensors) that all have dtype `dtype`, whose chunks
// are [chunk_begin, chunk_end) of the workspace `partials` (sized for every chunk of the launch;
// may be null when every tensor has one chunk). Records of one-chunk tensors are written to
// `records` (float64 rows of kNumStatsFields). `sm_count` sizes the persistent grid.
cudaError_t launch_stats_partials(StatsMetaView meta, int64_t num_tensors, Dtype dtype,
                                  int64_t chunk_begin, int64_t chunk_end, StatsPartial* partials,
                                  double* records, int sm_count, cudaStream_t stream);

// Records of the tensors meta[0, num_tensors) that have zero or several chunks (one-chunk
// tensors were written by launch_stats_partials and are skipped).
cudaError_t launch_stats_finalize(StatsMetaView meta, int64_t num_tensors,
                                  const StatsPartial* partials, double* records,
                                  cudaStream_t stream);

// ----------------------------------------------------------------------------------- labels
//
// Range check of `n` contiguous integer labels (row-major order), one pass: a persistent grid
// writes one LabelPartial per block, then one block combines them (integer results: exact and
// order-independent) into `record` (int64 [kNumLabelFields]). With `clean` non-null, the same
// pass writes clean[i] = bad ? ignore_index : label (int64). Bad labels are counted, never
// asserted on: the CUDA context survives.

struct LabelPartial {
  int64_t bad, ignored, min, max;
  int64_t first_bad;  // INT64_MAX when none
};

// Number of LabelPartial entries the workspace needs for this launch (0 when n == 0).
int64_t label_workspace_entries(int64_t n, Dtype dtype, int sm_count);

cudaError_t launch_label_check(const void* labels, int64_t n, Dtype dtype, int64_t num_classes,
                               int64_t ignore_index, int64_t* clean, int64_t* record,
                               LabelPartial* workspace, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace healthmon
