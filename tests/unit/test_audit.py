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
from support.models import Base, Note

SECRET = "PLANTED-audit-secret-31c"


@pytest.fixture
def keys(tmp_path: Path, master_key_uri: str) -> Iterator[carnet.KeyManager]:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/a.db")
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)
    carnet.configure(keys)
    with Session(engine) as s:
        s.add_all([Note(practice_id=f"p{i % 2}", body=f"{SECRET} {i}") for i in range(30)])
        s.commit()
    yield keys
    carnet.configure(None)
    engine.dispose()


def _read_all(keys: carnet.KeyManager) -> int:
    with Session(keys.engine) as s:
        return len([n.body for n in s.scalars(sa.select(Note))])


def test_events_are_aggregated_per_principal_tenant_field(
    keys: carnet.KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carnet.audit")
    seen: list[AuditEvent] = []
    auditor = Auditor(sink=seen.append).install(keys)
    with principal_scope("dr.martin"):
        _read_all(keys)
    _read_all(keys)
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
    keys: carnet.KeyManager, caplog: pytest.LogCaptureFixture
) -> None:
    Auditor(budget=DecryptBudget(limit=40, window=3600, exempt=("reencrypt",))).install(keys)
    with principal_scope("scraper"):
        assert _read_all(keys) == 30
        with pytest.raises(DecryptBudgetExceeded) as ei:
            _read_all(keys)
    assert "scraper" in str(ei.value) and SECRET not in str(ei.value)
    assert "budget exceeded" in caplog.text
    with principal_scope("dr.other"):  # budgets are per principal
        assert _read_all(keys) == 30
    with principal_scope("reencrypt"):
        for _ in range(3):
            assert _read_all(keys) == 30


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
