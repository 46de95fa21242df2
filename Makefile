# Two commands for a fresh machine:
#   make run    run the daemon on the embedded SQLite default (sessions.db)
#   make test   lint, type-check and run the test suite
# Each creates the virtualenv (.venv) and installs the project into it when missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run demo test lint typecheck pytest bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/sessionstore serve $(ARGS)

demo: $(STAMP)
	$(BIN)/python examples/restart_demo.py

lint: $(STAMP)
	$(BIN)/ruff check sessionstore tests migrations benchmarks examples
	$(BIN)/ruff format --check sessionstore tests migrations benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy --strict sessionstore tests benchmarks examples migrations

pytest: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build
