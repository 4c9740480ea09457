# A fresh clone needs only `make demo` or `make test`: each builds the
# virtualenv it needs. Stamps live inside .venv so `make clean` drops them too,
# and depend on pyproject.toml so a dependency change reinstalls.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := dev,aws,pkcs11,postgres,mysql,alembic
# Directories that may not exist yet in a young tree; ruff fails on missing paths.
LINT_PATHS := $(wildcard src tests bench examples)
PYTEST_ARGS ?=

.PHONY: venv venv-dev demo test test-fast check lint typecheck pytest bench clean

venv: $(VENV)/.stamp-core
venv-dev: $(VENV)/.stamp-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.stamp-core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The dev install is a superset of the core one, so it satisfies both stamps.
$(VENV)/.stamp-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(VENV)/.stamp-core $@

demo: $(VENV)/.stamp-core
	$(BIN)/carnet demo

# Runs every step even when an earlier one fails, so one report shows all
# problems; fails if any step failed.
test: $(VENV)/.stamp-dev
	@failed=""; \
	$(MAKE) --no-print-directory lint || failed="$$failed lint"; \
	$(MAKE) --no-print-directory typecheck || failed="$$failed typecheck"; \
	$(MAKE) --no-print-directory pytest || failed="$$failed pytest"; \
	if [ -n "$$failed" ]; then echo "make test: failed:$$failed" >&2; exit 1; fi

# Without lint and type checks, for a quick loop while editing.
test-fast: pytest

check: lint typecheck

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check $(LINT_PATHS)

typecheck: $(VENV)/.stamp-dev
	$(BIN)/mypy src/carnet

pytest: $(VENV)/.stamp-dev
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(VENV)/.stamp-dev
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
