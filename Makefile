# The README's commands. Each sets up .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BENCH_SCALE ?= default
SOAK_MINUTES ?= 30
BULK_ENTITIES ?= 10000

.PHONY: dev test check lint format typecheck bench soak bulk-soak flood worker api clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)  ## the whole stack, embedded; GraphiQL at http://127.0.0.1:8000/graphql
	$(BIN)/python -m deploy.dev

worker: $(STAMP)
	$(BIN)/python -m workers

api: $(STAMP)
	$(BIN)/python -m api

AUDIT := tests/api/http_audit

$(AUDIT)/node_modules/.package-lock.json: $(AUDIT)/package-lock.json
	npm ci --prefix $(AUDIT) --no-audit --no-fund --silent

test: $(STAMP) $(AUDIT)/node_modules/.package-lock.json  ## every test, against a real Temporal dev server and Redis
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff format --check entities api workers deploy bench tests
	$(BIN)/ruff check entities api workers deploy bench tests

format: $(STAMP)
	$(BIN)/ruff format entities api workers deploy bench tests
	$(BIN)/ruff check --fix entities api workers deploy bench tests

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench: $(STAMP)  ## benchmarks against raw Temporal; BENCH_SCALE=small for a quick run
	$(BIN)/python -m bench --scale $(BENCH_SCALE)

soak: $(STAMP)  ## SOAK_MINUTES (default 30) of mixed traffic with faults; exits 1 on any loss
	SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/python -m tests.soak

flood: $(STAMP)  ## one account flooded with deposits, its worker killed and kept down 15 s; exits 1 on any loss
	$(BIN)/python -m tests.soak.flood

bulk-soak: $(STAMP)  ## a bulk deposit to BULK_ENTITIES (10,000) accounts, its worker killed midway
	BULK_ENTITIES=$(BULK_ENTITIES) $(BIN)/python -m pytest tests/entities/test_bulk.py -k killed

clean:
	rm -rf $(VENV) $(AUDIT)/node_modules .data .pytest_cache .mypy_cache .ruff_cache *.egg-info
