# Two commands: `make demo` (installs, then runs the lab demo) and `make test` (installs test needs, runs the suite);
# `make lint` is what CI checks besides the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo demo-signal test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]' torch==2.13.0
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/distillab demo

demo-signal: $(VENV)/.installed
	$(BIN)/distillab demo --signal

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.test-installed   # CI runs it too: ruff (lint + format) and the import layers (pyproject.toml)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports

bench: $(VENV)/.test-installed
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]' torch==2.13.0

clean:
	rm -rf runs
