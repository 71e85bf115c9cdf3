# The two commands: `make repro` (environment + pipeline) and `make test` (environment + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stage commands in dvc.yaml call `python`: put the environment first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: repro test test-fast lint env clean-env reproduce-check

repro: $(VENV)/.installed
	dvc repro
	dvc metrics show metrics/evaluate.json

test: $(VENV)/.installed
	python -m pytest

# Everything but the real-dvc end-to-end and the multi-process tests: for the edit-test loop.
test-fast: $(VENV)/.installed
	python -m pytest -m "not e2e and not multiprocess" --durations=5

lint: $(VENV)/.installed
	ruff check src stages tests bench tools
	ruff format --check src stages tests bench tools

# Rerun the committed pipeline from scratch in a temporary clone and compare its metrics with
# the committed ones: exact by default (same machine), `make reproduce-check TOLERANCE=0.01`
# elsewhere, with compute.precision pinned (docs/reproducibility.md). See
# tools/reproduce_check.py --help.
reproduce-check: $(VENV)/.installed
	python tools/reproduce_check.py $(if $(TOLERANCE),--tolerance $(TOLERANCE))

env: $(VENV)/.installed

# Rebuilt only when the pins change; a second `make` reuses the environment.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

clean-env:
	rm -rf $(VENV)
