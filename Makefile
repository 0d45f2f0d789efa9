# Paddler for Kubernetes. `make run` serves a real model locally; `make test` installs
# everything and runs every tier (see docs/development.md). Component set-up lives in
# mk/*.mk fragments, each adding its install step to INSTALL_TARGETS.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export PADDLER_CACHE ?= $(HOME)/.cache/paddler

INSTALL_TARGETS := venv
PYTEST_ARGS ?=

-include mk/*.mk

.PHONY: run test install venv lint typecheck pytest hooks clean

run: install
	$(VENV)/bin/paddler quickstart

test: install lint typecheck pytest

install: $(INSTALL_TARGETS)

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	$(PIP) install -q -e '.[dev,operator]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --explicit-package-bases bench

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The same checks before each commit (and the unit tier before each push): .pre-commit-config.yaml.
hooks: venv
	$(VENV)/bin/pre-commit install

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
