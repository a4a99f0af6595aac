# Quick start: `make train` (set-up, then source-only vs PWDA on the built-in toy domains)
#              `make test`  (set-up, then the test suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CUDA_HOME_DIR := $(wildcard /usr/local/cuda)

export CUDA_HOME := $(if $(CUDA_HOME),$(CUDA_HOME),$(CUDA_HOME_DIR))
export PYTHONUNBUFFERED := 1

.PHONY: setup train test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch>=2.11,<=2.14.1" numpy pillow tqdm pytest pytest-benchmark ruff
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,dali,tensorboard]"
	# Only its label table is used, by a cross-check test; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps cityscapesscripts
	touch $(STAMP)

train: setup
	$(PY) -m pwda_fast.compare

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_loss.py
	$(PY) bench/bench_step.py

lint: setup
	$(VENV)/bin/ruff check pwda_fast kernels bench tests

clean:
	rm -rf build *.egg-info pwda_fast/_C*.so
