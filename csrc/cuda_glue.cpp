// CUDA backend of the healthmon ops: argument checks, device guard, current stream, workspace
// from the torch caching allocator, dtype dispatch. The kernels themselves (csrc/cuda/*.cu)
// include no torch headers; this is the only CUDA file that does.
//
// Nothing here synchronises with the device: no .item(), no blocking copies. Multi-tensor
// metadata goes host -> device through a pinned buffer with a non-blocking copy (the caching
// host allocator keeps the buffer alive until the copy has run).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "checks.h"
#include "cuda/kernels.cuh"
#include "record.h"

namespace healthmon {
namespace {

using cuda::Dtype;

Dtype kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return Dtype::kFloat64;
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kFloat8_e4m3fn: return Dtype::kFloat8E4M3FN;
    case at::kFloat8_e5m2: return Dtype::kFloat8E5M2;
    case at::kFloat8_e4m3fnuz: return Dtype::kFloat8E4M3FNUZ;
    case at::kFloat8_e5m2fnuz: return Dtype::kFloat8E5M2FNUZ;
    case at::kChar: return Dtype::kInt8;
    case at::kShort: return Dtype::kInt16;
    case at::kInt: return Dtype::kInt32;
    case at::kLong: return Dtype::kInt64;
    case at::kByte: return Dtype::kUInt8;
    case at::kUInt16: return Dtype::kUInt16;
    case at::kUInt32: return Dtype::kUInt32;
    case at::kUInt64: return Dtype::kUInt64;
    case at::kBool: return Dtype::kBool;
    default: TORCH_CHECK(false, "healthmon: the CUDA kernels do not support dtype ", t);
  }
}

// SMs of the current device: a host-side attribute lookup, no device work. (Not through
// ATen/cuda/CUDAContext.h, which drags in cuBLAS / cuSPARSE headers for nothing.)
int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

at::Tensor byte_buffer(int64_t bytes, const at::Device& device) {
  return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
}

void check_on_device(const at::Tensor& x, const at::Device& device, const char* op) {
  TORCH_CHECK(x.device() == device, "healthmon.", op, ": a tensor is on ", x.device(),
              " but the op runs on ", device, "; move every tensor (and the record buffer) to one "
              "CUDA device");
}

// Stats of xs[i] into row slots[i] of `records` (float64 [N, kNumStatsFields] on `device`).
// Tensors are grouped by dtype (one partials launch per dtype present), then one finalize
// launch writes the rows of every tensor of more than one chunk.
void stats_many_cuda(at::TensorList xs, double* records, at::IntArrayRef slots,
                     const at::Device& device) {
  const int64_t n = static_cast<int64_t>(xs.size());
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Dense spans (permuted dense layouts are read in storage order, no copy); kept alive here
  // until the launches are queued; the caching allocator orders their reuse on this stream.
  std::vector<at::Tensor> spans;
  spans.reserve(xs.size());
  for (const auto& x : xs) spans.push_back(as_flat_span(x));

  std::vector<Dtype> dtypes(xs.size());
  for (int64_t i = 0; i < n; ++i) dtypes[i] = kernel_dtype(spans[i].scalar_type());
  std::vector<int64_t> order(xs.size());
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return dtypes[a] < dtypes[b]; });

  std::vector<cuda::StatsTensorMeta> meta(xs.size());
  int64_t total_chunks = 0;
  bool needs_finalize = false;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = order[k];
    const int64_t numel = spans[i].numel();
    const int64_t chunks = cuda::stats_num_chunks(numel, dtypes[i]);
    meta[k] = cuda::StatsTensorMeta{spans[i].const_data_ptr(), numel, total_chunks, chunks,
                                    slots[i]};
    total_chunks += chunks;
    needs_finalize = needs_finalize || chunks != 1;
  }

  cuda::StatsMetaView view{nullptr, meta[0]};
  at::Tensor meta_host, meta_dev;
  if (n > 1) {
    const int64_t bytes = n * static_cast<int64_t>(sizeof(cuda::StatsTensorMeta));
    meta_host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(meta_host.data_ptr(), meta.data(), static_cast<size_t>(bytes));
    meta_dev = byte_buffer(bytes, device);
    meta_dev.copy_(meta_host, /*non_blocking=*/true);
    view.device = static_cast<const cuda::StatsTensorMeta*>(meta_dev.const_data_ptr());
  }

  at::Tensor workspace;
  cuda::StatsPartial* partials = nullptr;
  if (needs_finalize && total_chunks > 0) {
    workspace = byte_buffer(total_chunks * static_cast<int64_t>(sizeof(cuda::StatsPartial)), device);
    partials = static_cast<cuda::StatsPartial*>(workspace.data_ptr());
  }

  const int sms = sm_count();
  for (int64_t begin = 0; begin < n;) {
    int64_t end = begin + 1;
    while (end < n && dtypes[order[end]] == dtypes[order[begin]]) ++end;
    const int64_t chunk_begin = meta[begin].first_chunk;
    const int64_t chunk_end = meta[end - 1].first_chunk + meta[end - 1].num_chunks;
    cuda::StatsMetaView group = view;
    if (group.device != nullptr) group.device += begin;
    C10_CUDA_CHECK(cuda::launch_stats_partials(group, end - begin, dtypes[order[begin]],
                                               chunk_begin, chunk_end, partials, records, sms,
                                               stream));
    begin = end;
  }
  if (needs_finalize) {
    C10_CUDA_CHECK(cuda::launch_stats_finalize(view, n, partials, records, stream));
  }
}

at::Tensor stats_cuda(const at::Tensor& x) {
  check_stats_input(x, "stats");
  TORCH_CHECK(x.is_cuda(), "healthmon.stats: expected a CUDA tensor, got ", x.device());
  at::Tensor out = at::empty({1, kNumStatsFields}, x.options().dtype(at::kDouble));
  const int64_t slot = 0;
  stats_many_cuda({x}, out.data_ptr<double>(), {slot}, x.device());
  return out.view({kNumStatsFields});
}

void stats_into_cuda(const at::Tensor& x, at::Tensor& records, int64_t slot) {
  check_stats_input(x, "stats_into");
  TORCH_CHECK(x.is_cuda(), "healthmon.stats_into: expected a CUDA tensor, got ", x.device());
  check_records(records, x.device(), {slot}, "stats_into");
  stats_many_cuda({x}, records.data_ptr<double>(), {slot}, x.device());
}

at::Tensor multi_stats_cuda(at::TensorList xs) {
  for (const auto& x : xs) check_stats_input(x, "multi_stats");
  TORCH_CHECK(!xs.empty() && xs[0].is_cuda(), "healthmon.multi_stats: expected CUDA tensors");
  const at::Device device = xs[0].device();
  for (const auto& x : xs) check_on_device(x, device, "multi_stats");
  const int64_t n = static_cast<int64_t>(xs.size());
  at::Tensor out = at::empty({n, kNumStatsFields},
                             at::TensorOptions().dtype(at::kDouble).device(device));
  std::vector<int64_t> slots(xs.size());
  std::iota(slots.begin(), slots.end(), int64_t(0));
  stats_many_cuda(xs, out.data_ptr<double>(), slots, device);
  return out;
}

void multi_stats_into_cuda(at::TensorList xs, at::Tensor& records, at::IntArrayRef slots) {
  TORCH_CHECK(xs.size() == slots.size(), "healthmon.multi_stats_into: ", xs.size(),
              " tensors but ", slots.size(), " slots");
  for (const auto& x : xs) check_stats_input(x, "multi_stats_into");
  TORCH_CHECK(records.is_cuda(), "healthmon.multi_stats_into: records must be on a CUDA device, "
              "got ", records.device());
  check_records(records, records.device(), slots, "multi_stats_into");
  for (const auto& x : xs) check_on_device(x, records.device(), "multi_stats_into");
  stats_many_cuda(xs, records.data_ptr<double>(), slots, records.device());
}

// Labels need row-major order (first_bad), so a non-contiguous target is made contiguous.
std::tuple<at::Tensor, at::Tensor> label_run(const at::Tensor& target, int64_t num_classes,
                                             int64_t ignore_index, bool sanitize, const char* op) {
  check_label_input(target, num_classes, op);
  TORCH_CHECK(target.is_cuda(), "healthmon.", op, ": expected a CUDA tensor, got ",
              target.device());
  const c10::cuda::CUDAGuard guard(target.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor t = target.contiguous();
  const int64_t n = t.numel();
  const Dtype dtype = kernel_dtype(t.scalar_type());
  at::Tensor record = at::empty({kNumLabelFields}, t.options().dtype(at::kLong));
  at::Tensor clean;
  if (sanitize) clean = at::empty(target.sizes(), t.options().dtype(at::kLong));
  const int sms = sm_count();
  const int64_t entries = cuda::label_workspace_entries(n, dtype, sms);
  at::Tensor workspace;
  if (entries > 0) {
    workspace = byte_buffer(entries * static_cast<int64_t>(sizeof(cuda::LabelPartial)),
                            target.device());
  }
  C10_CUDA_CHECK(cuda::launch_label_check(
      t.const_data_ptr(), n, dtype, num_classes, ignore_index,
      sanitize ? clean.data_ptr<int64_t>() : nullptr, record.data_ptr<int64_t>(),
      entries > 0 ? static_cast<cuda::LabelPartial*>(workspace.data_ptr()) : nullptr, sms,
      stream));
  return {record, clean};
}

at::Tensor label_check_cuda(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  return std::get<0>(label_run(target, num_classes, ignore_index, false, "label_check"));
}

std::tuple<at::Tensor, at::Tensor> label_sanitize_cuda(const at::Tensor& target,
                                                       int64_t num_classes, int64_t ignore_index) {
  return label_run(target, num_classes, ignore_index, true, "label_sanitize");
}

}  // namespace

TORCH_LIBRARY_IMPL(healthmon, CUDA, m) {
  m.impl("stats", &stats_cuda);
  m.impl("stats_into", &stats_into_cuda);
  m.impl("multi_stats", &multi_stats_cuda);
  m.impl("multi_stats_into", &multi_stats_into_cuda);
  m.impl("label_check", &label_check_cuda);
  m.impl("label_sanitize", &label_sanitize_cuda);
}

}  // namespace healthmon
