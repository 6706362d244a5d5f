// CPU kernels of the label ops: range check of integer labels in one parallel pass, with an
// optional sanitised int64 copy. Never throws on bad labels: it counts them.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../record.h"

namespace healthmon {
namespace {

constexpr int64_t kLabelChunk = 1 << 16;

struct LabelPartial {
  int64_t bad = 0, ignored = 0;
  int64_t min = std::numeric_limits<int64_t>::max();
  int64_t max = std::numeric_limits<int64_t>::min();
  int64_t first_bad = -1;
};

// A torch bool byte: any non-zero value is True (1), as torch reads it.
struct BoolByte {
  uint8_t byte;
};

// Labels as int64. A uint64 label above INT64_MAX does not fit: it saturates to INT64_MAX (the
// min / max it reports) and `overflows` marks it, which makes it bad whatever ignore_index is.
// healthmon.reference.label_check_ref has the same semantics.
template <typename T>
inline int64_t widen(T v) {
  if constexpr (std::is_same_v<T, uint64_t>) {
    return v > uint64_t(std::numeric_limits<int64_t>::max()) ? std::numeric_limits<int64_t>::max()
                                                             : int64_t(v);
  } else if constexpr (std::is_same_v<T, BoolByte>) {
    return v.byte != 0;
  } else {
    return int64_t(v);
  }
}

template <typename T>
inline bool overflows(T v) {
  if constexpr (std::is_same_v<T, uint64_t>) {
    return v > uint64_t(std::numeric_limits<int64_t>::max());
  } else {
    return false;
  }
}

template <typename T>
void check_span(const T* x, int64_t begin, int64_t end, int64_t num_classes,
                int64_t ignore_index, int64_t* clean, LabelPartial& p) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t v = widen(x[i]);
    const bool over = overflows(x[i]);
    const bool ignored = !over && v == ignore_index;
    const bool bad = !ignored && (over || v < 0 || v >= num_classes);
    p.ignored += ignored;
    p.bad += bad;
    p.min = std::min(p.min, v);
    p.max = std::max(p.max, v);
    if (bad && p.first_bad < 0) p.first_bad = i;
    if (clean) clean[i] = bad ? ignore_index : v;
  }
}

template <typename T>
void check_all(const T* x, int64_t n, int64_t num_classes, int64_t ignore_index,
               int64_t* clean, int64_t* record) {
  const int64_t chunks = (n + kLabelChunk - 1) / kLabelChunk;
  std::vector<LabelPartial> partials(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      check_span(x, c * kLabelChunk, std::min(n, (c + 1) * kLabelChunk), num_classes,
                 ignore_index, clean, partials[c]);
    }
  });
  LabelPartial total;
  for (const auto& p : partials) {  // in order: the first bad of the first chunk that has one
    total.bad += p.bad;
    total.ignored += p.ignored;
    total.min = std::min(total.min, p.min);
    total.max = std::max(total.max, p.max);
    if (total.first_bad < 0) total.first_bad = p.first_bad;
  }
  record[kLabelNumel] = n;
  record[kLabelBad] = total.bad;
  record[kLabelIgnored] = total.ignored;
  record[kLabelMin] = n ? total.min : 0;
  record[kLabelMax] = n ? total.max : 0;
  record[kLabelFirstBad] = total.first_bad;
}

// Row-major order matters for first_bad, so non-contiguous targets are made contiguous.
void label_run(const at::Tensor& target, int64_t num_classes, int64_t ignore_index,
               int64_t* clean, int64_t* record) {
  const at::Tensor t = target.contiguous();
  const int64_t n = t.numel();
  const void* data = t.const_data_ptr();
  switch (t.scalar_type()) {
#define HM_LABEL_CASE(scalar, ctype)                                                       \
  case at::scalar:                                                                          \
    return check_all(static_cast<const ctype*>(data), n, num_classes, ignore_index, clean, \
                     record);
    HM_LABEL_CASE(kBool, BoolByte)
    HM_LABEL_CASE(kByte, uint8_t)
    HM_LABEL_CASE(kChar, int8_t)
    HM_LABEL_CASE(kShort, int16_t)
    HM_LABEL_CASE(kInt, int32_t)
    HM_LABEL_CASE(kLong, int64_t)
    HM_LABEL_CASE(kUInt16, uint16_t)
    HM_LABEL_CASE(kUInt32, uint32_t)
    HM_LABEL_CASE(kUInt64, uint64_t)
#undef HM_LABEL_CASE
    default: TORCH_CHECK(false, "healthmon: unsupported label dtype ", t.scalar_type());
  }
}

at::Tensor label_check_cpu(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  check_label_input(target, num_classes, "label_check");
  at::Tensor record = at::empty({kNumLabelFields}, target.options().dtype(at::kLong));
  label_run(target, num_classes, ignore_index, nullptr, record.data_ptr<int64_t>());
  return record;
}

std::tuple<at::Tensor, at::Tensor> label_sanitize_cpu(const at::Tensor& target,
                                                      int64_t num_classes, int64_t ignore_index) {
  check_label_input(target, num_classes, "label_sanitize");
  at::Tensor record = at::empty({kNumLabelFields}, target.options().dtype(at::kLong));
  at::Tensor clean = at::empty(target.sizes(), target.options().dtype(at::kLong));
  label_run(target, num_classes, ignore_index, clean.data_ptr<int64_t>(),
            record.data_ptr<int64_t>());
  return {record, clean};
}

}  // namespace

TORCH_LIBRARY_IMPL(healthmon, CPU, m) {
  m.impl("label_check", &label_check_cpu);
  m.impl("label_sanitize", &label_sanitize_cpu);
}

}  // namespace healthmon
