"""The legacy example's identifier migration, as the tests drive it (``carnet migrate``).

Shared by tests/unit/migrate/test_migrate_identifiers.py (in-process) and the
tests that run the same migration through a ``carnet`` subprocess
(tests/cli/test_migrate_identifiers_cli.py, tests/scenarios/
test_migrate_identifiers_crash.py). Importing it puts examples/ on sys.path.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from typing import Any

import sqlalchemy as sa
from click.testing import CliRunner

from carnet.cli import cli as carnet_cli
from support.paths import ROOT

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from legacy_practice import app as legacy_app  # noqa: E402, F401 - for the tests
from legacy_practice.generate import populate  # noqa: E402, F401 - for the tests

M = "legacy_practice.app:MigratingPatient"
IDENTIFIERS = ("last_name", "first_name", "birth_date", "phone")
# legacy column -> (new column, blind index filled once this column is sealed)
STEPS = [
    ("phone", "phone_enc", "phone_bidx"),
    ("last_name", "last_name_enc", None),
    ("first_name", "first_name_enc", "name_bidx"),  # initial + last name: both sealed by now
    ("birth_date", "birth_date_enc", "birth_date_bidx"),
]


def migrate(db_url: str, mk: str, *args: str) -> Any:
    return CliRunner().invoke(
        carnet_cli,
        ["--database-url", db_url, "--master-key", mk, "migrate", *args],
        catch_exceptions=False,
    )


def target_args(legacy: str, new: str) -> list[str]:
    return ["--table", "patients", "--column", legacy, "--into", new, "--tenant", "practice_id"]


def index_args(index: str | None) -> list[str]:
    return ["--app-dir", str(EXAMPLES), "--index", f"{M}.{index}"] if index else []


def legacy_rows(engine: sa.Engine) -> dict[int, tuple[str, str, str, dt.date, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT id, practice_id, last_name, first_name, birth_date, phone FROM patients"
            )
        ).all()
    out = {}
    for r in rows:
        birth = r.birth_date
        if isinstance(birth, str):  # SQLite through text()
            birth = dt.date.fromisoformat(birth)
        out[r.id] = (str(r.practice_id), r.last_name, r.first_name, birth, r.phone)
    return out


def alembic_upgrade(db_url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    old = os.environ.get("CARNET_DATABASE_URL")
    os.environ["CARNET_DATABASE_URL"] = db_url
    try:
        command.upgrade(Config(str(EXAMPLES / "legacy_practice" / "alembic.ini")), revision)
    finally:
        if old is None:
            del os.environ["CARNET_DATABASE_URL"]
        else:
            os.environ["CARNET_DATABASE_URL"] = old
