"""``carnet verify`` as an operator runs it: the database's own checks, missing and restored.

Beside tests/unit/test_verify.py, which runs the same walk in-process.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

import carnet
from carnet import lifecycle
from support.lifecycleutil import fill_notes, run_cli


def test_verify_fails_on_missing_database_checks_and_names_the_fix(
    db_url: str, master_key_uri: str
) -> None:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        keys.create_schema()
        fill_notes(engine, keys, 6)
        rep = lifecycle.verify(keys, "notes", "body", tenant_column="practice_id")
        assert rep.failed == 0 and rep.checks is not None and rep.checks["ok"], rep.checks
        # Dropped by hand, as a user with DDL rights can.
        with engine.begin() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("DROP TRIGGER carnet_p_notes_body_i")
            else:
                conn.exec_driver_sql("ALTER TABLE notes DROP CONSTRAINT carnet_p_notes_body")
        rep = lifecycle.verify(keys, "notes", "body", tenant_column="practice_id")
        assert rep.failed == 0  # every value opens: the rows are fine, the schema is not
        assert rep.checks is not None and not rep.checks["ok"]
        assert any(n.startswith("carnet_p_notes_body") for n in rep.checks["missing"])
        fix = rep.checks["fix"]
        assert fix == (
            "carnet checks install --table notes --column body --tenant-column practice_id "
            "--mode v2"
        )
        args = ["verify", "--table", "notes", "--column", "body", "--tenant-column", "practice_id"]
        r = run_cli([*args, "--json"], db_url=db_url, master_key=master_key_uri)
        assert r.returncode == 1, r.stderr
        assert json.loads(r.stdout)["checks"]["fix"] == fix
        r = run_cli(args, db_url=db_url, master_key=master_key_uri)
        assert r.returncode == 1 and f"fix: {fix}" in r.stdout, r.stdout
        # The hint, run as printed, restores them.
        r = run_cli(fix.split()[1:], db_url=db_url, master_key=master_key_uri)
        assert r.returncode == 0, r.stderr
        r = run_cli(args, db_url=db_url, master_key=master_key_uri)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        keys.close()
        engine.dispose()
