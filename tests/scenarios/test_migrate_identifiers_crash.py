"""``carnet migrate run --into ... --index ...`` killed with SIGKILL mid-pass, then resumed.

Nothing sealed twice, every patient found again; beside the in-process
migration of tests/unit/migrate/test_migrate_identifiers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from support.identifiers import (
    alembic_upgrade,
    index_args,
    legacy_app,
    legacy_rows,
    migrate,
    populate,
    target_args,
)
from support.paths import ROOT


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """No models: the legacy application's tables are made by the test."""
    return ()


def test_identifier_migration_killed_and_resumed(
    engine: sa.Engine, db_url: str, master_key_uri: str, keys: Any
) -> None:
    import signal
    import time

    from carnet.jobs import job_progress

    populate(engine, seed=9, practices_n=2, patients_n=40, consultations_n=0, lookalike=False)
    expected = legacy_rows(engine)
    alembic_upgrade(db_url, "0003_expand_identifiers")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    args = [*target_args("birth_date", "birth_date_enc"), *index_args("birth_date_bidx")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "carnet", "--database-url", db_url, "--master-key",
         master_key_uri, "migrate", "run", *args, "--batch-size", "4", "--pause", "0.3"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    job = "migrate:patients.birth_date_enc"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if job_progress(engine, job)["scanned"] >= 12:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = job_progress(engine, job)
    assert 12 <= killed_at["scanned"] < 40 and killed_at["done"] == 0

    res = migrate(db_url, master_key_uri, "run", *args, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["resumed_from"] is not None
    assert out["scanned"] == 40 - killed_at["scanned"]
    # Nothing sealed twice: one value written per row over both runs.
    assert job_progress(engine, job)["rewritten"] == 40
    assert out["indexes"][0]["missing"] == 0
    res = migrate(db_url, master_key_uri, "finish", *args)
    assert res.exit_code == 0, res.output
    Migrating = legacy_app.patient_model("migrating")  # noqa: N806 - a class
    with Session(engine) as s:
        for pid, (practice, *_rest) in expected.items():
            p = s.get(Migrating, pid)
            assert p.birth_date_enc == expected[pid][3]
            got = carnet.search(s, Migrating.birth_date_bidx, p.birth_date_enc, tenant=practice)
            assert pid in {q.id for q in got}
