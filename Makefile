# A fresh clone needs only `make demo` or `make test`: each builds the
# virtualenv it needs. Stamps live inside .venv so `make clean` drops them too,
# and depend on pyproject.toml so a dependency change reinstalls.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := dev,aws,pkcs11,postgres,mysql,alembic,asyncio
# Directories that may not exist yet in a young tree; ruff fails on missing paths.
LINT_PATHS := $(wildcard src tests bench examples)
PYTEST_ARGS ?=

.PHONY: venv venv-dev demo test test-fast fuzz check lint typecheck pytest test-sqlalchemy-2.0 \
	package test-package test-pythons bench bench-instructions clean

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
	$(MAKE) --no-print-directory test-sqlalchemy-2.0 || failed="$$failed test-sqlalchemy-2.0"; \
	$(MAKE) --no-print-directory test-package || failed="$$failed test-package"; \
	$(MAKE) --no-print-directory test-pythons || failed="$$failed test-pythons"; \
	if [ -n "$$failed" ]; then echo "make test: failed:$$failed" >&2; exit 1; fi

# The quick loop while editing: the unit tier alone, in-process, without lint
# or type checks (its 1,490 tests on the three databases take about 10 min on
# 2 shared cores, see docs/development.md). `make test` runs every tier: unit,
# cli, scenarios, docs.
test-fast: $(VENV)/.stamp-dev
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# Many more examples of the model-based tests than CI runs, randomized.
FUZZ_EXAMPLES ?= 300
fuzz: $(VENV)/.stamp-dev
	CARNET_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q -s -p no:cacheprovider --timeout=0 tests/scenarios/test_tenant_model.py

check: lint typecheck

lint: $(VENV)/.stamp-dev
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

typecheck: $(VENV)/.stamp-dev
	$(BIN)/mypy src/carnet

pytest: $(VENV)/.stamp-dev
	$(BIN)/pytest $(PYTEST_ARGS)

# carnet supports SQLAlchemy 2.0 and 2.1; the main venv gets the newest, so the
# column type, ORM hooks and key manager are also run against the 2.0 series.
SA20 := .venv-sa20
$(SA20)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(SA20)
	$(SA20)/bin/python -m pip install --quiet --upgrade pip
	$(SA20)/bin/python -m pip install --quiet -e '.[$(EXTRAS)]' 'sqlalchemy>=2.0,<2.1'
	touch $@

test-sqlalchemy-2.0: $(SA20)/.stamp
	$(SA20)/bin/python -c 'import sqlalchemy, sys; v = sqlalchemy.__version__; print("SQLAlchemy", v); sys.exit(not v.startswith("2.0."))'
	$(SA20)/bin/pytest -q tests/unit/test_types.py tests/unit/test_manager.py \
		tests/unit/test_audit.py tests/unit/test_envelope.py tests/unit/test_tenancy.py \
		tests/unit/test_guard.py tests/unit/test_orm.py tests/unit/test_dbchecks.py \
		tests/scenarios/test_no_leaks.py \
		tests/scenarios/test_tenant_model.py tests/scenarios/test_several_databases.py \
		tests/cli/test_typing.py tests/unit/test_sa_private.py tests/unit/test_encrypted_wherever.py \
		tests/unit/test_orm_loading.py tests/unit/test_hot_paths.py tests/unit/test_audit_tally.py

# The package as released: `python -m build` makes the sdist, then the wheel
# from the sdist (so a file the sdist lacks breaks the wheel too).
DIST := dist
PKGTEST := $(BIN)/python tests/package/pkgtest.py
package: $(VENV)/.stamp-dev
	rm -rf $(DIST)
	$(BIN)/python -m build --quiet --outdir $(DIST) .

# The wheel carries py.typed and nothing of tests/, the sdist the known-answer
# vectors docs/format.md cites; the wheel, installed into a brand-new
# virtualenv, runs `carnet demo` and tests/package/smoke.py from a directory
# outside the checkout.
test-package: package
	$(PKGTEST) check $(DIST)
	$(PKGTEST) smoke $(DIST) --python $(PYTHON)

# Every minor version of requires-python that the main venv's Python is not:
# the wheel in a venv of that version (.venv/pythons/X.Y, from pyenv or
# pythonX.Y on PATH; a missing one fails) running the unit tests of the
# envelope, the column types, the key manager, the SQL guard and the database
# checks on the three databases. README.md's compatibility table names these.
MAIN_PY := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PY_VERSIONS ?= $(filter-out $(MAIN_PY),3.10 3.11 3.12 3.13)
PY_TESTS := tests/unit/test_envelope.py tests/unit/test_aead_wycheproof.py \
	tests/unit/test_types.py tests/unit/test_manager.py tests/unit/test_guard.py \
	tests/unit/test_dbchecks.py
test-pythons: package
	$(PKGTEST) pythons $(DIST) --versions $(PY_VERSIONS) --tests $(PY_TESTS)

bench: $(VENV)/.stamp-dev
	$(BIN)/python -m bench

# Instructions per row against the minimal AES-GCM type (needs valgrind).
bench-instructions: $(VENV)/.stamp-dev
	$(BIN)/python -m bench.instructions

clean:
	rm -rf $(VENV) $(SA20) build dist .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
