# The two commands of the README: `make run` (the demo, end to end) and `make test`.
# Each does its whole set-up from nothing: virtualenv, Python dependencies, Azurite from npm.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_PY := $(VENV)/.installed
STAMP_NODE := node_modules/.installed
AZURITE_DIR := .azurite
# The linters of deploy/ have a virtualenv of their own: checkov pins many packages.
LINT_VENV := .venv-lint
LINT_BIN := $(LINT_VENV)/bin
STAMP_LINT := $(LINT_VENV)/.installed
# Kubernetes versions the manifests are validated against: AKS's oldest supported, the newest.
K8S_VERSIONS := 1.32 1.37
# Test processes of `make test`: two fit the 2-core CI machine (the suite mostly waits).
TEST_PROCESSES ?= 2

.PHONY: run test lint lint-deploy typecheck unit bench chaos schemas clean deps

deps: $(STAMP_PY) $(STAMP_NODE)

$(STAMP_PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(STAMP_LINT): requirements-lint.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_BIN)/pip install --quiet --upgrade pip
	$(LINT_BIN)/pip install --quiet -r requirements-lint.txt
	touch $@

$(STAMP_NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## make run: the offline demo: Azurite, the fake model (weather bot), the worker, a producer.
run: deps
	$(BIN)/assistant-worker demo

## make test: lint (code and deploy/), type-check, and the whole test suite (Azurite started by
## the tests), in TEST_PROCESSES processes (pytest-xdist; each starts its own Azurite and Redis).
test: deps lint lint-deploy typecheck
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES)

lint: $(STAMP_PY)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## make lint-deploy: hadolint, kubernetes-validate and checkov on deploy/ (deploy/README.md,
## "Linters"); installs them into .venv-lint on first use.
lint-deploy: $(STAMP_LINT)
	$(LINT_BIN)/hadolint deploy/Dockerfile
	for version in $(K8S_VERSIONS); do \
		$(LINT_BIN)/kubernetes-validate --strict --quiet --kubernetes-version $$version \
			deploy/keda/*.yaml || exit 1; \
	done
	$(LINT_BIN)/checkov --directory deploy --quiet --compact --skip-download

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
	rm -rf $(VENV) $(LINT_VENV) node_modules $(AZURITE_DIR) .pytest_cache .mypy_cache .ruff_cache
