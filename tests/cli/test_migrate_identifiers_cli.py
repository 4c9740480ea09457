"""``carnet reindex`` as a subprocess, on the example's patients migrated to blind indexes.

Beside tests/unit/migrate/test_migrate_identifiers.py, which runs the migration
in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import sqlalchemy as sa

from support.identifiers import (
    EXAMPLES,
    M,
    alembic_upgrade,
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


def test_reindex_cli_runs_as_a_subprocess(
    engine: sa.Engine, db_url: str, master_key_uri: str, keys: Any
) -> None:
    populate(engine, seed=7, practices_n=2, patients_n=12, consultations_n=0, lookalike=False)
    phones = [v[4] for v in legacy_rows(engine).values() if v[4] is not None]
    alembic_upgrade(db_url, "0003_expand_identifiers")
    res = migrate(db_url, master_key_uri, "run", *target_args("phone", "phone_enc"))
    assert res.exit_code == 0, res.output
    env = {
        **os.environ,
        "CARNET_DATABASE_URL": db_url,
        "CARNET_MASTER_KEY": master_key_uri,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }

    def carnet_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "carnet", *args], env=env, capture_output=True, text=True,
            timeout=120, cwd=EXAMPLES,
        )  # fmt: skip

    bad = carnet_cmd("reindex", "--index", "nowhere:X.y", "--all-tenants")
    assert bad.returncode == 2 and "nowhere" in bad.stderr
    usage = carnet_cmd("reindex", "--index", f"{M}.phone_bidx")
    assert usage.returncode == 2
    ok = carnet_cmd("reindex", "--index", f"{M}.phone_bidx", "--all-tenants", "--json")
    assert ok.returncode == 0, ok.stderr
    rows = json.loads(ok.stdout)
    assert {r["tenant"] for r in rows} == {"1", "2"}
    written = sum(r["rewritten"] for r in rows)
    assert written == len(phones)
    # Again: nothing left to do, the job starts a fresh pass and finds every value current.
    again = json.loads(carnet_cmd("reindex", "--index", f"{M}.phone_bidx", "--tenant", "1",
                                  "--json").stdout)  # fmt: skip
    assert again[0]["rewritten"] == 0 and again[0]["skipped"] > 0
    unknown = carnet_cmd("reindex", "--index", f"{M}.phone_bidx", "--tenant", "nope")
    assert unknown.returncode == 7
    for out in (ok.stdout, ok.stderr, bad.stderr, unknown.stderr):
        assert not any(v in out or v.replace(" ", "") in out for v in phones)
