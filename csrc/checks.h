// Argument checks shared by the CPU and CUDA glue: every message names the problem and the
// fix, and no kernel is launched on a buffer it could write out of bounds.
#pragma once
#include <torch/extension.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "record.h"

namespace healthmon {

inline bool is_float8(at::ScalarType t) {
  return t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2 || t == at::kFloat8_e4m3fnuz ||
         t == at::kFloat8_e5m2fnuz;
}

inline bool is_label_dtype(at::ScalarType t) {
  switch (t) {
    case at::kByte: case at::kChar: case at::kShort: case at::kInt: case at::kLong:
    case at::kBool: case at::kUInt16: case at::kUInt32: case at::kUInt64:
      return true;
    default:
      return false;
  }
}

inline bool is_stats_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
         is_float8(t) || is_label_dtype(t);
}

inline void check_stats_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.layout() == at::kStrided, "healthmon.", op, ": only dense (strided) tensors are "
              "supported, got layout ", x.layout());
  TORCH_CHECK(!x.is_quantized(), "healthmon.", op, ": quantized tensors are not supported; "
              "dequantize first");
  TORCH_CHECK(is_stats_dtype(x.scalar_type()), "healthmon.", op, ": dtype ", x.scalar_type(),
              " is not supported (floating: float64/32/16, bfloat16, float8; integer types; bool)");
}

inline void check_label_input(const at::Tensor& t, int64_t num_classes, const char* op) {
  TORCH_CHECK(t.layout() == at::kStrided, "healthmon.", op, ": only dense (strided) targets are "
              "supported, got layout ", t.layout());
  TORCH_CHECK(is_label_dtype(t.scalar_type()), "healthmon.", op, ": labels must have an integer "
              "or bool dtype, got ", t.scalar_type(), " (class-probability targets are not labels)");
  TORCH_CHECK(num_classes >= 1, "healthmon.", op, ": num_classes must be >= 1, got ", num_classes);
}

// The record buffer must be float64 [N, kNumStatsFields], contiguous, on `device`; every slot
// must be a row of it, and no row may be given twice in one call (two tensors racing for one
// record would leave either, or on CUDA a mix of both).
inline void check_records(const at::Tensor& records, const c10::Device& device,
                          at::IntArrayRef slots, const char* op) {
  TORCH_CHECK(records.scalar_type() == at::kDouble && records.dim() == 2 &&
                  records.size(1) == kNumStatsFields,
              "healthmon.", op, ": records must be a float64 tensor of shape (N, ", kNumStatsFields,
              "), got ", records.scalar_type(), " ", records.sizes());
  TORCH_CHECK(records.is_contiguous(), "healthmon.", op, ": records must be contiguous");
  TORCH_CHECK(records.device() == device, "healthmon.", op, ": records are on ", records.device(),
              " but the tensor is on ", device, "; allocate the buffer on the tensor's device");
  for (int64_t slot : slots) {
    TORCH_CHECK(slot >= 0 && slot < records.size(0), "healthmon.", op, ": slot ", slot,
                " is outside the record buffer of ", records.size(0), " rows");
  }
  if (slots.size() > 1) {
    std::vector<std::pair<int64_t, int64_t>> order(slots.size());  // (slot, tensor index)
    for (size_t i = 0; i < slots.size(); ++i) order[i] = {slots[i], int64_t(i)};
    std::sort(order.begin(), order.end());
    for (size_t i = 1; i < order.size(); ++i) {
      TORCH_CHECK(order[i].first != order[i - 1].first, "healthmon.", op, ": slot ",
                  order[i].first, " is given more than once (tensors ", order[i - 1].second,
                  " and ", order[i].second, "); every tensor needs its own record row");
    }
  }
}

// A tensor whose elements can be read as one flat span of storage, in some order: the stats
// do not depend on order, so dense permuted layouts (transposed, channels_last) need no copy.
inline at::Tensor as_flat_span(const at::Tensor& x) {
  if (x.is_contiguous() || x.is_non_overlapping_and_dense()) return x;
  return x.contiguous();  // sliced / expanded / overlapping: one copy, then a flat span
}

}  // namespace healthmon
