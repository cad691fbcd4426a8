# Every target sets itself up: the first run creates .venv and installs the pinned stack.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# learn2learn 0.2.0 ships stale Cython output that fails on Python 3.11 (upstream issue #413):
# rebuild its extensions from the .pyx sources against the environment's Cython.
L2L_PIN := learn2learn==0.2.0

.PHONY: setup bench test lint clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=70.1" wheel cython
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip show learn2learn >/dev/null 2>&1 || \
		$(BIN)/python -m pip install -q --use-pep517 --no-build-isolation \
			-C--global-option=build_ext $(L2L_PIN)
	$(BIN)/python -m pip install -q -e ".[test]" $(TORCH_PINS) $(L2L_PIN)
	touch $(STAMP)

# One single-threaded process per core under torchrun, sharing out the table's cells: each cell is
# computed as `OMP_NUM_THREADS=1 mtl bench --profile quick` computes it alone, so the table does not
# depend on the number of processes (BENCH_PROCESSES=1: one process).
BENCH_PROCESSES ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())")

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=$(BENCH_PROCESSES) -m mtl_plugin bench --profile quick

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Lint and format check (ruff, pinned in setup.py; rules in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
