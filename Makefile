# Raptor: `make demo` and `make test` build their own virtualenv (.venv) first.
# Users on another CUDA version override TORCH, e.g.
#   make test TORCH="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu121"
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slurm lint bench bench-gpu clean

setup: $(STAMP)

# Rebuilt whenever pyproject.toml changes (the stamp is older than it).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/raptor pipeline configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# A one-node SLURM cluster on this machine (root; apt-installs SLURM when missing), fit.sbatch
# requeued mid-run against an untouched run, then a 2-cell `raptor study --slurm` array.
# Not part of `test`.
test-slurm: $(STAMP)
	$(BIN)/python tests/slurm_requeue.py
	$(BIN)/python tests/study_slurm.py

lint: $(STAMP)
	$(BIN)/ruff check raptor dmd tests
	$(BIN)/ruff format --check raptor dmd tests

bench: $(STAMP)
	$(BIN)/raptor bench train configs/demo.yaml
	$(BIN)/raptor bench dmd
	$(BIN)/raptor bench data

# The one-shot GPU suite (docs/BENCHMARKS.md, "GPU suite"): one JSON + one markdown table
# in BENCH_GPU_OUT, under 8 minutes on one H100/H200. BENCH_GPU_FLAGS=--dry-run rehearses
# it on the CPU with tiny shapes in seconds.
BENCH_GPU_OUT ?= results/bench_gpu
BENCH_GPU_FLAGS ?=
bench-gpu: $(STAMP)
	$(BIN)/python -m raptor.bench.gpu --out $(BENCH_GPU_OUT) $(BENCH_GPU_FLAGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
