"""SIGKILL during reencrypt and master rotate, with real application writers running.

Four writer processes keep updating notes through EncryptedText and log each
committed value in a ledger file while ``carnet reencrypt`` runs as a
subprocess; it is SIGKILLed twice and resumed. Afterwards every row decrypts
to its last ledger value and sits on its practice's active key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from carnet.jobs import job_progress
from support.lifecycleutil import active_key_ids, fill_notes, popen_cli, read_notes, run_cli
from support.paths import SUPPORT, TESTS

NROWS = 2000
WRITERS = 4
HERE = SUPPORT


def _kill_after(
    proc: subprocess.Popen[str], engine: sa.Engine, job: str, scanned: int, deadline: float = 60
) -> bool:
    """SIGKILL ``proc`` once the job has committed ``scanned`` rows; False if it ended first."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            progress = job_progress(engine, job)
            # A pass that finished (an earlier attempt ran to its end) counts
            # until the new run starts its own: wait for that one's progress.
            running = progress["done"] < progress["workers"]
            if running and progress["scanned"] >= scanned:
                proc.send_signal(signal.SIGKILL)
                # A run that finished between our look and the signal was not killed.
                return proc.wait() == -signal.SIGKILL
        except sa.exc.DBAPIError:
            pass  # the jobs table is being created
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("reencrypt made no progress")


@pytest.mark.slow
def test_reencrypt_killed_twice_with_live_writers(
    db_url: str, master_key_uri: str, tmp_path: Path
) -> None:
    engine = sa.create_engine(
        db_url, connect_args={"timeout": 30} if db_url.startswith("sqlite") else {}
    )
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, NROWS)
    for t in ("p0", "p1", "p2"):
        keys.rotate(t)
    ledger_files = [tmp_path / f"ledger{i}.tsv" for i in range(WRITERS)]
    stop = tmp_path / "stop"
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "writer_proc.py"),
                db_url,
                master_key_uri,
                str(ledger_files[i]),
                str(i),
                str(WRITERS),
                str(NROWS),
                str(stop),
            ],
            cwd=HERE,
            env={**os.environ, "PYTHONPATH": str(TESTS)},
        )
        for i in range(WRITERS)
    ]
    job = "reencrypt:notes.body"
    args = ["reencrypt", "--table", "notes", "--column", "body", "--batch", "10", "--json"]
    try:
        killed = attempts = 0
        fractions = (0.25, 0.6)
        while killed < len(fractions):
            attempts += 1
            assert attempts <= 6, "no run could be killed mid-way"
            proc = popen_cli(args, db_url=db_url, master_key=master_key_uri)
            if _kill_after(proc, engine, job, int(NROWS * fractions[killed])):
                killed += 1
            else:
                # It finished before the kill (a loaded machine): give the next
                # pass real work again and try once more.
                for t in ("p0", "p1", "p2"):
                    keys.rotate(t)
        done = run_cli(args, db_url=db_url, master_key=master_key_uri)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["resumed_from"] is not None
        assert report["scanned"] < NROWS
        time.sleep(0.3)  # writers keep going on the finished table
    finally:
        stop.touch()
        for w in writers:
            w.wait(timeout=60)
    assert all(w.returncode == 0 for w in writers)

    last: dict[int, str] = {}
    for f in ledger_files:
        for line in f.read_text(encoding="utf-8").splitlines():
            i, v = line.split("\t", 1)
            last[int(i)] = v
    assert len(last) > 50  # the writers really wrote during the run
    rows = read_notes(engine, keys)
    active = active_key_ids(keys)
    assert len(rows) == NROWS
    for i, (plain, kid) in rows.items():
        assert kid in active, f"row {i} not on the active key"
        if i in last:
            assert plain == last[i], f"row {i} lost a concurrent write"
        else:
            assert plain.endswith(f"body {i}")
    keys.close()
    engine.dispose()


@pytest.mark.slow
def test_master_rotate_killed_midway_then_rerun(
    db_url: str, master_key_uri: str, tmp_path: Path
) -> None:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    tenants = [f"t{i:04d}" for i in range(150)]
    fill_notes(engine, keys, 300, tenants)
    new_uri = "file://" + str(tmp_path / "new.key")
    carnet.create_master_key(new_uri).close()
    args = ["master", "rotate", "--to", new_uri, "--batch", "1"]
    proc = popen_cli(args, db_url=db_url, master_key=master_key_uri)
    t = keys.table
    end = time.monotonic() + 60
    while True:
        with engine.connect() as conn:
            moved = conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.master_key_uri == new_uri)
            ).scalar_one()
        if moved >= 40 or proc.poll() is not None or time.monotonic() > end:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "rotation ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with engine.connect() as conn:
        uris = dict(
            conn.execute(
                sa.select(t.c.master_key_uri, sa.func.count()).group_by(t.c.master_key_uri)
            ).all()
        )
    assert uris.get(new_uri, 0) >= 40 and uris.get(master_key_uri, 0) > 0

    again = run_cli([*args, "--json"], db_url=db_url, master_key=master_key_uri)
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["already"] >= 40 and out["rewrapped"] + out["already"] == 150
    # The old master key is gone: everything still reads with the new one alone.
    Path(master_key_uri[len("file://") :]).unlink()
    keys.close()
    fresh = carnet.KeyManager(engine, master_key=new_uri)
    assert {r.master_key_uri for r in fresh.list_keys()} == {new_uri}
    rows = read_notes(engine, fresh)
    assert len(rows) == 300
    st = run_cli(["status", "--json"], db_url=db_url, master_key=new_uri)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["master_key_ok"] is True
    fresh.close()
    engine.dispose()
