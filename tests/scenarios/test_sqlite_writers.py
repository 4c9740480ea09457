"""SQLite with several writers: a new practice's first key waits for another writer like a
plain INSERT does, and when SQLite cannot wait the error says why and what to change."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet.errors import ConfigurationError
from support.models import Note, comments, configured_keys

pytestmark = pytest.mark.parametrize("db_kind", ["sqlite"])


def _hold_write_lock(path: str, seconds: float) -> threading.Thread:
    """Another connection takes SQLite's write lock and releases it after ``seconds``."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO notes (id, practice_id) VALUES (1000, 'other')")

    def release() -> None:
        time.sleep(seconds)
        other.execute("COMMIT")
        other.close()

    t = threading.Thread(target=release)
    t.start()
    return t


def _path(engine: sa.Engine) -> str:
    return str(Path(engine.url.database or ""))


@pytest.mark.parametrize("api", ["orm", "core"])
def test_first_key_waits_for_another_writer_like_a_plain_insert(
    db_kind: str, keys: carnet.KeyManager, engine: sa.Engine, api: str
) -> None:
    holder = _hold_write_lock(_path(engine), 1.0)
    t0 = time.monotonic()
    if api == "orm":
        with Session(engine) as s:
            s.add(Note(id=1, practice_id="new-practice", body="premier"))
            s.commit()
    else:
        with carnet.tenant_scope("core-practice"), engine.begin() as conn:
            conn.execute(comments.insert(), {"id": 1, "text": "premier"})
    waited = time.monotonic() - t0
    holder.join()
    assert 0.8 < waited < 4.0  # it waited for the other writer, then went on
    keys.clear_cache()
    with Session(engine) as s:
        assert [n.body for n in s.scalars(sa.select(Note).where(Note.id < 1000))] == (
            ["premier"] if api == "orm" else []
        )


def test_a_transaction_that_read_first_fails_at_once_with_an_accurate_error(
    db_kind: str, keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN")  # the transaction starts, and reads
        conn.execute(sa.select(sa.func.count()).select_from(Note.__table__)).scalar_one()
        holder = _hold_write_lock(_path(engine), 1.5)
        t0 = time.monotonic()
        with carnet.tenant_scope("late-practice"), pytest.raises(ConfigurationError) as ei:
            conn.execute(comments.insert(), {"id": 1, "text": "x"})
        took = time.monotonic() - t0
        conn.exec_driver_sql("ROLLBACK")
    holder.join()
    assert took < 1.0  # SQLite cannot make a reader wait: no point in waiting
    message = str(ei.value)
    assert "already read" in message and "ensure_key" in message and "BEGIN IMMEDIATE" in message
    assert ei.value.__context__ is None and ei.value.__cause__ is None


def test_waiting_past_the_busy_timeout_says_so(
    db_kind: str, db_url: str, tmp_path: Path, master_key_uri: str
) -> None:
    engine = sa.create_engine(db_url, connect_args={"timeout": 0.5})
    try:
        with configured_keys(engine, master_key_uri):
            holder = _hold_write_lock(_path(engine), 2.0)
            with Session(engine) as s:
                s.add(Note(id=1, practice_id="slow-practice", body="x"))
                with pytest.raises(ConfigurationError, match="busy timeout"):
                    s.commit()
            holder.join()
    finally:
        engine.dispose()
