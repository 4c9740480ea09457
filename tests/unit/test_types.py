"""EncryptedText on SQLite, PostgreSQL and MariaDB: ORM, Core, edge values, integrity, operators."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, configure_mappers, mapped_column

import carnet
from carnet import envelope
from carnet.errors import (
    CarnetError,
    ConfigurationError,
    InvalidCiphertext,
    TenantMismatch,
    TenantRequired,
    UnsupportedOperation,
)
from support.dbutil import drop_checks
from support.models import Note, comments
from support.paths import TESTS


def _raw(engine: sa.Engine, table: str, column: str, pk: int) -> object:
    with engine.connect() as conn:
        return conn.execute(
            sa.text(f"SELECT {column} FROM {table} WHERE id = :id"), {"id": pk}
        ).scalar_one()


def test_orm_round_trip_and_storage_is_ciphertext(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    if engine.dialect.name in ("mysql", "mariadb"):
        # pymysql sends binary parameters escaped, about twice their size: a 10 MB
        # note needs a max_allowed_packet above the 16 MB default (docs/quickstart.md).
        with engine.connect() as conn:
            conn.execute(sa.text("SET GLOBAL max_allowed_packet = 268435456"))
        engine.dispose()
    texts = {
        "empty": "",
        "french": "Patiente anxieuse, suivi dépression ; évoque des violences 🩺",
        "big": "x" * (10 * 1024 * 1024),
    }
    with Session(engine) as s:
        notes = {
            k: Note(practice_id="cabinet-lyon-3", body=v, summary=v[:1000])
            for k, v in texts.items()
        }
        notes["null"] = Note(practice_id="cabinet-lyon-3", body=None)
        s.add_all(notes.values())
        s.commit()
        ids = {k: n.id for k, n in notes.items()}
    with Session(engine) as s:
        for k, v in texts.items():
            n = s.get(Note, ids[k])
            assert n is not None and n.body == v and n.summary == v[:1000]
            assert type(n.body) is str
        assert s.get(Note, ids["null"]).body is None  # type: ignore[union-attr]
    raw = _raw(engine, "notes", "body", ids["french"])
    assert isinstance(raw, bytes | memoryview) and b"anxieuse" not in bytes(raw)
    assert bytes(raw)[0] == 2  # format v2, naming the row's practice in its header
    assert envelope.tenant_of(bytes(raw)) == "cabinet-lyon-3"
    raw_text = _raw(engine, "notes", "summary", ids["french"])
    assert (
        isinstance(raw_text, str) and raw_text.startswith("carnet:") and "anxieuse" not in raw_text
    )
    assert _raw(engine, "notes", "body", ids["null"]) is None


def test_orm_update_and_tenant_change_reseal(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        n = Note(practice_id="p1", body="first")
        s.add(n)
        s.commit()
        n.body = "second"
        s.commit()
        assert n.body == "second"
        n.practice_id = "p2"  # body untouched: must be re-sealed for p2
        s.commit()
        nid = n.id
    with Session(engine) as s:
        n2 = s.get(Note, nid)
        assert n2 is not None and (n2.practice_id, n2.body) == ("p2", "second")
    with engine.connect() as conn:
        blob = conn.execute(sa.text("SELECT body FROM notes WHERE id=:i"), {"i": nid}).scalar_one()
    assert bytes(blob)[1:17] == keys.ensure_key("p2").key_id


def test_missing_tenant_writes_nothing(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(Note(practice_id=None, body="PLANTED-SECRET-1"))
        with pytest.raises(TenantRequired) as ei:
            s.commit()
        assert "PLANTED-SECRET-1" not in str(ei.value)
    with engine.begin() as conn:
        with pytest.raises(TenantRequired) as ei2:
            conn.execute(comments.insert(), {"id": 1, "text": "PLANTED-SECRET-2"})
        assert "PLANTED-SECRET-2" not in str(ei2.value)
        assert "PLANTED-SECRET-2" not in repr(ei2.value.__cause__) + repr(ei2.value.__context__)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM notes")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM comments")).scalar_one() == 0


def test_core_with_tenant_scope(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(
            comments.insert(), [{"id": i, "text": f"commentaire {i}"} for i in range(1, 51)]
        )
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        rows = conn.execute(sa.select(comments.c.id, comments.c.text).order_by(comments.c.id)).all()
    assert [r.text for r in rows] == [f"commentaire {i}" for i in range(1, 51)]
    with engine.connect() as conn:  # no tenant: opaque Sealed values, never bytes posing as text
        sealed = conn.execute(sa.select(comments.c.text).where(comments.c.id == 3)).scalar_one()
    assert isinstance(sealed, carnet.Sealed) and "commentaire" not in repr(sealed)
    assert sealed.open("p1") == "commentaire 3"
    with carnet.tenant_scope("p2"), engine.connect() as conn, pytest.raises(TenantMismatch):
        conn.execute(sa.select(comments.c.text)).all()


def test_orm_read_under_wrong_scope_is_refused(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(Note(practice_id="p1", body="for p1"))
        s.commit()
    with Session(engine) as s, carnet.tenant_scope("p2"), pytest.raises(CarnetError):
        s.scalars(sa.select(Note)).all()
    with Session(engine) as s, carnet.tenant_scope("p2"):
        s.add(Note(practice_id="p1", body="x"))
        with pytest.raises(TenantMismatch):
            s.commit()


def _insert_two(engine: sa.Engine) -> tuple[int, int]:
    with Session(engine) as s:
        a = Note(practice_id="p1", body="note of p1", summary="s1")
        b = Note(practice_id="p2", body="note of p2", summary="s2")
        s.add_all([a, b])
        s.commit()
        return a.id, b.id


def _copy_cell(engine: sa.Engine, src_col: str, src: int, dst_col: str, dst: int) -> None:
    with engine.begin() as conn:
        # The database would refuse a value pasted from another practice's row:
        # these tests check what a read does when one is there anyway (checks
        # dropped by a DBA, rows from before them).
        drop_checks(conn, Note)
        v = conn.execute(
            sa.text(f"SELECT {src_col} FROM notes WHERE id=:i"), {"i": src}
        ).scalar_one()
        conn.execute(sa.text(f"UPDATE notes SET {dst_col}=:v WHERE id=:i"), {"v": v, "i": dst})


def test_value_moved_to_another_practice_row_fails(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    a, b = _insert_two(engine)
    _copy_cell(engine, "body", a, "body", b)
    with Session(engine) as s, pytest.raises(CarnetError) as ei:
        s.get(Note, b)
    assert "note of p1" not in str(ei.value)


def test_value_moved_to_another_column_fails(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    a, _ = _insert_two(engine)

    def move(conn: sa.Connection) -> None:  # body (binary) -> summary (text form), same row
        v = conn.execute(sa.text("SELECT body FROM notes WHERE id=:i"), {"i": a}).scalar_one()
        conn.execute(
            sa.text("UPDATE notes SET summary=:v WHERE id=:i"),
            {"v": carnet.envelope.to_text(bytes(v)), "i": a},
        )

    # The database refuses it: the value's label tag is not the column's.
    with engine.begin() as conn, pytest.raises(InvalidCiphertext) as refused:
        move(conn)
    assert refused.value.constraint == "carnet_f2_notes_summary"
    # With the checks dropped (by a DBA, say), the read still refuses it.
    with engine.begin() as conn:
        drop_checks(conn, Note)
        move(conn)
    with Session(engine) as s, pytest.raises(InvalidCiphertext):
        s.get(Note, a)


def test_one_flipped_bit_fails(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    a, _ = _insert_two(engine)
    blob = bytearray(bytes(_raw(engine, "notes", "body", a)))  # type: ignore[arg-type]
    blob[-1] ^= 1
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET body=:v WHERE id=:i"), {"v": bytes(blob), "i": a})
    with Session(engine) as s, pytest.raises(InvalidCiphertext):
        s.get(Note, a)


def test_plaintext_in_a_strict_text_column_is_an_error(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    a, _ = _insert_two(engine)
    with engine.begin() as conn:
        # The database refuses plaintext in the column; a read must refuse it
        # too where it is there anyway (checks dropped, rows from before them).
        drop_checks(conn, Note)
        conn.execute(sa.text("UPDATE notes SET summary='legacy plaintext' WHERE id=:i"), {"i": a})
    with Session(engine) as s, pytest.raises(InvalidCiphertext) as ei:
        s.get(Note, a)
    assert "legacy plaintext" not in str(ei.value)


def test_mixed_read_returns_legacy_plaintext_and_counts(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    md = sa.MetaData()
    t = sa.Table(
        "legacy",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("c", carnet.EncryptedText(storage="text", mixed_read=True)),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO legacy (id, c) VALUES (1, 'old plain note')"))
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(t.insert(), {"id": 2, "c": "new sealed note"})
        got = dict(conn.execute(sa.select(t.c.id, t.c.c)).all())  # type: ignore[arg-type]
    assert got == {1: "old plain note", 2: "new sealed note"}
    assert keys.stats()["legacy_plaintext_reads"] == 1
    assert str(_raw(engine, "legacy", "c", 2)).startswith("carnet:")


@pytest.mark.parametrize(
    "expr",
    [
        lambda c: c == "x",
        lambda c: c != "x",
        lambda c: c.like("%x%"),
        lambda c: c.ilike("x"),
        lambda c: c.in_(["a", "b"]),
        lambda c: c.startswith("a"),
        lambda c: c > "a",
        lambda c: c.desc(),
        lambda c: "x" == c,
    ],
)
def test_comparisons_on_encrypted_columns_raise(expr: object) -> None:
    with pytest.raises(UnsupportedOperation):
        expr(Note.body)  # type: ignore[operator]
    with pytest.raises(UnsupportedOperation):
        expr(comments.c.text)  # type: ignore[operator]


def test_null_checks_are_allowed(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    _insert_two(engine)
    with Session(engine) as s:
        s.add(Note(practice_id="p1", body=None))
        s.commit()
        assert s.scalar(sa.select(sa.func.count()).where(Note.body.is_(None))) == 1
        assert s.scalar(sa.select(sa.func.count()).where(Note.body == None)) == 1  # noqa: E711
        assert s.scalar(sa.select(sa.func.count()).where(Note.body.is_not(None))) == 2


def test_statement_cache_key_holds_no_manager_or_key(keys: carnet.KeyManager) -> None:
    t = Note.__table__.c.body.type
    key = repr(t._static_cache_key)
    assert "KeyManager" not in key and "manager" not in key
    assert t._static_cache_key == carnet.EncryptedText(tenant="practice_id")._static_cache_key


def test_shared_instance_on_two_columns_is_refused() -> None:
    shared = carnet.EncryptedText()
    md = sa.MetaData()
    sa.Table("a", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("x", shared))
    with pytest.raises(ConfigurationError):
        sa.Table("b", md, sa.Column("id", sa.Integer, primary_key=True), sa.Column("y", shared))


def test_explicit_label_survives_a_rename(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    md = sa.MetaData()
    old = sa.Table(
        "old_name",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("c", carnet.EncryptedText(label="stable-label")),
    )
    md.create_all(engine)
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(old.insert(), {"id": 1, "c": "kept"})
        conn.execute(sa.text("ALTER TABLE old_name RENAME TO new_name"))
    md2 = sa.MetaData()
    new = sa.Table(
        "new_name",
        md2,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("c", carnet.EncryptedText(label="stable-label")),
    )
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        assert conn.execute(sa.select(new.c.c)).scalar_one() == "kept"


def test_unknown_tenant_attribute_fails_at_configuration() -> None:
    class B(DeclarativeBase):
        pass

    class Bad(B):
        __tablename__ = "bad"
        id: Mapped[int] = mapped_column(primary_key=True)
        body: Mapped[str] = mapped_column(carnet.EncryptedText(tenant="practice"))

    with pytest.raises(ConfigurationError, match="practice"):
        configure_mappers()
    B.registry.dispose()


def test_models_import_before_configuration(tmp_path: Path) -> None:
    code = (
        "import carnet, sqlalchemy as sa\n"
        "from support.models import Note\n"
        "assert Note.__table__.c.body.type.field_label == 'notes.body'\n"
        "try:\n    carnet.get_manager()\nexcept carnet.errors.ConfigurationError: print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "ok"


def test_new_practice_after_a_write_in_the_same_transaction(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    # On SQLite the session holds the write lock after its first flush; the
    # second practice's first key must not wait on it.
    with Session(engine) as s:
        s.add(Note(practice_id="first", body="one"))
        s.flush()
        s.add(Note(practice_id="second", body="two"))
        s.commit()
    with Session(engine) as s:
        assert sorted(n.body for n in s.scalars(sa.select(Note))) == ["one", "two"]  # type: ignore[type-var]


def test_key_created_in_a_rolled_back_transaction_is_forgotten(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        s.add(Note(practice_id="warmup", body="w"))
        s.flush()
        s.add(Note(practice_id="rolled-back", body="x"))
        s.flush()
        s.rollback()
    with Session(engine) as s:
        s.add(Note(practice_id="rolled-back", body="kept"))
        s.commit()
    keys.clear_cache()
    with Session(engine) as s:
        assert [n.body for n in s.scalars(sa.select(Note))] == ["kept"]
    assert len([r for r in keys.list_keys("rolled-back") if r.state == "active"]) == 1


def test_cached_orm_column_statements_run_twice(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    # SQLAlchemy compares column objects with == when it reuses a cached
    # statement's result map: that must not hit the encrypted-column guard.
    a, b = _insert_two(engine)
    for nid, want in ((a, "note of p1"), (b, "note of p2"), (a, "note of p1")):
        with engine.connect() as conn:
            sealed = conn.execute(sa.select(Note.body).where(Note.id == nid)).scalar_one()
        assert sealed.open("p1" if nid == a else "p2") == want


def test_orm_bulk_insert_and_update_bind_each_rows_tenant(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    rows = [{"id": i, "practice_id": f"p{i % 3}", "body": f"bulk note {i}"} for i in range(1, 31)]
    with Session(engine) as s:
        s.execute(sa.insert(Note), rows)
        s.commit()
    with Session(engine) as s:
        s.execute(sa.update(Note), [{"id": 4, "practice_id": "p1", "body": "updated"}])
        s.commit()
    with Session(engine) as s:
        got = {n.id: (n.practice_id, n.body) for n in s.scalars(sa.select(Note))}
    want = {r["id"]: (r["practice_id"], r["body"]) for r in rows}
    want[4] = ("p1", "updated")
    assert got == want
    with engine.connect() as conn:  # each value sealed under its own row's practice key
        for nid, blob in conn.execute(sa.text("SELECT id, body FROM notes")):
            assert bytes(blob)[1:17] == keys.ensure_key(f"p{nid % 3}").key_id
    with Session(engine) as s, pytest.raises(TenantRequired):
        s.execute(sa.insert(Note), [{"id": 99, "practice_id": None, "body": "PLANTED"}])
    with Session(engine) as s, carnet.tenant_scope("p0"), pytest.raises(TenantMismatch):
        s.execute(sa.insert(Note), [{"id": 98, "practice_id": "p2", "body": "x"}])


def test_core_new_practice_after_a_write_in_the_same_transaction(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    # SQLite: the connection already holds the write lock when the new
    # practice's first key is needed; it must not wait on itself.
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO comments (id, text) VALUES (100, NULL)"))
        with carnet.tenant_scope("core-new"):
            conn.execute(comments.insert(), {"id": 1, "text": "premier commentaire"})
    keys.clear_cache()
    with carnet.tenant_scope("core-new"), engine.connect() as conn:
        assert conn.execute(sa.select(comments.c.text).where(comments.c.id == 1)).scalar_one() == (
            "premier commentaire"
        )


def test_core_key_created_in_a_rolled_back_transaction_is_forgotten(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("INSERT INTO comments (id, text) VALUES (100, NULL)"))
        with carnet.tenant_scope("core-gone"):
            conn.execute(comments.insert(), {"id": 1, "text": "lost"})
        conn.rollback()
    with carnet.tenant_scope("core-gone"), engine.begin() as conn:
        conn.execute(comments.insert(), {"id": 2, "text": "kept"})
    keys.clear_cache()
    with carnet.tenant_scope("core-gone"), engine.connect() as conn:
        assert conn.execute(sa.select(comments.c.text)).scalars().all() == ["kept"]
    assert [r.state for r in keys.list_keys("core-gone")] == ["active"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: carnet.EncryptedText(tenant="patient.practice_id"),
        lambda: carnet.EncryptedString(40, tenant="patient.practice_id"),
        lambda: carnet.EncryptedDate(tenant="patient.practice_id"),
        lambda: carnet.EncryptedBytes(tenant="patient.practice_id", max_bytes=1000),
        lambda: carnet.EncryptedJSON(tenant="patient.practice_id", storage="text"),
    ],
)
def test_every_column_type_copies_through_one_path(make: Any) -> None:
    # A copy (SQLAlchemy's per-dialect implementation, Column._copy) keeps the
    # label learnt at attachment, the settings and where the practice is.
    from carnet.values import ParentPractice

    md = sa.MetaData()
    parent = sa.Table(
        "cp_patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(20)),
    )
    child = sa.Table(
        "cp_notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.ForeignKey("cp_patients.id")),
        sa.Column("body", make()),
    )
    typ = child.c.body.type
    where = ParentPractice(fk=child.c.patient_id, pk=parent.c.id, practice=parent.c.practice_id)
    typ.resolve_tenant(path=where)
    copy = typ.copy()
    assert type(copy) is type(typ)
    assert copy.field_label == "cp_notes.body"
    assert copy.tenant_path is where
    assert copy.storage == typ.storage and copy.own_manager is typ.own_manager
    assert getattr(copy, "length", None) == getattr(typ, "length", None)
    assert getattr(copy, "max_bytes", None) == getattr(typ, "max_bytes", None)
