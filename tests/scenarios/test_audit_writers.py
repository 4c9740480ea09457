"""Several processes append to the one chain at once; it verifies, nothing is lost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import sqlalchemy as sa

import carnet
from carnet.audit_store import AuditStore

ROOT = Path(__file__).resolve().parents[2]
N_PROCS, N_FLUSHES = 3, 20

CHILD = textwrap.dedent(
    """
    import sys
    import sqlalchemy as sa
    import carnet
    from carnet.audit import AuditTrail

    url, master, who, n = sys.argv[1:5]
    keys = carnet.KeyManager(sa.create_engine(url), master_key=master)
    trail = AuditTrail(keys, background=False)
    for i in range(int(n)):
        trail.disclosed(who, "p1", "notes.body", 1, 0)
        assert trail.flush(), trail.last_error
    """
)


def test_processes_append_to_one_chain(engine: sa.Engine, db_url: str, master_key_uri: str) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    store = AuditStore(keys)
    store.keys()  # the audit key exists before the writers start
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, db_url, master_key_uri, f"writer{i}", str(N_FLUSHES)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(N_PROCS)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
    rep = store.verify()
    assert rep.ok and rep.records == N_PROCS * N_FLUSHES
    per: dict[str, int] = {}
    for r in store.walk():
        per[str(r["principal"])] = per.get(str(r["principal"]), 0) + int(r["count"])  # type: ignore[call-overload]
    assert per == {f"writer{i}": N_FLUSHES for i in range(N_PROCS)}
    store.engine.dispose()
    keys.close()
