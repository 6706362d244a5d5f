# Two commands for a new user on a fresh clone:  make demo  and  make test.
# Set-up (idempotent): a virtual environment that reuses an importable torch, or installs
# torch==2.13.0 (the version CI uses); test/report/trainer dependencies; the package installed
# editable (its extension built in place).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TRAINER_DEPS ?= "lightning>=2.4,<3" "transformers>=4.46,<6" "accelerate>=1.0"
STAMP  := $(VENV)/.healthmon-setup

.PHONY: setup build test demo bench bench-kernels bench-small bench-compiled gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q "setuptools>=77" wheel "pytest>=7" "hypothesis>=6" numpy ninja "matplotlib>=3.5" "tensorboard>=2.10"
# Trainer integrations (tests): the installed torch is pinned in the same command, so the
# resolver keeps it instead of pulling another (CUDA) build.
	$(PY) -m pip install -q "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')" $(TRAINER_DEPS)
# The package itself, editable: `$(PY) -m healthmon run train.py` works from any directory.
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: setup
	$(PY) setup.py -q build_ext --inplace

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m healthmon demo

# Benchmarks print ratio tables and write JSON under $(RESULTS) (gitignored).
RESULTS ?= bench/results

bench-kernels: build
	mkdir -p $(RESULTS)
	$(PY) bench/kernel_bench.py --json $(RESULTS)/kernels_cpu.json

bench: build
	mkdir -p $(RESULTS)
	$(PY) bench/overhead.py --json $(RESULTS)/overhead_cpu.json

bench-small: build
	mkdir -p $(RESULTS)
	$(PY) bench/small.py --profile deep --json $(RESULTS)/small_cpu.json

bench-compiled: build
	mkdir -p $(RESULTS)
	$(PY) bench/compiled.py --json $(RESULTS)/compiled_cpu.json

# On a machine with a CUDA GPU, CUDA torch and nvcc: CUDA build + CUDA tests + both benches
# (healthmon async / sync / off included) + targets; PYTHON=... to pick the interpreter.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build healthmon/_C*.so *.egg-info
