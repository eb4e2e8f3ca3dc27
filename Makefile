# Every target sets itself up: a fresh clone needs only python3 (>= 3.10).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck check bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## run the demo: the same app and load with and without guardrails
	$(VENV)/bin/guardrails demo

test: $(STAMP)  ## run the test suite (starts its own throwaway PostgreSQL)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

check: lint typecheck test

bench: $(STAMP)  ## benchmark suite (a few minutes): writes docs/benchmarks.md
	$(PY) benchmarks/run.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
