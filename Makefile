# Quick start: `make train` (set-up, then source-only vs PWDA on the built-in toy domains)
#              `make test`  (set-up, then the test suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export PYTHONUNBUFFERED := 1
# make builds what it tests: a failed C++/CUDA build is an error here (a user's pip install only warns),
# and the tests fail, rather than skip, where the extension is missing.
export PWDA_FAST_REQUIRE_EXT := 1
export PWDA_FAST_EXPECT_EXT := 1

.PHONY: setup train test bench mutants lint clean

setup: $(STAMP)

$(STAMP): Makefile pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "torch>=2.11,<=2.14.1" numpy pillow tqdm pytest pytest-benchmark ruff
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,dali,tensorboard,export,plots]"
	# Tests only: its label table and its official evaluation cross-check ours. Of its dependencies the
	# evaluation module's import needs pyquaternion alone (pure Python, needs numpy).
	$(PY) -m pip install -q --no-deps cityscapesscripts pyquaternion
	# Tests only: scipy's Student t quantiles cross-check stats.py's (scipy needs only numpy).
	$(PY) -m pip install -q --no-deps scipy
	touch $(STAMP)

train: setup
	$(PY) -m pwda_fast.compare

test: setup
	$(PY) -m pytest -q tests

# The fused loss and the train step as pytest-benchmark suites, on the GPU when one is visible, else
# the CPU; each row into bench/results/<device>.jsonl as it is measured (bench/rows.py), then the tables
# written into BENCHMARKS.md between their markers, also when a provider failed (its row says why; the
# exit status is pytest's). BENCHMARKS.md says how they are measured. Publish from a quiet machine only.
# Extra pytest arguments: make bench BENCH_ARGS="--bench-threads 1"
BENCH_ARGS ?=
bench: setup
	dev=$$($(PY) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')") && \
	rm -f bench/results/$$dev.jsonl && \
	{ $(PY) -m pytest --benchmark-columns=median,iqr,min,max,rounds $(BENCH_ARGS) bench/test_bench_loss.py \
	  bench/test_bench_step.py --bench-device=$$dev --bench-rows=bench/results/$$dev.jsonl; rc=$$?; } && \
	$(PY) bench/rows.py write BENCHMARKS.md bench/results/$$dev.jsonl && exit $$rc

# Mutation testing of the method's core (docs/TESTING.md; not part of CI): first the hand-written table
# (a few minutes), then mutmut over reference/adapt/metrics/checkpoint against the fast tests.
mutants: setup
	$(PY) tests/mutation_table.py
	$(PY) -m pip install -q mutmut
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2
	$(VENV)/bin/mutmut results

lint: setup
	$(VENV)/bin/ruff check pwda_fast kernels bench tests

clean:
	rm -rf build *.egg-info pwda_fast/_C*.so mutants
