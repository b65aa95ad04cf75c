# Quick start: `make demo` (set-up + the built-in benchmark), `make test` (set-up + the test suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.l2sp-installed
FMNIST := /usr/share/datasets/fashion-mnist
# The torch/torchvision pair that pip finds on this platform's local index; override for other platforms.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# pytest workers; each gets one thread (torch slows sharply when threads outnumber cores)
WORKERS ?= 2

.PHONY: setup dataset demo demo-quick test test-fast lint bench postgres clean

setup: $(STAMP) dataset

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package; skipped where it is present or apt is unavailable
# (l2sp then reads a folder you name, or downloads through torchvision when online).
dataset:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

demo: setup
	$(VENV)/bin/l2sp demo

demo-quick: setup
	$(VENV)/bin/l2sp demo --quick

test: setup
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS) -q

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS) -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/penalty_overhead.py

# a local PostgreSQL server for the test of a search shared through a database (root, Debian/Ubuntu);
# prints the line to export before `make test` (.ci/run does this itself)
postgres:
	@url=$$(bash .ci/postgres.sh) && echo "export L2SP_TEST_POSTGRES_URL=$$url" \
	  || echo "PostgreSQL could not be started here (needs root and apt-get); its test is skipped"

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
