"""healthmon: an always-on tensor health monitor for PyTorch.

Interactive entry points: :func:`stats` (fused statistics of one tensor) and
:func:`extension_available`. The monitor (:func:`watch`) builds on them.
"""
from .ops import extension_available
from .stats import TensorStats, stats

__all__ = ["TensorStats", "stats", "extension_available"]
__version__ = "0.1.0"

from .errors import Anomaly, HealthError, HealthWarning  # noqa: E402
from .rules import WarnConfig  # noqa: E402
from .monitor import Monitor, watch  # noqa: E402
from .distributed import DistributedHealthError, RankMismatchError  # noqa: E402

__all__ += ["watch", "Monitor", "HealthError", "Anomaly", "DistributedHealthError",
            "RankMismatchError", "HealthWarning", "WarnConfig"]
from .labels import LabelStats, check_dataset_labels, check_labels  # noqa: E402

__all__ += ["check_labels", "check_dataset_labels", "LabelStats"]
from .runner import watch_all  # noqa: E402

__all__ += ["watch_all"]
