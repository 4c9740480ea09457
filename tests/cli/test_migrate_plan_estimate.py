"""`carnet migrate plan` times this database, and lays its counts out as a table.

The estimate comes from a trial on the database itself (a sample sealed,
written and rolled back), so it holds on SQLite, PostgreSQL and MariaDB
alike: within a factor of two of what `migrate run` then takes on the
example practice database.
"""

from __future__ import annotations

import json
import sys

import sqlalchemy as sa

from support.lifecycleutil import run_cli
from support.paths import ROOT

sys.path.insert(0, str(ROOT / "examples"))

from legacy_practice import generate  # noqa: E402

TARGET = ["--table", "consultations", "--column", "comment", "--tenant", "patients.practice_id"]


def _comments(url: str) -> dict[int, str | None]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        out = dict(conn.execute(sa.text("SELECT id, comment FROM consultations")).all())
    engine.dispose()
    return out


def test_plan_estimate_within_twice_the_run(db_url: str, master_key_uri: str) -> None:
    engine = sa.create_engine(db_url)
    generate.populate(engine, seed=7, practices_n=10, patients_n=2000, consultations_n=60000)
    engine.dispose()
    before = _comments(db_url)
    r = run_cli(["migrate", "plan", *TARGET, "--json"], db_url=db_url, master_key=master_key_uri)
    assert r.returncode == 9, r.stderr  # not complete: the look-alike note needs a decision
    plan = json.loads(r.stdout)
    assert plan["rate_source"].startswith("measured on this database")
    assert _comments(db_url) == before  # the trial was rolled back
    r = run_cli(
        ["migrate", "run", *TARGET, "--prefixed", "encrypt", "--json"],
        db_url=db_url,
        master_key=master_key_uri,
    )
    assert r.returncode == 0, r.stderr
    took = json.loads(r.stdout)["elapsed"]
    estimate = plan["to_encrypt"] / plan["rate_rows_per_second"]
    assert took / 2 <= estimate <= took * 2, (estimate, took)


def test_plan_table_is_aligned(db_url: str, master_key_uri: str) -> None:
    engine = sa.create_engine(db_url)
    generate.populate(engine, seed=7, practices_n=12, patients_n=60, consultations_n=400)
    engine.dispose()
    r = run_cli(["migrate", "plan", *TARGET], db_url=db_url, master_key=master_key_uri)
    lines = r.stdout.splitlines()
    totals = lines[1:6]
    # Every count ends in the same column.
    assert len({len(ln) for ln in totals}) == 1, totals
    head = lines.index("per tenant:") + 1
    rows = [ln for ln in lines[head:] if ln.startswith("  ")]
    assert len(rows) == 13  # a header and 12 practices
    assert len({len(ln) for ln in rows}) == 1, rows
