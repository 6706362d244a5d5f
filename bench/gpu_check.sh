#!/usr/bin/env bash
# GPU validation of healthmon on a machine with a CUDA GPU, CUDA torch and nvcc:
#   1. builds the extension with its CUDA kernels (in place),
#   2. runs the CUDA tests (tests/test_cuda_*.py),
#   3. runs the kernel benchmark (bench/kernel_bench.py --device cuda),
#   4. runs the GPU overhead table (bench/overhead.py --device cuda: GPT-2-small-sized and
#      ResNet-50-sized models in bf16 autocast; includes the set_sync_debug_mode check and
#      the NaN / Inf detection matrix),
#   5. prints a short summary (targets PASS / MISS, which steps failed).
#
# Usage (from anywhere):  bash bench/gpu_check.sh
# Environment:
#   PYTHON         interpreter with CUDA torch (default: .venv/bin/python if present, else python3)
#   RESULTS        where the JSON / logs go (default: $OUT if set, else bench/results)
#   INSTALL=pip    build with `pip install --no-build-isolation --no-deps -e .` instead of
#                  `python setup.py build_ext --inplace`
#   KERNEL_ARGS    extra arguments of kernel_bench.py   (e.g. "--max-size 64Mi --rounds 5")
#   OVERHEAD_ARGS  extra arguments of overhead.py  (e.g. "--models gpt2 --rounds 5")
#   SKIP_BUILD=1   use the extension already built
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS=${RESULTS:-${OUT:-$ROOT/bench/results}}
mkdir -p "$RESULTS"
declare -A STATUS
say() { printf '\n=== %s ===\n' "$*"; }

say "environment"
$PYTHON - <<'EOF' || { echo "torch is not importable with $PYTHON"; exit 2; }
import torch, shutil
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
print("nvcc", shutil.which("nvcc"))
EOF
$PYTHON -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 1)" \
  || { echo "gpu_check.sh needs CUDA torch and a visible GPU"; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null \
  | tee "$RESULTS/nvidia_smi.txt"

if [ "${SKIP_BUILD:-0}" != "1" ]; then
  say "build (CUDA extension)"
  rm -f healthmon/_C*.so            # a CPU-only build carried from elsewhere must not be reused
  if [ "${INSTALL:-}" = "pip" ]; then
    $PYTHON -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 30 | tee "$RESULTS/build.log"
  else
    $PYTHON setup.py build_ext --inplace 2>&1 | tail -n 30 | tee "$RESULTS/build.log"
  fi
fi
if $PYTHON -c "import sys; from healthmon import ops; sys.exit(0 if ops.extension_cuda_available() else 1)" 2>/dev/null; then
  STATUS[build]=ok
else
  STATUS[build]="FAILED (healthmon._C has no CUDA kernels; see $RESULTS/build.log)"
fi
echo "build: ${STATUS[build]}"

say "CUDA tests"
if ls tests/test_cuda_*.py >/dev/null 2>&1; then
  $PYTHON -m pytest -q -rs tests/test_cuda_*.py 2>&1 | tee "$RESULTS/pytest_cuda.log" | tail -n 25
  rc=${PIPESTATUS[0]}
  STATUS[tests]=$([ "$rc" = 0 ] && echo ok || echo "FAILED (rc $rc, $RESULTS/pytest_cuda.log)")
  grep -Eq "skipped" "$RESULTS/pytest_cuda.log" && STATUS[tests]="${STATUS[tests]} (some skipped: see log)"
else
  STATUS[tests]="none found (tests/test_cuda_*.py)"
fi

say "kernel benchmark"
$PYTHON bench/kernel_bench.py --device cuda --json "$RESULTS/kernels_cuda.json" ${KERNEL_ARGS:-} \
  2>&1 | tee "$RESULTS/kernels_cuda.txt"
rc=${PIPESTATUS[0]}
STATUS[kernels]=$([ "$rc" = 0 ] && echo ok || echo "FAILED (rc $rc)")

say "overhead benchmark"
$PYTHON bench/overhead.py --device cuda --json "$RESULTS/overhead_cuda.json" ${OVERHEAD_ARGS:-} \
  2>&1 | tee "$RESULTS/overhead_cuda.txt"
rc=${PIPESTATUS[0]}
STATUS[overhead]=$([ "$rc" = 0 ] && echo ok || echo "FAILED (rc $rc)")

say "summary"
for k in build tests kernels overhead; do printf '%-9s %s\n' "$k:" "${STATUS[$k]}"; done
$PYTHON - "$RESULTS" <<'EOF'
import json, os, sys
res = sys.argv[1]
for name in ("kernels_cuda.json", "overhead_cuda.json"):
    path = os.path.join(res, name)
    if not os.path.exists(path):
        print(f"{name}: missing")
        continue
    d = json.load(open(path))
    m = d["machine"]
    print(f"\n{name}: {m.get('gpu')} | torch {m['torch']} (CUDA {m['torch_cuda']}) | "
          f"{d['ops_path']['path']}")
    for t in d["targets"]:
        print(f"  [{t['status']:>7}] {t['target']}: wanted {t['wanted']}, measured {t['measured']}")
    for r in d.get("models", []):
        sc = r.get("sync_check")
        if sc:
            print(f"  sync check ({r['model']}): {sc['verdict']}: {sc.get('async')}")
print(f"\nresults in {res}")
EOF
