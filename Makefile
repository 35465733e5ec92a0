# The two commands of the README: `make run` (the demo, end to end) and `make test`.
# Each does its whole set-up from nothing: virtualenv, Python dependencies, Azurite from npm.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_PY := $(VENV)/.installed
STAMP_NODE := node_modules/.installed
AZURITE_DIR := .azurite

.PHONY: run test lint typecheck unit bench chaos schemas clean deps

deps: $(STAMP_PY) $(STAMP_NODE)

$(STAMP_PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(STAMP_NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## make run: the offline demo: Azurite, the fake model (weather bot), the worker, a producer.
run: deps
	$(BIN)/assistant-worker demo

## make test: lint, type-check, and the whole test suite (Azurite started by the tests).
test: deps lint typecheck
	$(BIN)/python -m pytest -q

lint: $(STAMP_PY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP_PY)
	$(BIN)/mypy

## make bench: the worker against hand-written baselines measured in the same run, on Azurite.
## Writes bench/RESULTS.md (`python -m bench.all --only latency,creates` runs a few).
bench: deps
	$(BIN)/python -m bench.all

## make chaos: the soak (kills, model faults, a table outage, external tools) and its audit;
## exits non-zero when an audit line fails. `make chaos CHAOS_ARGS="--seed 2"` passes options.
chaos: deps
	$(BIN)/python -m bench.chaos $(CHAOS_ARGS)

## make schemas: regenerate schemas/json/ from the pydantic models.
schemas: $(STAMP_PY)
	$(BIN)/python -m schemas.export

clean:
	rm -rf $(VENV) node_modules $(AZURITE_DIR) .pytest_cache .mypy_cache .ruff_cache
