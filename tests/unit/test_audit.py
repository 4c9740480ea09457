from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet.audit import AuditEvent, Auditor, DecryptBudget, principal_scope
from carnet.errors import ConfigurationError, DecryptBudgetExceeded
from support.models import Base, Note, configured_keys

SECRET = "PLANTED-audit-secret-31c"


@pytest.fixture
def sqlite_keys(tmp_path: Path, master_key_uri: str) -> Iterator[carnet.KeyManager]:
    """The shared ``keys``'s setup on a SQLite file of its own, with 30 notes to read.

    These tests run once, not once per backend; the notes are of practices p0 and p1.
    """
    engine = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    try:
        with configured_keys(engine, master_key_uri, (Base.metadata,)) as keys:
            with Session(engine) as s:
                s.add_all([Note(practice_id=f"p{i % 2}", body=f"{SECRET} {i}") for i in range(30)])
                s.commit()
            yield keys
    finally:
        engine.dispose()


def _read_all(keys: carnet.KeyManager) -> int:
    with Session(keys.engine) as s:
        return len([n.body for n in s.scalars(sa.select(Note))])


def test_events_are_aggregated_per_principal_tenant_field(
    sqlite_keys: carnet.KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carnet.audit")
    seen: list[AuditEvent] = []
    auditor = Auditor(sink=seen.append).install(sqlite_keys)
    with principal_scope("dr.martin"):
        _read_all(sqlite_keys)
    _read_all(sqlite_keys)
    events = auditor.flush()
    assert {(e.principal, e.tenant, e.field, e.count) for e in events} == {
        ("dr.martin", "p0", "notes.body", 15),
        ("dr.martin", "p1", "notes.body", 15),
        ("<none>", "p0", "notes.body", 15),
        ("<none>", "p1", "notes.body", 15),
    }
    assert seen == events
    assert "dr.martin" in caplog.text and SECRET not in caplog.text


def test_budget_stops_a_bulk_read(
    sqlite_keys: carnet.KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    Auditor(budget=DecryptBudget(limit=40, window=3600, exempt=("reencrypt",))).install(sqlite_keys)
    with principal_scope("scraper"):
        assert _read_all(sqlite_keys) == 30
        with pytest.raises(DecryptBudgetExceeded) as ei:
            _read_all(sqlite_keys)
    assert "scraper" in str(ei.value) and SECRET not in str(ei.value)
    assert "budget exceeded" in caplog.text
    with principal_scope("dr.other"):  # budgets are per principal
        assert _read_all(sqlite_keys) == 30
    with principal_scope("reencrypt"):
        for _ in range(3):
            assert _read_all(sqlite_keys) == 30


def test_budget_window_resets() -> None:
    b = DecryptBudget(limit=2, window=0.05)
    b.charge("u")
    b.charge("u")
    with pytest.raises(DecryptBudgetExceeded):
        b.charge("u")
    import time

    time.sleep(0.06)
    b.charge("u")


def test_bad_budget_and_principal() -> None:
    with pytest.raises(ConfigurationError):
        DecryptBudget(limit=0, window=1)
    with pytest.raises(ConfigurationError), principal_scope(""):
        pass


def _frame_texts(exc: BaseException) -> str:
    """Every string and bytes local of every frame of ``exc``'s traceback and chain,
    as an error reporter that records frame locals would keep them."""
    out: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                if isinstance(value, str | bytes | bytearray):
                    out.append(value if isinstance(value, str) else bytes(value).decode("latin-1"))
            tb = tb.tb_next
        todo += [e.__cause__, e.__context__]
    return "\n".join(out)


@pytest.mark.parametrize("how", ["orm", "core", "sealed"])
def test_a_read_the_budget_refuses_leaves_no_text_in_any_frame(
    sqlite_keys: carnet.KeyManager, how: str
) -> None:
    Auditor(budget=DecryptBudget(limit=5, window=3600)).install(sqlite_keys)
    refused: list[BaseException] = []
    with principal_scope("scraper"):
        with Session(sqlite_keys.engine) as s:
            ids = s.scalars(sa.select(Note.id).order_by(Note.id)).all()
        for note_id in ids:
            try:
                with Session(sqlite_keys.engine) as s:
                    if how == "orm":
                        note = s.get(Note, note_id)
                        assert note is not None and note.body
                    elif how == "core":
                        row = s.execute(sa.select(Note.practice_id).where(Note.id == note_id)).one()
                        with carnet.tenant_scope(row.practice_id):
                            s.execute(
                                sa.select(Note.__table__.c.body).where(Note.id == note_id)
                            ).all()
                    else:
                        # Core, outside a scope: a Sealed placeholder, opened by hand.
                        sealed = s.execute(
                            sa.select(Note.__table__.c.body, Note.practice_id).where(
                                Note.id == note_id
                            )
                        ).one()
                        sealed.body.open(sealed.practice_id)
            except DecryptBudgetExceeded as exc:
                refused.append(exc)
    assert len(refused) == 25
    for exc in refused:
        assert SECRET not in _frame_texts(exc)
