"""A record survives a SIGKILL right after the read: a real process, killed for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

import carnet
from carnet.audit_store import AuditStore
from carnet.cli import cli
from support.models import Note, configured_keys

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import sqlalchemy as sa
    from sqlalchemy.orm import Session
    import carnet
    from carnet.audit import Auditor, AuditTrail, principal_scope
    from support.models import Note

    url, master, mode = sys.argv[1:4]
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=master)
    carnet.configure(keys)
    # A long flush interval: nothing is written by the background flusher.
    trail = AuditTrail(keys, mode=mode, block=100, flush_every=3600)
    Auditor(trail=trail).install(keys)
    with principal_scope("dr.killed"), Session(engine) as s:
        note = s.scalars(sa.select(Note).where(Note.id == 1)).one()
        assert note.body
        if mode == "best_effort":
            trail.flush()  # what a web app's end-of-request hook does
        s.rollback()
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.mark.parametrize("mode", ["required", "best_effort"])
def test_record_survives_sigkill_after_the_read(
    engine: sa.Engine, db_url: str, master_key_uri: str, mode: str
) -> None:
    with configured_keys(engine, master_key_uri) as keys:
        with Session(engine) as s:
            s.add(Note(id=1, practice_id="p1", body="PLANTED-sigkill-note"))
            s.commit()
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, db_url, master_key_uri, mode],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert "PLANTED" not in proc.stderr + proc.stdout
        store = AuditStore(keys)
        recs = [r for r in store.walk() if r["principal"] == "dr.killed"]
        kinds = {r["kind"]: int(r["count"]) for r in recs}  # type: ignore[call-overload]
        # required: the block reserved before the value was opened; best_effort: the flushed count.
        assert kinds == ({"reserve": 100} if mode == "required" else {"read": 1})
        assert recs[0]["practice"] == "p1" and recs[0]["field"] == "notes.body"
        assert store.verify().ok
        # The report counts what was written, and bounds what may have been read.
        res = CliRunner().invoke(
            cli,
            ["audit", "report", "--json"],
            env={"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri},
        )
        rep = json.loads(res.output)
        assert (rep["total"], rep["total_at_most"]) == ((0, 100) if mode == "required" else (1, 1))
        store.engine.dispose()
        carnet.configure(None)
