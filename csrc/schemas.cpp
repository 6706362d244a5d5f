// Every healthmon operator schema, declared once. Backends register their kernels with
// TORCH_LIBRARY_IMPL in their own files (cpu/ops_cpu.cpp, cuda_glue.cpp); the fake (meta)
// kernels are registered in Python (healthmon/ops.py) so the ops trace under torch.compile.
#include <torch/extension.h>
#include <torch/library.h>

#include "record.h"

TORCH_LIBRARY(healthmon, m) {
  // Fused statistics of one tensor: float64 [kNumStatsFields] on x's device.
  m.def("stats(Tensor x) -> Tensor");
  // Same, written into row `slot` of a preallocated float64 [N, kNumStatsFields] buffer.
  m.def("stats_into(Tensor x, Tensor(a!) records, int slot) -> ()");
  // Statistics of many tensors in one pass: float64 [len(xs), kNumStatsFields].
  m.def("multi_stats(Tensor[] xs) -> Tensor");
  // Same, row i written into records[slots[i]].
  m.def("multi_stats_into(Tensor[] xs, Tensor(a!) records, int[] slots) -> ()");
  // Range check of integer labels: int64 [kNumLabelFields].
  m.def("label_check(Tensor target, int num_classes, int ignore_index) -> Tensor");
  // Range check plus an int64 copy of target with bad labels replaced by ignore_index.
  m.def("label_sanitize(Tensor target, int num_classes, int ignore_index) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "healthmon native ops (registered as torch.ops.healthmon.*)";
  pybind11::list stats_fields, label_fields;
  for (const char* name : healthmon::kStatsFieldNames) stats_fields.append(name);
  for (const char* name : healthmon::kLabelFieldNames) label_fields.append(name);
  m.attr("STATS_FIELDS") = pybind11::tuple(stats_fields);
  m.attr("LABEL_FIELDS") = pybind11::tuple(label_fields);
#ifdef HEALTHMON_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
}
