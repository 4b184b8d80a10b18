# One command set for developers and CI. `make demo` and `make test` are the README's two.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint format types check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install
	$(BIN)/smsbat-tracker demo

test: install
	$(BIN)/pytest --cov --cov-branch --cov-report=
	$(BIN)/pytest examples/django_shop --cov --cov-branch --cov-append --cov-report=term --cov-report=xml

test-fast: install
	$(BIN)/pytest -m "not slow" -x

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

types: install
	$(BIN)/mypy

check: lint types test

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage coverage.xml
