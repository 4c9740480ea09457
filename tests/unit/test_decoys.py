"""Decoy notes (carnet.decoys): planted, indistinguishable in the table, the alarm on
every read path, and none from carnet's own commands."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from carnet import decoys, envelope, transforms
from carnet.audit import Auditor, AuditTrail, DecryptBudget, principal_scope
from carnet.audit_store import ALERT
from carnet.cli import cli
from carnet.errors import DecoyOpened, DecryptBudgetExceeded
from carnet.keystore import DECOY
from support.models import Note

SECRET = "PLANTED-decoy-real-note"


class SBase(DeclarativeBase):
    pass


class Patient(SBase):
    __tablename__ = "decoy_patients"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    phone: Mapped[str] = mapped_column(carnet.EncryptedString(20, tenant="practice_id"))
    phone_bidx = carnet.BlindIndex("phone", transform=transforms.phone_fr, bits=4)


@pytest.fixture
def practice_notes(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """Twenty real notes, ten in each of the practices p1 and p2, of varied lengths."""
    with Session(engine) as s:
        s.add_all(
            # Ids from the database (its sequence), as an application's are.
            Note(
                practice_id=f"p{i % 2 + 1}",
                body=f"{SECRET} {i} " + "x" * (40 + 7 * i),
                summary=f"summary {i}",
            )
            for i in range(1, 21)
        )
        s.commit()


def _cli(db_url: str, mk: str, *args: str) -> Any:
    res = CliRunner().invoke(
        cli, list(args), env={"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": mk}
    )
    assert SECRET not in res.output
    return res


def _plant(db_url: str, mk: str, count: int = 3) -> list[dict[str, Any]]:
    r = _cli(db_url, mk, "decoys", "plant", "--table", "notes", "--column", "body",
             "--practice", "p1", "--count", str(count), "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    planted: list[dict[str, Any]] = json.loads(r.stdout)["planted"]
    return planted


def test_planted_decoys_look_like_the_practice_notes(
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    keys: carnet.KeyManager,
    practice_notes: None,
) -> None:
    planted = _plant(db_url, master_key_uri, 5)
    ids = {p["id"] for p in planted}
    assert len(ids) == 5
    raw = sa.Table("notes", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(raw.c.id, raw.c.body).where(raw.c.practice_id == "p1"))
        blobs = {r.id: bytes(r.body) for r in rows}
    real = [b for i, b in blobs.items() if i not in ids]
    fake = [b for i, b in blobs.items() if i in ids]
    # Same format and header shape: version, a 16-byte key id, the label, the practice.
    for b in fake:
        assert envelope.is_current(b)
        assert len(envelope.key_id_of(b)) == len(envelope.key_id_of(real[0]))
        assert b[:1] == real[0][:1]
        start = 1 + envelope.KEY_ID_SIZE
        end = start + envelope.LABEL_TAG_SIZE + len(envelope.practice_field("p1"))
        assert b[start:end] == real[0][start:end]
    # Sizes drawn from the practice's own notes.
    assert {len(b) for b in fake} <= {len(b) for b in real}
    # What tells them apart: the key table, by kind.
    kinds = {keys.get_key(envelope.key_id_of(b)).kind for b in fake}  # type: ignore[union-attr]
    assert kinds == {DECOY}
    assert keys.is_decoy(envelope.key_id_of(fake[0]))
    assert not keys.is_decoy(envelope.key_id_of(real[0]))
    # The database's own checks took the decoy rows (the key is the row's practice's).
    r = _cli(db_url, master_key_uri, "decoys", "list", "--json")
    assert {d["row_key"]["id"] for d in json.loads(r.stdout)} == ids


def _alarmed(
    keys: carnet.KeyManager, tmp_path: Path, **kw: Any
) -> tuple[list[decoys.Alert], AuditTrail]:
    trail = AuditTrail(keys, f"sqlite:///{tmp_path / 'trail.db'}", background=False)
    Auditor(trail=trail).install(keys)
    alerts: list[decoys.Alert] = []
    decoys.DecoyAlarm(hook=alerts.append, **kw).install(keys)
    return alerts, trail


def _alerts_recorded(trail: AuditTrail) -> list[dict[str, Any]]:
    return [r for r in trail.store.walk() if r["kind"] == ALERT]


def _read_paths(engine: sa.Engine, ids: set[int]) -> dict[str, Any]:
    decoy_id = min(ids)
    notes = Note.__table__

    def orm() -> Any:
        with Session(engine) as s:
            return [n.body for n in s.scalars(sa.select(Note).where(Note.practice_id == "p1"))]

    def core() -> Any:
        with carnet.tenant_scope("p1"), engine.connect() as conn:
            return conn.execute(sa.select(notes.c.body).where(notes.c.id == decoy_id)).all()

    def sealed_open() -> Any:
        with Session(engine) as s:
            v = s.scalars(sa.select(Note.body).where(Note.id == decoy_id)).one()
            assert isinstance(v, carnet.Sealed)
            return v.open("p1")

    return {"orm": orm, "core": core, "sealed": sealed_open}


@pytest.mark.parametrize("path", ["orm", "core", "sealed"])
@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_each_read_path_raises_the_alarm_and_is_refused(
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    keys: carnet.KeyManager,
    practice_notes: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    ids = {p["id"] for p in _plant(db_url, master_key_uri)}
    alerts, trail = _alarmed(keys, tmp_path)
    caplog.set_level(logging.INFO, "carnet")
    with principal_scope("scraper"), pytest.raises(DecoyOpened) as info:
        _read_paths(engine, ids)[path]()
    assert "scraper" in str(info.value) and SECRET not in str(info.value)
    crit = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert crit and "scraper" in crit[0].getMessage()
    assert [(a.principal, a.practice) for a in alerts] == [("scraper", "p1")]
    rec = _alerts_recorded(trail)
    assert [(r["principal"], r["practice"]) for r in rec] == [("scraper", "p1")]
    assert trail.store.verify().ok
    # Every read alarms again: nothing about the decoy is cached.
    with principal_scope("scraper"), pytest.raises(DecoyOpened):
        _read_paths(engine, ids)[path]()
    assert len(alerts) == 2
    trail.close()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_a_search_that_opens_a_decoy_candidate(
    engine: sa.Engine, master_key_uri: str, tmp_path: Path
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    SBase.metadata.create_all(engine)
    carnet.configure(keys)
    try:
        with Session(engine) as s:
            s.add(Patient(id=1, practice_id="p1", phone="06 39 98 00 01"))
            s.commit()
        t = sa.Table("decoy_patients", sa.MetaData(), autoload_with=engine)
        with engine.connect() as conn:
            bidx = conn.execute(sa.select(t.c.phone_bidx)).scalar_one()
        # From the application: the decoy patient's other columns filled, its index
        # in the same bucket as a real number.
        decoys.plant(keys, engine, "decoy_patients", "phone", "p1", 1,
                     other=lambda i: {"id": 100 + i, "phone_bidx": bidx})  # fmt: skip
        alerts, trail = _alarmed(keys, tmp_path)
        with Session(engine) as s, principal_scope("scraper"), pytest.raises(DecoyOpened):
            carnet.search(s, Patient.phone_bidx, "0639980001", tenant="p1")
        assert len(alerts) == 1 and _alerts_recorded(trail)
        # Re-indexing after a root rotation: the real row gets its new index, the
        # decoy is recognised by its key, never opened, its index left as planted.
        keys.rotate_index_root("p1")
        rep = carnet.reindex(engine, Patient.phone_bidx, tenant="p1", manager=keys)
        assert len(alerts) == 1
        with engine.connect() as conn:
            got = dict(conn.execute(sa.select(t.c.id, t.c.phone_bidx)).all())
        assert got[100] == bidx and rep.scanned == 2 and not rep.failed, rep
        trail.close()
    finally:
        carnet.configure(None)
        keys.close()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_let_through_and_stop_the_principal(
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    keys: carnet.KeyManager,
    practice_notes: None,
    tmp_path: Path,
) -> None:
    ids = {p["id"] for p in _plant(db_url, master_key_uri, 1)}
    budget = DecryptBudget(1000, 60, store=f"sqlite:///{tmp_path / 'budget.db'}")
    Auditor(budget=budget).install(keys)
    alerts: list[decoys.Alert] = []
    alarm = decoys.DecoyAlarm(hook=alerts.append, refuse=False).install(keys)
    with principal_scope("curious"), Session(engine) as s:
        body = s.get(Note, min(ids)).body  # type: ignore[union-attr]
        assert isinstance(body, str) and body  # let through, the alarm raised
        assert len(alerts) == 1
    # With stop=: the principal's budget is used up at once, this read included.
    alarm.stop = budget
    with principal_scope("curious"), Session(engine) as s:
        with pytest.raises(DecryptBudgetExceeded):
            s.get(Note, min(ids), populate_existing=True)
        assert len(alerts) == 2
        with pytest.raises(DecryptBudgetExceeded):
            s.get(Note, 2, populate_existing=True)
    # In every process sharing the budget.
    other = DecryptBudget(1000, 60, store=f"sqlite:///{tmp_path / 'budget.db'}")
    with pytest.raises(DecryptBudgetExceeded):
        other.charge("curious")


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_carnet_own_commands_never_raise_the_alarm(
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    keys: carnet.KeyManager,
    practice_notes: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = {p["id"] for p in _plant(db_url, master_key_uri)}
    caplog.set_level(logging.INFO, "carnet")
    run = lambda *a: _cli(db_url, master_key_uri, *a)  # noqa: E731
    r = run("status", "--json")
    assert r.exit_code == 0, r.output
    r = run("doctor", "--json")
    assert r.exit_code == 0, r.output
    old = [k["key_id"] for k in json.loads(run("keys", "list", "--json").stdout)
           if k["tenant"] == "p1" and k["kind"] == "data"][0]  # fmt: skip
    assert run("keys", "rotate", "--all").exit_code == 0
    for col in ("body", "summary"):
        r = run("reencrypt", "--table", "notes", "--column", col, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["rewritten"] == 20  # the real notes; decoys stay
    r = run("keys", "retire", old)
    assert r.exit_code == 0, r.output
    r = run("verify", "--table", "notes", "--column", "body", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ok"] == 20 + len(ids)
    out = tmp_path / "export.jsonl"
    r = run("export", "--table", "notes", "--tenant", "p1", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    exported = out.read_text()
    assert SECRET in exported  # the practice's notes...
    lines = [json.loads(x) for x in exported.splitlines() if x.strip()]
    assert not any(str(i) in {str(v) for v in _ids_in(x)} for x in lines for i in ids)
    # migrate classifies stored values through verify: a decoy in a text column
    # is a sealed value of the practice, never opened.
    r = run("decoys", "plant", "--table", "notes", "--column", "summary", "--practice", "p1")
    assert r.exit_code == 0, r.output
    r = run("migrate", "verify", "--table", "notes", "--column", "summary",
            "--tenant", "practice_id", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["totals"]["sealed"] == 20 + 1  # the decoy among them
    # A master key rotation rewraps the decoy keys too (under their own kind).
    carnet.create_master_key(f"file://{tmp_path}/new.key").close()
    r = run("master", "rotate", "--to", f"file://{tmp_path}/new.key", "--json")
    assert r.exit_code == 0, r.output
    assert "DECOY" not in caplog.text
    assert not [x for x in caplog.records if x.levelno >= logging.CRITICAL]


def _ids_in(line: Any) -> list[Any]:
    """The ``id`` values anywhere in an exported line."""
    if isinstance(line, dict):
        return [v for k, v in line.items() if k == "id"] + [
            x for v in line.values() for x in _ids_in(v)
        ]
    if isinstance(line, list):
        return [x for v in line for x in _ids_in(v)]
    return []


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_remove_and_shredded_with_the_practice(
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    keys: carnet.KeyManager,
    practice_notes: None,
) -> None:
    _plant(db_url, master_key_uri, 4)
    first = decoys.list_decoys(engine)[0]
    r = _cli(db_url, master_key_uri, "decoys", "remove", "--id", str(first["id"]), "--yes")
    assert r.exit_code == 0, r.output
    notes = Note.__table__
    with engine.connect() as conn:
        left = set(conn.execute(sa.select(notes.c.id)).scalars())
    assert first["row_key"]["id"] not in left
    assert {d["row_key"]["id"] for d in decoys.list_decoys(engine)} <= left
    assert len(decoys.list_decoys(engine)) == 3
    # Destroying the practice shreds its decoy key with its data keys.
    keys.destroy("p1")
    assert all(k.wrapped_key is None for k in keys.list_keys("p1") if k.kind == DECOY) and any(
        k.kind == DECOY for k in keys.list_keys("p1")
    )


def test_a_key_table_from_before_decoys_is_upgraded(
    engine: sa.Engine, master_key_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carnet import keystore

    # The key table as the release before decoys made it.
    monkeypatch.setattr(keystore, "_KIND_CHECK", "kind IN ('data', 'index', 'audit')")
    old = carnet.KeyManager(engine, master_key=master_key_uri)
    old.create_schema()
    carnet.configure(old)
    Note.__table__.create(engine)
    with Session(engine) as s, carnet.tenant_scope("p1"):
        s.add(Note(practice_id="p1", body="a note"))
        s.commit()
    with pytest.raises(carnet.errors.ConfigurationError, match="upgrades it"):
        decoys.decoy_key(old, "p1")
    old.close()
    monkeypatch.undo()
    # carnet init (create_schema) upgrades the kind check; the keys stay.
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    carnet.configure(keys)
    try:
        rec = decoys.decoy_key(keys, "p1")
        assert rec.kind == DECOY and rec.tenant == "p1"
        with Session(engine) as s, carnet.tenant_scope("p1"):
            assert [n.body for n in s.scalars(sa.select(Note))] == ["a note"]
    finally:
        carnet.configure(None)
        keys.close()
