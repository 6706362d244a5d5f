// Record layouts shared by the CPU kernels, the CUDA kernels and the glue.
// Mirrored in healthmon/_layout.py (tests/test_layout.py keeps the two in step).
// Torch-free: included by the .cu files, which must compile with plain nvcc.
#pragma once

namespace healthmon {

// One stats record: kNumStatsFields float64 values in this order.
enum StatsField : int {
  kNumel = 0,
  kNan,
  kPosInf,
  kNegInf,
  kZeros,
  kFinite,
  kMin,     // finite min, NaN when no finite value
  kMax,     // finite max, NaN when no finite value
  kSum,     // finite sum
  kSumSq,   // finite sum of squares
  kAbsMax,  // finite abs-max, 0 when no finite value
  kNumStatsFields
};

// One label record: kNumLabelFields int64 values in this order.
enum LabelField : int {
  kLabelNumel = 0,
  kLabelBad,
  kLabelIgnored,
  kLabelMin,
  kLabelMax,
  kLabelFirstBad,  // row-major index of the first bad label, -1 when none
  kNumLabelFields
};

}  // namespace healthmon

namespace healthmon {

// Field names, in record order (exported to Python as _C.STATS_FIELDS / _C.LABEL_FIELDS).
static constexpr const char* kStatsFieldNames[kNumStatsFields] = {
    "numel", "nan", "posinf", "neginf", "zeros", "finite",
    "min", "max", "sum", "sumsq", "absmax"};
static constexpr const char* kLabelFieldNames[kNumLabelFields] = {
    "numel", "bad", "ignored", "min", "max", "first_bad"};

}  // namespace healthmon
