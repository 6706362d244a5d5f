"""Builds healthmon._C: the CPU kernels always, the CUDA kernels when the installed torch has
CUDA and a CUDA toolkit is found (never by probing for a GPU).

torch must already be installed (``pip install --no-build-isolation -e .``, like flash-attn
and torchao); ``HEALTHMON_CPU_ONLY=1`` skips the CUDA part.
"""
import glob
import os

import setuptools
from setuptools import find_packages, setup

# pyproject's SPDX `license = "BSD-3-Clause"` needs setuptools >= 77; older ones (a fresh
# Python 3.11 venv has 65) fail with an unreadable schema error. With --no-build-isolation
# pip does not install [build-system] requires, so say it here.
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(f"healthmon: building needs setuptools>=77 (found {setuptools.__version__}): "
                     "pip install -U 'setuptools>=77' wheel, then rerun "
                     "pip install --no-build-isolation .")

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - build-time message
    raise SystemExit("healthmon: torch must be installed before building the extension; "
                     "install it, then: pip install --no-build-isolation -e .") from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _with_cuda() -> bool:
    if os.environ.get("HEALTHMON_CPU_ONLY", "") not in ("", "0"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cpu_sources = ["csrc/schemas.cpp", "csrc/fast_path.cpp", "csrc/param_hooks.cpp",
                   "csrc/rules.cpp", "csrc/param_plan.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=HERE))
    # -fopenmp: at::parallel_for is an inline OpenMP region; without it the CPU kernels run
    # on one thread. libgomp.so.1 is the runtime torch itself loads (same soname).
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if not _with_cuda():
        return CppExtension("healthmon._C", cpu_sources,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    cuda_sources = ["csrc/cuda_glue.cpp"] + sorted(glob.glob("csrc/cuda/*.cu", root_dir=HERE))
    return CUDAExtension(
        "healthmon._C", cpu_sources + cuda_sources,
        define_macros=[("HEALTHMON_WITH_CUDA", "1")], extra_link_args=link_flags,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-std=c++17"]})


setup(
    name="healthmon",
    packages=find_packages(include=["healthmon", "healthmon.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
