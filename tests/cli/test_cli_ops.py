"""Operators' view of verify, reencrypt, status, keys list and master rotate, as subprocesses."""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from support.lifecycleutil import SECRET, fill_notes, run_cli


@pytest.fixture
def setup(db_url: str, master_key_uri: str) -> tuple[str, str]:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, 90)
    keys.close()
    engine.dispose()
    return db_url, master_key_uri


def _cli(setup: tuple[str, str], *args: str, **kw):  # type: ignore[no-untyped-def]
    url, mk = setup
    r = run_cli(list(args), db_url=url, master_key=mk, **kw)
    assert SECRET not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r


def _tamper(db_url: str, ids: range) -> None:
    engine = sa.create_engine(db_url)
    raw = sa.table("notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:
        for i in ids:
            b = bytes(conn.execute(sa.select(raw.c.body).where(raw.c.id == i)).scalar_one())
            conn.execute(raw.update().where(raw.c.id == i).values(body=b[:-1] + bytes([b[-1] ^ 1])))
    engine.dispose()


def test_verify_after_shred_passes_and_caps_printed_keys(setup: tuple[str, str]) -> None:
    assert _cli(setup, "keys", "destroy", "--tenant", "p2", "--yes").returncode == 0
    r = _cli(
        setup, "verify", "--table", "notes", "--column", "body", "--tenant-column", "practice_id"
    )
    # The weekly check stays green after an erasure: shredded rows are not failures.
    assert r.returncode == 0, r.stdout + r.stderr
    assert "30 destroyed" in r.stdout and "0 failed" in r.stdout
    assert "p2: 0 / 30 / 0" in r.stdout
    # 25 tampered rows of p0 and p1: failures, printed capped, listed in full in --json.
    _tamper(setup[0], range(0, 75, 3))
    _tamper(setup[0], range(1, 75, 3))
    r = _cli(setup, "verify", "--table", "notes", "--column", "body")
    assert r.returncode == 1
    assert "first 20 of 50" in r.stdout
    assert r.stdout.count("[") <= 25
    r = _cli(setup, "verify", "--table", "notes", "--column", "body", "--json")
    rep = json.loads(r.stdout)
    assert r.returncode == 1
    assert (rep["failed"], rep["destroyed"], len(rep["failed_pks"])) == (50, 30, 50)
    assert rep["reasons"] == {"tampered_or_foreign": 50}


def test_reencrypt_counts_nulls_and_shredded_apart(setup: tuple[str, str]) -> None:
    url, _ = setup
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET body = NULL WHERE id < 6"))
    engine.dispose()
    assert _cli(setup, "keys", "destroy", "--tenant", "p2", "--yes").returncode == 0
    assert _cli(setup, "keys", "rotate", "--tenant", "p1").returncode == 0
    r = _cli(setup, "reencrypt", "--table", "notes", "--column", "body", "--json")
    rep = json.loads(r.stdout)
    # ids 0..5 NULL (two per practice); p2's other 28 under destroyed keys;
    # p1's 28 re-encrypted; p0's 28 already on their active key.
    assert (rep["nulls"], rep["destroyed"], rep["rewritten"], rep["already_current"]) == (
        6,
        28,
        28,
        28,
    )
    r = _cli(setup, "reencrypt", "--table", "notes", "--column", "body")
    assert "56 already current" in r.stdout and "28 under destroyed" in r.stdout
    assert "6 NULL" in r.stdout


def test_reencrypt_finished_job_reruns_with_another_worker_count(setup: tuple[str, str]) -> None:
    assert _cli(setup, "keys", "rotate", "--all").returncode == 0
    r = _cli(
        setup,
        "reencrypt",
        "--table",
        "notes",
        "--column",
        "body",
        "--workers",
        "4",
        "--batch-size",
        "7",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rewritten"] == 90
    assert _cli(setup, "keys", "rotate", "--all").returncode == 0
    for args in (["--workers", "2"], [], ["--worker", "0/1"]):
        r = _cli(
            setup,
            "reencrypt",
            "--table",
            "notes",
            "--column",
            "body",
            "--batch-size",
            "7",
            "--json",
            *args,
        )
        assert r.returncode == 0, (args, r.stderr)
        rep = json.loads(r.stdout)
        assert rep["scanned"] == 90, args
    assert rep["already_current"] == 90


def test_progress_with_workers_reaches_100_percent(setup: tuple[str, str]) -> None:
    assert _cli(setup, "keys", "rotate", "--all").returncode == 0
    r = _cli(
        setup,
        "reencrypt",
        "--table",
        "notes",
        "--column",
        "body",
        "--workers",
        "2",
        "--batch-size",
        "5",
    )
    assert r.returncode == 0, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("reencrypt: 90/90 rows (100 %)"), r.stderr
    assert "rows/s" in last


def test_status_without_master_key_and_its_wording(setup: tuple[str, str], tmp_path: Path) -> None:
    url, mk = setup
    missing = "file://" + str(tmp_path / "gone.key")
    r = run_cli(
        ["status", "--no-master-check", "--table", "notes", "--column", "body"],
        db_url=url,
        master_key=missing,
    )
    assert r.returncode == 0, r.stderr
    assert "(not checked" in r.stdout and "(ok" not in r.stdout
    r = _cli(setup, "status", "--table", "notes", "--column", "body")
    assert "(ok" in r.stdout
    # A shredded practice's rows are not "to re-encrypt": they never can be.
    assert _cli(setup, "keys", "destroy", "--tenant", "p2", "--yes").returncode == 0
    r = _cli(setup, "status", "--table", "notes", "--column", "body")
    assert "0 not on the active key, 30 under destroyed keys" in r.stdout
    # Keys by practice then version, whatever their random ids.
    assert _cli(setup, "keys", "rotate", "--tenant", "p0").returncode == 0
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM notes WHERE id > 3"))
    engine.dispose()
    km_rows = json.loads(_cli(setup, "keys", "list", "--json").stdout)
    assert all(k["created_at"] for k in km_rows)
    r = _cli(setup, "reencrypt", "--table", "notes", "--column", "body", "--tenant", "p1")
    r = _cli(setup, "status", "--table", "notes", "--column", "body")
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("  p") and "row" in ln]
    assert [ln.split(" (")[0] for ln in lines] == ["p0 v1", "p1 v1", "p2 v1"], r.stdout
    assert "4 rows," in r.stdout and ": 1 row" in r.stdout and "1 rows" not in r.stdout
    # A blind-index root beside the data keys: the KIND column tells them apart.
    keys = carnet.KeyManager(url, master_key=setup[1])
    try:
        keys.index_roots("p0")
    finally:
        keys.close()
        keys.engine.dispose()
    r = _cli(setup, "keys", "list")
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "KEY",
        "ID",
        "PRACTICE",
        "KIND",
        "VERSION",
        "STATE",
        "MASTER",
        "KEY",
    ]
    kinds = {(ln.split()[1], ln.split()[2], ln.split()[3]) for ln in lines[1:]}
    assert ("p0", "index", "v1") in kinds and ("p0", "data", "v2") in kinds, r.stdout
    by_json = {
        (k["tenant"], k["kind"], k["version"])
        for k in json.loads(_cli(setup, "keys", "list", "--json").stdout)
    }
    assert {(t, k, f"v{v}") for t, k, v in by_json} == kinds


APP = """
import sqlalchemy as sa
import carnet

metadata = sa.MetaData()
sa.Table("notes", metadata, sa.Column("id", sa.Integer, primary_key=True),
         sa.Column("practice_id", sa.String(64)),
         sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
         sa.Column("summary", carnet.EncryptedText(tenant="practice_id", storage="text")))
sa.Table("letters", metadata, sa.Column("id", sa.Integer, primary_key=True),
         sa.Column("practice_id", sa.String(64)),
         sa.Column("text", carnet.EncryptedText(tenant="practice_id")))
"""


def test_status_reports_declared_empty_columns(setup: tuple[str, str], tmp_path: Path) -> None:
    url, _ = setup
    (tmp_path / "clinic_app.py").write_text(APP)
    engine = sa.create_engine(url)
    md = sa.MetaData()
    sa.Table(
        "letters",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("text", sa.LargeBinary),
    )
    md.create_all(engine)
    engine.dispose()
    r = _cli(setup, "status")
    assert "letters.text" not in r.stdout  # no rows: discovery by content cannot see it
    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = _cli(setup, "status", "--app", "clinic_app:metadata", "--json", extra_env=env)
    assert r.returncode == 0, r.stderr
    cols = {(c["table"], c["column"]): c for c in json.loads(r.stdout)["columns"]}
    assert cols[("letters", "text")]["found_by"] == "declared"
    assert cols[("notes", "body")]["found_by"] == "data"
    r = _cli(setup, "status", "--app", "clinic_app:metadata", extra_env=env)
    assert "letters.text: no rows yet (declared by the application)" in r.stdout


def test_master_rotate_counts_keys_and_states_the_rule(
    setup: tuple[str, str], tmp_path: Path
) -> None:
    url, mk = setup
    assert _cli(setup, "keys", "rotate", "--all").returncode == 0
    assert _cli(setup, "reencrypt", "--table", "notes", "--column", "body").returncode == 0
    assert _cli(setup, "reencrypt", "--table", "notes", "--column", "summary").returncode == 0
    old_p0 = [
        k["key_id"]
        for k in json.loads(_cli(setup, "keys", "list", "--json").stdout)
        if k["tenant"] == "p0" and k["state"] == "inactive"
    ][0]
    assert _cli(setup, "keys", "retire", old_p0).returncode == 0
    assert _cli(setup, "keys", "destroy", "--tenant", "p2", "--yes").returncode == 0
    new = "file://" + str(tmp_path / "m2.key")
    assert _cli(setup, "master", "new", new).returncode == 0
    r = _cli(setup, "master", "rotate", "--to", new)
    assert r.returncode == 0, r.stderr
    # p0: v2 live, v1 retired; p1: v1 inactive and v2 live; p2: two destroyed.
    assert "rewrapped 3 data key(s)" in r.stdout
    assert "1 retired and 2 destroyed key(s)" in r.stdout
    assert f"Previous master key {mk}: keep it until no backup" in r.stdout
    assert "no longer needed" not in r.stdout
    assert "rewrap: 6/6 keys (100 %)" in r.stderr and "rows" not in r.stderr
    r = _cli(setup, "master", "rotate", "--to", new, "--json")
    rep = json.loads(r.stdout)
    assert (rep["already"], rep["retired"], rep["destroyed"]) == (3, 1, 2)


def test_missing_master_key_names_the_one_that_wrapped_the_keys(
    setup: tuple[str, str], tmp_path: Path
) -> None:
    url, mk = setup
    Path(mk[len("file://") :]).unlink()
    r = _cli(setup, "keys", "list")
    assert r.returncode == 3
    assert "carnet master new" not in r.stderr
    assert f"under {mk}" in r.stderr and "restore that master key" in r.stderr
    assert r.stderr.count("\n") == 1
    # A brand-new database: creating a master key is the right advice.
    other = tmp_path / "empty.db"
    r = run_cli(["keys", "list"], db_url=f"sqlite:///{other}", master_key=mk)
    assert r.returncode == 3 and "carnet master new" in r.stderr


def test_json_timestamps_carry_a_utc_offset(setup: tuple[str, str]) -> None:
    for args in (["keys", "list", "--json"], ["keys", "rotate", "--all", "--json"]):
        rows = json.loads(_cli(setup, *args).stdout)
        for row in rows:
            for k in ("created_at", "updated_at"):
                ts = dt.datetime.fromisoformat(row[k])
                assert ts.utcoffset() == dt.timedelta(0), row[k]


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_sqlite_lock_wait_is_announced(setup: tuple[str, str]) -> None:
    url, _ = setup
    path = sa.engine.make_url(url).database
    assert path
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    timer = threading.Timer(3.5, locker.execute, args=("COMMIT",))
    timer.start()
    started = time.monotonic()
    try:
        r = _cli(setup, "keys", "rotate", "--tenant", "p1")
    finally:
        timer.join()
        locker.close()
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started >= 3
    assert "waiting for a lock on the SQLite database" in r.stderr
    assert "gives up after 30s" in r.stderr
    assert "got the SQLite lock after" in r.stderr


def test_verify_tenant_column_on_a_parent_table(db_url: str, master_key_uri: str) -> None:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    md = sa.MetaData()
    patients = sa.Table(
        "patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
    )
    consults = sa.Table(
        "consults",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("patient_id", sa.ForeignKey("patients.id")),
        sa.Column("comment", sa.LargeBinary),
    )
    md.create_all(engine)
    for t in ("p0", "p1"):
        keys.ensure_key(t)  # before the transaction: SQLite has one writer
    with engine.begin() as conn:
        conn.execute(
            patients.insert(), [{"id": 1, "practice_id": "p0"}, {"id": 2, "practice_id": "p1"}]
        )
        conn.execute(
            consults.insert(),
            [
                {
                    "id": i,
                    "patient_id": 1 + i % 2,
                    "comment": keys.encrypt(
                        f"{SECRET} {i}".encode(), tenant=f"p{i % 2}", label="consults.comment"
                    ),
                }
                for i in range(10)
            ],
        )
        # p1's note pasted into a consultation of a p0 patient
        conn.execute(
            consults.update()
            .where(consults.c.id == 0)
            .values(
                comment=conn.execute(
                    sa.select(consults.c.comment).where(consults.c.id == 1)
                ).scalar_one()
            )
        )
    keys.close()
    engine.dispose()
    r = run_cli(
        [
            "verify",
            "--table",
            "consults",
            "--column",
            "comment",
            "--tenant-column",
            "patients.practice_id",
            "--json",
        ],
        db_url=db_url,
        master_key=master_key_uri,
    )
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["reasons"] == {"other_practice": 1} and rep["failed_pks"] == [[0]]
    assert rep["ok"] == 9
    r = run_cli(
        [
            "verify",
            "--table",
            "consults",
            "--column",
            "comment",
            "--tenant-column",
            "nowhere.practice_id",
        ],
        db_url=db_url,
        master_key=master_key_uri,
    )
    assert r.returncode == 2 and r.stderr.startswith("carnet: error:")
