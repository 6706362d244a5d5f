"""Every CUDA source compiles with plain nvcc for sm_90, with no error and no warning.

The .cu files include no torch headers, so this runs on a machine without a GPU or a CUDA
build of torch (CI): it is how CUDA mistakes are caught there. Skips only when nvcc is missing.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "**" / "*.cu"), recursive=True))

# Any warning (host or device side, ptxas included) fails the build.
FLAGS = ["-c", "-arch=sm_90", "-std=c++17", "-O3", "-Werror", "all-warnings",
         "-Xcompiler", "-Wall,-Wextra", "-Xptxas", "-warn-spills"]


def find_nvcc() -> str | None:
    """nvcc from PATH, $CUDA_HOME/bin, $CUDA_PATH/bin or /usr/local/cuda*/bin (newest first)."""
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = [os.path.join(os.environ[v], "bin", "nvcc")
                  for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)")


def test_there_are_cuda_sources():
    assert SOURCES, "no csrc/**/*.cu found"


def test_every_cu_compiles_without_warnings(tmp_path):
    def compile_one(src: str):
        out = tmp_path / (Path(src).stem + ".o")
        proc = subprocess.run([NVCC, *FLAGS, src, "-o", str(out)], capture_output=True,
                              text=True, timeout=300)
        return src, proc.returncode, (proc.stdout + proc.stderr).strip()

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(compile_one, SOURCES))
    failures = [f"{os.path.relpath(src, ROOT)} (exit {rc}):\n{log}"
                for src, rc, log in results if rc != 0 or log]
    assert not failures, "nvcc errors or warnings:\n\n" + "\n\n".join(failures)
