"""README.md's compatibility table says what the tests run, and only that.

The Python rows match pyproject.toml's classifiers and the versions
``make test`` runs (this interpreter, and the Makefile's PY_VERSIONS);
every other row names the version installed or running here, so a driver
or server upgrade that changes it fails until the table says so.
"""

from __future__ import annotations

import importlib.metadata
import re
import sqlite3
import sys

import pytest
import sqlalchemy as sa

from support.paths import ROOT

ALL_PYTHONS = ("3.10", "3.11", "3.12", "3.13")


def table() -> dict[str, list[tuple[str, str]]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Compatibility\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("component", "---"):
            rows.setdefault(cells[0], []).append((cells[1], cells[2]))
    return rows


def _versions(cell: str) -> set[str]:
    return set(re.findall(r"\b\d+(?:\.\d+)?\b", cell))


def _pyproject() -> str:
    # Read as text: tomllib is 3.11+, and these tests run under 3.10 too.
    return (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def pythons_tested() -> set[str]:
    return {
        v for tested, how in table()["Python"] if "untested" not in how for v in _versions(tested)
    }


def test_python_rows_match_classifiers_and_makefile() -> None:
    text = _pyproject()
    classified = set(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text))
    assert pythons_tested() == classified
    lowest = re.search(r'^requires-python = ">=(3\.\d+)"$', text, re.M)
    assert lowest is not None and lowest.group(1) == min(classified, key=lambda v: int(v[2:]))
    # What the Makefile runs: the main interpreter (every test) and the others (test-pythons).
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    listed = re.search(r"PY_VERSIONS \?= \$\(filter-out \$\(MAIN_PY\),([\d. ]+)\)", makefile)
    assert listed is not None
    assert set(listed.group(1).split()) == classified
    assert set(ALL_PYTHONS) >= classified
    main = f"{sys.version_info.major}.{sys.version_info.minor}"
    every = [tested for tested, how in table()["Python"] if how.startswith("every test")]
    assert every == [main], "the row of every test names this interpreter"


def test_unpythons_tested_are_listed_as_untested() -> None:
    rows = table()["Python"]
    assert any("untested" in how and "3.14" in tested for tested, how in rows)


def _installed(dist: str, parts: int = 2) -> str:
    return ".".join(importlib.metadata.version(dist).split(".")[:parts])


@pytest.mark.parametrize(
    ("row", "dist", "parts"),
    [
        ("psycopg", "psycopg", 2),
        ("asyncpg", "asyncpg", 2),
        ("PyMySQL", "PyMySQL", 2),
        ("asyncmy", "asyncmy", 2),
        ("aiosqlite", "aiosqlite", 2),
        ("Alembic", "alembic", 2),
        ("cryptography", "cryptography", 1),
        ("SQLAlchemy", "SQLAlchemy", 2),
    ],
)
def test_library_rows_name_the_installed_version(row: str, dist: str, parts: int) -> None:
    named = {t for t, _ in table()[row]}
    assert _installed(dist, parts) in named, (row, importlib.metadata.version(dist), named)


def test_sqlalchemy_rows_are_the_supported_series() -> None:
    assert '"sqlalchemy>=2.0,<2.2"' in _pyproject()
    assert {t for t, _ in table()["SQLAlchemy"]} == {"2.0", "2.1"}


def test_sqlite_row_names_the_library_in_use() -> None:
    major, minor, _ = sqlite3.sqlite_version_info
    assert [t for t, _ in table()["SQLite"]] == [f"{major}.{minor}"]


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"])
def test_server_rows_name_the_servers_tested(engine: sa.Engine, db_kind: str) -> None:
    with engine.connect():
        info = engine.dialect.server_version_info
    assert info is not None
    version = str(info[0]) if db_kind == "postgresql" else f"{info[0]}.{info[1]}"
    row = "PostgreSQL" if db_kind == "postgresql" else "MariaDB"
    assert [t for t, _ in table()[row]] == [version]
