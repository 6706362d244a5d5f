// Every healthmon operator schema, declared once. Backends register their kernels with
// TORCH_LIBRARY_IMPL in their own files (cpu/ops_cpu.cpp, cuda_glue.cpp); the fake (meta)
// kernels are registered in Python (healthmon/ops.py) so the ops trace under torch.compile.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

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
  // Same as stats_into, into row `slot` of the buffer registered under key `buffer`
  // (set_record_buffer). Compiled graphs call this one: the buffer is not an argument, so a
  // graph neither saves it for backward nor treats it as a mutated input (several compiled
  // forwards feeding one backward would otherwise trip autograd's version check).
  // Statistics do not depend on element order: Inductor may hand over x in whatever layout
  // it produced (channels-last, a permuted view) instead of copying it to eager's strides.
  m.def("record_to(Tensor x, int buffer, int slot) -> ()", {at::Tag::flexible_layout});
  // record_to of xs[i] into buffers[i] row slots[i], for every i, in one call: what
  // healthmon's Inductor pass (healthmon/compile_pass.py) merges a graph's small records into.
  m.def("multi_record_to(Tensor[] xs, int[] buffers, int[] slots) -> ()",
        {at::Tag::flexible_layout});
  // Range check of integer labels: int64 [kNumLabelFields].
  m.def("label_check(Tensor target, int num_classes, int ignore_index) -> Tensor");
  // Range check plus an int64 copy of target with bad labels replaced by ignore_index.
  m.def("label_sanitize(Tensor target, int num_classes, int ignore_index) -> (Tensor, Tensor)");
}

namespace {

// Record buffers by key, for record_to. Heap-allocated and never destroyed: no tensor
// destructor runs at interpreter exit (after the CUDA context may be gone).
std::mutex& registry_mutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}
// A registered buffer and whether records into it are wanted this step (the monitor's
// cadence: `every=N` switches it per step, so a compiled graph never changes). `step`
// counts the monitor's steps (begin_record_step) and `written[slot]` is the step that last
// wrote a row: a second write of a row in one step (a compiled graph run several times
// per step: a policy, gradient accumulation) merges into it instead of overwriting.
struct Registered {
  at::Tensor records;
  bool active = true;
  uint64_t step = 1;
  std::vector<uint64_t> written;
};
std::vector<Registered>& registry() {
  static auto* buffers = new std::vector<Registered>();
  return *buffers;
}

void set_record_buffer(int64_t key, at::Tensor records) {
  TORCH_CHECK(key >= 0, "healthmon: record buffer key must be >= 0, got ", key);
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& buffers = registry();
  if (static_cast<size_t>(key) >= buffers.size()) buffers.resize(key + 1);
  buffers[key].records = std::move(records);
}

void set_record_active(int64_t key, bool active) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& buffers = registry();
  if (key >= 0 && static_cast<size_t>(key) < buffers.size()) buffers[key].active = active;
}

void begin_record_step(int64_t key) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& buffers = registry();
  if (key >= 0 && static_cast<size_t>(key) < buffers.size()) ++buffers[key].step;
}

void clear_record_buffer(int64_t key) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& buffers = registry();
  if (key >= 0 && static_cast<size_t>(key) < buffers.size()) buffers[key] = Registered();
}

at::Tensor registered_buffer(int64_t key) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& buffers = registry();
  TORCH_CHECK(key >= 0 && static_cast<size_t>(key) < buffers.size() &&
                  buffers[key].records.defined(),
              "healthmon::record_to: no record buffer under key ", key,
              " (never set, or its monitor was removed)");
  return buffers[key].records;
}

// Graphs traced while a monitor watched keep calling this after monitor.remove() (until
// Dynamo recompiles): their records have nowhere to go and are dropped, the model runs on.
// A step the cadence skips is skipped here too (a host flag: a CUDA graph replays what it
// captured, and the decode applies the cadence then).
//
// The first write of a row in a step overwrites it; a later one (the same graph run again
// in the step) merges: counts, sums and sums of squares add, min / max / abs-max combine,
// so the row describes every run and a NaN in any of them stays visible. The decision is
// taken on the host (no device read); a CUDA graph replays whichever kind it captured.
void merge_row(at::Tensor& records, int64_t slot, const at::Tensor& fresh) {
  using namespace healthmon;
  at::Tensor row = records.narrow(0, slot, 1);
  if (records.device().is_cpu()) {
    double* dst = row.data_ptr<double>();
    const double* src = fresh.data_ptr<double>();
    for (int f : {kNumel, kNan, kPosInf, kNegInf, kZeros, kFinite, kSum, kSumSq})
      dst[f] += src[f];
    dst[kMin] = std::fmin(dst[kMin], src[kMin]);  // NaN (no finite value) loses
    dst[kMax] = std::fmax(dst[kMax], src[kMax]);
    dst[kAbsMax] = std::max(dst[kAbsMax], src[kAbsMax]);
    return;
  }
  // accelerators: a few small device ops, no host read (this path is the rare one)
  at::Tensor column = at::arange(kNumStatsFields, row.options().dtype(at::kLong));
  row.copy_(at::where(column == kMin, at::fmin(row, fresh),
                      at::where((column == kMax) | (column == kAbsMax), at::fmax(row, fresh),
                                row + fresh)));
}

void record_to(const at::Tensor& x, int64_t buffer, int64_t slot) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("healthmon::stats_into", "")
                       .typed<void(const at::Tensor&, at::Tensor&, int64_t)>();
  at::Tensor records;
  bool merge = false;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto& buffers = registry();
    if (buffer >= 0 && static_cast<size_t>(buffer) < buffers.size() && buffers[buffer].active) {
      Registered& reg = buffers[buffer];
      records = reg.records;
      if (slot >= 0) {
        if (static_cast<size_t>(slot) >= reg.written.size()) reg.written.resize(slot + 1, 0);
        merge = reg.written[slot] == reg.step;
        reg.written[slot] = reg.step;
      }
    }
  }
  if (!records.defined()) return;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (!merge) {
    op.call(x, records, slot);
    return;
  }
  TORCH_CHECK(slot < records.size(0), "healthmon::record_to: slot ", slot,
              " out of range for a buffer of ", records.size(0), " rows");
  at::Tensor fresh = at::empty({1, healthmon::kNumStatsFields}, records.options());
  op.call(x, fresh, 0);
  merge_row(records, slot, fresh);
}

void multi_record_to(at::TensorList xs, at::IntArrayRef buffers, at::IntArrayRef slots) {
  TORCH_CHECK(buffers.size() == xs.size() && slots.size() == xs.size(),
              "healthmon::multi_record_to: ", xs.size(), " tensors need as many buffers and "
              "slots, got ", buffers.size(), " and ", slots.size());
  for (size_t i = 0; i < xs.size(); ++i) record_to(xs[i], buffers[i], slots[i]);
}

// The monitor's hot path: one Python -> C++ call per recorded tensor. It calls the
// registered kernel through the C++ dispatcher (whatever the device) below the autograd
// keys, so a tensor that requires grad needs no Python-side detach() and no autograd
// bookkeeping; the kernels keep their own argument checks. Traced code (torch.compile)
// uses torch.ops.healthmon.stats_into instead, which Dynamo can see.
void record(const at::Tensor& x, at::Tensor records, int64_t slot) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("healthmon::stats_into", "")
                       .typed<void(const at::Tensor&, at::Tensor&, int64_t)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(x, records, slot);
}

void multi_record(std::vector<at::Tensor> xs, at::Tensor records, std::vector<int64_t> slots) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("healthmon::multi_stats_into", "")
                       .typed<void(at::TensorList, at::Tensor&, at::IntArrayRef)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.call(xs, records, slots);
}

// Rows of a host record table (CPU float64 [n, kNumStatsFields], contiguous) whose NaN,
// +Inf or -Inf count is nonzero: the decoder's scan of a healthy step, in one call.
std::vector<int64_t> flagged_rows(const at::Tensor& table) {
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kDouble &&
                  table.dim() == 2 && table.size(1) == healthmon::kNumStatsFields &&
                  table.is_contiguous(),
              "healthmon: flagged_rows expects a contiguous CPU float64 tensor [rows, ",
              healthmon::kNumStatsFields, "], got ", table.toString(), " of shape ",
              table.sizes());
  std::vector<int64_t> out;
  const double* r = table.data_ptr<double>();
  for (int64_t i = 0; i < table.size(0); ++i, r += healthmon::kNumStatsFields) {
    if (r[healthmon::kNan] != 0 || r[healthmon::kPosInf] != 0 || r[healthmon::kNegInf] != 0)
      out.push_back(i);
  }
  return out;
}

}  // namespace

namespace healthmon {
void register_fast_path(pybind11::module& m);  // fast_path.cpp
void register_param_hooks(pybind11::module& m);  // param_hooks.cpp
void register_rules(pybind11::module& m);  // rules.cpp
void register_param_plan(pybind11::module& m);  // param_plan.cpp
}

TORCH_LIBRARY_IMPL(healthmon, CompositeExplicitAutograd, m) {
  m.impl("record_to", &record_to);
  m.impl("multi_record_to", &multi_record_to);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "healthmon native ops (registered as torch.ops.healthmon.*)";
  pybind11::list stats_fields, label_fields;
  for (const char* name : healthmon::kStatsFieldNames) stats_fields.append(name);
  for (const char* name : healthmon::kLabelFieldNames) label_fields.append(name);
  m.attr("STATS_FIELDS") = pybind11::tuple(stats_fields);
  m.def("record", &record, "stats of x into records[slot] (the monitor's hot path)",
        pybind11::arg("x"), pybind11::arg("records"), pybind11::arg("slot"));
  m.def("multi_record", &multi_record, "stats of xs[i] into records[slots[i]]",
        pybind11::arg("xs"), pybind11::arg("records"), pybind11::arg("slots"));
  m.def("flagged_rows", &flagged_rows,
        "rows of a host record table with a nonzero NaN / +Inf / -Inf count",
        pybind11::arg("table"));
  m.def("set_record_buffer", &set_record_buffer,
        "register records (float64 [N, fields]) under key for healthmon::record_to",
        pybind11::arg("key"), pybind11::arg("records"));
  m.def("set_record_active", &set_record_active,
        "whether record_to writes the buffer under key (the step's cadence)",
        pybind11::arg("key"), pybind11::arg("active"));
  m.def("clear_record_buffer", &clear_record_buffer, "drop the buffer under key",
        pybind11::arg("key"));
  m.def("begin_record_step", &begin_record_step,
        "a new step for the buffer under key: record_to's next write of a row overwrites it",
        pybind11::arg("key"));
  m.def("registered_buffer", &registered_buffer, "the buffer under key (tests)",
        pybind11::arg("key"));
  m.attr("LABEL_FIELDS") = pybind11::tuple(label_fields);
  healthmon::register_fast_path(m);
  healthmon::register_param_hooks(m);
  healthmon::register_rules(m);
  healthmon::register_param_plan(m);
#ifdef HEALTHMON_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
}
