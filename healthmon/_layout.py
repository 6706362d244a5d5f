"""Field order of the records the native ops write (mirrors csrc/record.h).

A stats record is a float64 row of ``len(STATS_FIELDS)`` values; a label record is an
int64 row of ``len(LABEL_FIELDS)`` values. Counts are stored exactly (float64 holds
integers up to 2**53 exactly, far beyond any tensor's numel). ``tests/test_layout.py``
checks this file against the compiled extension so the two can never drift apart.
"""

STATS_FIELDS = (
    "numel",   # number of elements
    "nan",     # NaN count
    "posinf",  # +Inf count
    "neginf",  # -Inf count
    "zeros",   # exact zeros (+0 and -0)
    "finite",  # finite count = numel - nan - posinf - neginf
    "min",     # smallest finite value (NaN when there is none)
    "max",     # largest finite value (NaN when there is none)
    "sum",     # sum of finite values
    "sumsq",   # sum of squares of finite values
    "absmax",  # largest |finite value| (0 when there is none)
)
NUM_STATS = len(STATS_FIELDS)
STAT = {name: i for i, name in enumerate(STATS_FIELDS)}

LABEL_FIELDS = (
    "numel",      # number of labels
    "bad",        # labels outside [0, num_classes) that are not ignore_index
    "ignored",    # labels equal to ignore_index
    "min",        # smallest label (0 when empty; uint64 labels >= 2**63 saturate to 2**63 - 1)
    "max",        # largest label (0 when empty; saturated likewise)
    "first_bad",  # row-major linear index of the first bad label, -1 when none
)
NUM_LABEL = len(LABEL_FIELDS)
LABEL = {name: i for i, name in enumerate(LABEL_FIELDS)}
