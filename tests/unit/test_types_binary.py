"""EncryptedBytes and EncryptedJSON on SQLite, PostgreSQL and MariaDB.

Every path an EncryptedText value takes, for a document and a JSON value:
the ORM flush, Core executemany, an in-place change tracked by
MutableDict/MutableList, a refused read under another practice's scope, the
SQL guard, the database checks, re-encryption and verify.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.mutable import MutableDict, MutableList
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from carnet import dbchecks, envelope
from carnet.batchops import reencrypt
from carnet.errors import (
    InvalidCiphertext,
    InvalidPlaintext,
    TenantMismatch,
    UnsupportedOperation,
)
from carnet.types_binary import MAX_BYTES, canonical_json
from carnet.verify import verify

SECRET = "Zyxwv-secret-7731"
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 40 + SECRET.encode() + b"\x00\xff%%EOF"


class Base(DeclarativeBase):
    pass


class Letter(Base):
    __tablename__ = "letters"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    scan: Mapped[bytes | None] = mapped_column(carnet.EncryptedBytes(tenant="practice_id"))
    data: Mapped[dict[str, Any] | None] = mapped_column(
        MutableDict.as_mutable(carnet.EncryptedJSON(tenant="practice_id"))
    )
    items: Mapped[list[Any] | None] = mapped_column(
        MutableList.as_mutable(carnet.EncryptedJSON(tenant="practice_id"))
    )


class Visit(Base):
    """A date beside the new types: the ORM binds every non-text value the same way."""

    __tablename__ = "visits"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    day: Mapped[dt.date | None] = mapped_column(carnet.EncryptedDate(tenant="practice_id"))


core_md = sa.MetaData()
docs = sa.Table(
    "docs",
    core_md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("practice_id", sa.String(64)),
    sa.Column("scan", carnet.EncryptedBytes(tenant="practice_id")),
    sa.Column("data", carnet.EncryptedJSON(tenant="practice_id")),
)


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """This module's tables (``letters``, ``visits``, ``docs``), created with ``keys``."""
    return (Base.metadata, core_md)


def _raw(engine: sa.Engine, sql: str) -> list[Any]:
    with engine.connect() as conn:
        return [
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in r)
            for r in conn.execute(sa.text(sql))
        ]


def _count(engine: sa.Engine, table: str) -> int:
    return int(_raw(engine, f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608


# -- the ORM ---------------------------------------------------------------------------------


def test_orm_round_trip_stores_only_ciphertext(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    value = {"z": [1, 2.5, None, True], "a": {"note": SECRET, "é": "ü"}}
    with Session(engine) as s:
        s.add(Letter(id=1, practice_id="p1", scan=PDF, data=value, items=[SECRET, 3]))
        s.commit()
    with Session(engine) as s:
        got = s.get(Letter, 1)
        assert got is not None
        assert type(got.scan) is bytes and got.scan == PDF
        assert got.data == value and isinstance(got.data, MutableDict)
        assert got.items == [SECRET, 3] and isinstance(got.items, MutableList)
    scan, data = _raw(engine, "SELECT scan, data FROM letters")[0]
    for blob in (scan, data):
        assert blob[0] == 2 and SECRET.encode() not in blob
        assert envelope.tenant_of(blob) == "p1"
    # One GCM value of the document's exact bytes; canonical JSON inside.
    assert len(scan) == envelope.overhead("p1") + len(PDF)
    assert keys.decrypt(scan, tenant="p1", label="letters.scan") == PDF
    assert keys.decrypt(data, tenant="p1", label="letters.data") == canonical_json(value).encode()
    assert json.loads(canonical_json(value)) == value


def test_in_place_changes_are_saved_and_sealed(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(Letter(id=1, practice_id="p1", data={"a": 1}, items=[1]))
        s.commit()
    before = _raw(engine, "SELECT data, items FROM letters")[0]
    with Session(engine) as s:
        got = s.get(Letter, 1)
        assert got is not None and got.data is not None and got.items is not None
        got.data["allergy"] = SECRET  # in place: no assignment of the attribute
        got.items.append(SECRET)
        assert got in s.dirty
        s.commit()
    data, items = _raw(engine, "SELECT data, items FROM letters")[0]
    assert (data, items) != before
    assert SECRET.encode() not in data and SECRET.encode() not in items
    assert json.loads(keys.decrypt(data, tenant="p1", label="letters.data")) == {
        "a": 1,
        "allergy": SECRET,
    }
    assert json.loads(keys.decrypt(items, tenant="p1", label="letters.items")) == [1, SECRET]
    with Session(engine) as s:
        got = s.get(Letter, 1)
        assert got is not None and got.data == {"a": 1, "allergy": SECRET}
        assert got.items == [1, SECRET]


def test_orm_refuses_a_str_and_writes_nothing(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(Letter(id=1, practice_id="p1", scan=SECRET))  # type: ignore[arg-type]
        with pytest.raises(InvalidPlaintext) as info:
            s.commit()
        assert SECRET not in str(info.value)
    # A tracked JSON attribute refuses a str or a tuple at assignment already
    # (SQLAlchemy's MutableDict/MutableList).
    with pytest.raises(ValueError, match="does not accept"):
        Letter(id=1, practice_id="p1", data=SECRET)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not accept"):
        Letter(id=1, practice_id="p1", items=(1, SECRET))  # type: ignore[arg-type]
    with Session(engine) as s:
        s.add(Letter(id=1, practice_id="p1", scan=b"x"))
        s.commit()
        got = s.get(Letter, 1)
        assert got is not None
        got.scan = SECRET  # type: ignore[assignment]
        with pytest.raises(InvalidPlaintext):
            s.commit()
    assert _count(engine, "letters") == 1
    with Session(engine) as s:
        got = s.get(Letter, 1)
        assert got is not None and got.scan == b"x"


# -- Core --------------------------------------------------------------------------------------


def test_core_executemany_and_refused_read_of_another_practice(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    rows = [
        {"id": i, "practice_id": "p1", "scan": PDF[: i * 100], "data": {"n": i, "s": SECRET}}
        for i in range(1, 6)
    ]
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(docs.insert(), rows)
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        got = conn.execute(sa.select(docs.c.id, docs.c.scan, docs.c.data).order_by(docs.c.id))
        assert [tuple(r) for r in got] == [(r["id"], r["scan"], r["data"]) for r in rows]
    # Read outside a scope: sealed placeholders, opened with the row's practice.
    with engine.connect() as conn:
        first = conn.execute(sa.select(docs.c.scan, docs.c.data).where(docs.c.id == 1)).one()
    assert isinstance(first.scan, carnet.Sealed) and SECRET not in repr(first.data)
    assert first.scan.open("p1") == PDF[:100]
    assert first.data.open("p1") == {"n": 1, "s": SECRET}
    # Another practice's scope: refused, nothing of the value in the error.
    with carnet.tenant_scope("p2"), engine.connect() as conn:
        with pytest.raises(TenantMismatch) as info:
            conn.execute(sa.select(docs.c.data)).all()
    assert SECRET not in str(info.value)
    with pytest.raises(TenantMismatch):
        first.data.open("p2")


def test_core_refusals_write_nothing(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    bad_rows: list[dict[str, Any]] = [
        {"scan": SECRET},
        {"data": SECRET},
        {"data": json.dumps({"s": SECRET})},
        {"data": {1: SECRET}},
        {"data": {"s": float("nan")}},
        {"data": {"s": {SECRET}}},
        {"data": 42},
    ]
    for bad in bad_rows:
        with carnet.tenant_scope("p1"), engine.begin() as conn:
            with pytest.raises(InvalidPlaintext) as info:
                conn.execute(docs.insert(), [{"id": 1, "practice_id": "p1", **bad}])
            assert SECRET not in str(info.value)
    assert _count(engine, "docs") == 0


def test_the_size_limit_is_stated_and_enforced(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    # Within MariaDB's default max_allowed_packet (16 MiB), with room for the statement.
    assert MAX_BYTES == 7.5 * 1024 * 1024
    with pytest.raises(carnet.errors.ConfigurationError):
        carnet.EncryptedBytes(max_bytes=MAX_BYTES + 1)
    # On MariaDB, the size of each statement as the driver sends it (escaped):
    # under the server's default max_allowed_packet whatever this server's is.
    sizes: list[int] = []

    def measure(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if engine.dialect.name == "mysql" and statement.lstrip().upper().startswith("INSERT"):
            sizes.append(len(cursor.mogrify(statement, params).encode("utf-8", "surrogateescape")))

    sa.event.listen(engine, "before_cursor_execute", measure)
    big = bytes(MAX_BYTES)  # zeros: the worst case for a driver's escaping, were it in clear
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(docs.insert(), [{"id": 1, "practice_id": "p1", "scan": big}])
        with pytest.raises(InvalidPlaintext) as info:
            conn.execute(docs.insert(), [{"id": 2, "practice_id": "p1", "scan": big + b"\0"}])
        assert str(MAX_BYTES) in str(info.value)
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        back = conn.execute(sa.select(docs.c.scan)).scalar_one()
    assert back == big
    assert _count(engine, "docs") == 1
    if engine.dialect.name == "mysql":
        assert sizes and max(sizes) < 16 * 1024 * 1024, sizes


# -- the SQL guard and the database checks ----------------------------------------------------


def test_sql_guard_refuses_comparisons_on_values(keys: carnet.KeyManager) -> None:
    with pytest.raises(UnsupportedOperation):
        sa.select(docs).where(docs.c.scan == PDF)
    with pytest.raises(UnsupportedOperation):
        sa.select(docs).where(docs.c.data.like("%a%"))
    with pytest.raises(UnsupportedOperation):
        sa.select(Letter).where(Letter.data == {"a": 1})


def test_database_checks_refuse_a_foreign_or_plain_value(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    foreign = carnet.EncryptedBytes(label="docs.scan").encrypt(PDF, "p2", keys)
    sealed_p1 = carnet.EncryptedJSON(label="docs.data").encrypt({"a": 1}, "p1", keys)
    dbapi = engine.raw_connection()
    try:
        cur = dbapi.cursor()
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        sql = f"INSERT INTO docs (id, practice_id, scan, data) VALUES (1, 'p1', {mark}, {mark})"  # noqa: S608
        for scan, data, check, column in [
            (foreign, sealed_p1, "p", "scan"),  # a document sealed for p2 in a row of p1
            (PDF, sealed_p1, "f2", "scan"),  # a document in clear
            (None, canonical_json({"a": 1}).encode(), "f2", "data"),  # JSON in clear
        ]:
            with pytest.raises(Exception) as ei:  # noqa: PT011 - the driver's own class
                cur.execute(sql, (scan, data))
            name = dbchecks.check_of(ei.value)
            assert name is not None and name.startswith(dbchecks.check_name(check, "docs", column))
            dbapi.rollback()
    finally:
        dbapi.close()
    assert _count(engine, "docs") == 0


# -- re-encryption and verify ------------------------------------------------------------------


def test_reencrypt_and_verify(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        for i in range(1, 8):
            practice = "p1" if i % 2 else "p2"
            s.add(Letter(id=i, practice_id=practice, scan=PDF[:i], data={"i": i}, items=[i]))
        s.commit()
    old = {r[0]: r[1] for r in _raw(engine, "SELECT id, scan FROM letters")}
    keys.rotate("p1")
    for column in ("scan", "data", "items"):
        rep = reencrypt(keys, "letters", column)
        assert (rep.rewritten, rep.skipped, rep.failed) == (4, 3, [])
        out = verify(keys, "letters", column, tenant_column="practice_id")
        assert (out.rows, out.ok, out.failed) == (7, 7, 0), out
    active = keys.ensure_key("p1").key_id
    for pk, scan in _raw(engine, "SELECT id, scan FROM letters"):
        if pk % 2:
            assert envelope.key_id_of(scan) == active != envelope.key_id_of(old[pk])
        else:
            assert scan == old[pk]  # p2's key did not change: left alone
    with Session(engine) as s:
        for i in range(1, 8):
            got = s.get(Letter, i)
            assert got is not None and (got.scan, got.data, got.items) == (PDF[:i], {"i": i}, [i])


def test_verify_reports_a_value_of_another_type(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    # Authentic under the label, yet not JSON: the type refuses it on read.
    text = carnet.EncryptedText(label="docs.data").encrypt("not json", "p1", keys)
    blob = carnet.EncryptedJSON(label="docs.data")
    with pytest.raises(InvalidCiphertext) as info:
        blob.decrypt(text, "p1", keys)
    assert "not json" not in str(info.value)


# -- migration ------------------------------------------------------------------------------


def _migrate(db_url: str, mk: str, *args: str) -> Any:
    from click.testing import CliRunner

    from carnet.cli import cli as carnet_cli

    return CliRunner().invoke(
        carnet_cli,
        ["--database-url", db_url, "--master-key", mk, "migrate", *args],
        catch_exceptions=False,
    )


def test_migrate_blob_and_json_columns_into_encrypted_ones(
    db_url: str, engine: sa.Engine, master_key_uri: str
) -> None:
    blob = sa.LargeBinary().with_variant(sa.dialects.mysql.LONGBLOB(), "mysql", "mariadb")
    md = sa.MetaData()
    legacy = sa.Table(
        "scans",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("letter", blob),
        sa.Column("meta", sa.JSON),
        # The expand step: new, empty binary columns.
        sa.Column("letter_enc", blob),
        sa.Column("meta_enc", blob),
    )
    md.create_all(engine)
    metas = [{"z": i, "a": [SECRET, "é"]} for i in range(6)]
    with engine.begin() as conn:
        conn.execute(
            legacy.insert(),
            [
                {"id": i, "practice_id": f"p{i % 2}", "letter": PDF[: 50 * i], "meta": metas[i]}
                for i in range(6)
            ]
            + [{"id": 6, "practice_id": "p0", "letter": None, "meta": "just a string"}],
        )
    for legacy_col, new in (("letter", "letter_enc"), ("meta", "meta_enc")):
        args = [
            "--table",
            "scans",
            "--column",
            legacy_col,
            "--into",
            new,
            "--tenant",
            "practice_id",
        ]
        res = _migrate(db_url, master_key_uri, "run", *args)
        assert res.exit_code == (9 if legacy_col == "meta" else 0), res.output  # 9: rows left
        if legacy_col == "meta":
            assert "not_storable" in res.output  # the JSON scalar of row 6, left and listed
            with engine.begin() as conn:
                conn.execute(legacy.update().where(legacy.c.id == 6).values(meta=sa.null()))
        res = _migrate(db_url, master_key_uri, "finish", *args)
        assert res.exit_code == 0, res.output
        kind = "EncryptedBytes" if legacy_col == "letter" else "EncryptedJSON"
        assert kind in res.output
    # The application reads the new columns with the legacy columns' labels.
    app_md = sa.MetaData()
    app = sa.Table(
        "scans",
        app_md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("letter_enc", carnet.EncryptedBytes(tenant="practice_id", label="scans.letter")),
        sa.Column("meta_enc", carnet.EncryptedJSON(tenant="practice_id", label="scans.meta")),
    )
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    carnet.configure(keys)
    try:
        for practice in ("p0", "p1"):
            with carnet.tenant_scope(practice), engine.connect() as conn:
                q = sa.select(app.c.id, app.c.letter_enc, app.c.meta_enc).where(
                    app.c.practice_id == practice
                )
                for pk, letter, meta in conn.execute(q):
                    if pk == 6:
                        assert (letter, meta) == (None, None)
                        continue
                    assert letter == PDF[: 50 * pk]
                    assert meta == metas[pk]
        with engine.connect() as conn:
            raw = conn.execute(sa.select(legacy.c.meta_enc).where(legacy.c.id == 1)).scalar_one()
        assert SECRET.encode() not in bytes(raw)
        assert keys.decrypt(bytes(raw), tenant="p1", label="scans.meta") == (
            canonical_json(metas[1]).encode()
        )
    finally:
        carnet.configure(None)
        keys.close()


# -- more paths: the SQL guard at execution, a row moving, ORM reads, redaction ------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: sa.select(docs.c.id).order_by(docs.c.data),
        lambda: sa.select(sa.func.count()).select_from(docs).group_by(docs.c.scan),
        lambda: sa.select(sa.func.length(docs.c.scan)),
        lambda: sa.update(docs).values(data=docs.c.scan),
        lambda: sa.select(docs.c.id, docs.c.data).order_by("data"),
    ],
    ids=["order_by", "group_by", "function", "copy", "order_by_name"],
)
def test_sql_guard_refuses_at_execution(
    keys: carnet.KeyManager, engine: sa.Engine, build: Any
) -> None:
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(docs.insert(), [{"id": 1, "practice_id": "p1", "scan": PDF, "data": {}}])
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        with pytest.raises(UnsupportedOperation) as info:
            conn.execute(build())
    assert "docs." in str(info.value)


def test_a_row_moved_to_another_practice_is_sealed_again(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        s.add(Letter(id=1, practice_id="p1", scan=PDF, data={"s": SECRET}, items=[1]))
        s.commit()
    # Moved inside a scope of the practice it leaves, then outside any scope.
    for scope, new in (("p1", "p2"), (None, "p3")):
        with Session(engine) as s:
            if scope is not None:
                with carnet.tenant_scope(scope):
                    got = s.get(Letter, 1)
                    assert got is not None
                    got.practice_id = new
                    s.commit()
            else:
                got = s.get(Letter, 1)
                assert got is not None
                got.practice_id = new
                s.commit()
        scan, data, items = _raw(engine, "SELECT scan, data, items FROM letters")[0]
        assert {envelope.tenant_of(b) for b in (scan, data, items)} == {new}
        with Session(engine) as s:
            got = s.get(Letter, 1)
            assert got is not None
            assert (got.scan, got.data, got.items) == (PDF, {"s": SECRET}, [1])
            assert isinstance(got.data, MutableDict)


def test_orm_read_under_another_practice_scope_is_refused(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        s.add(Letter(id=1, practice_id="p1", scan=PDF, data={"s": SECRET}))
        s.commit()
    with carnet.tenant_scope("p2"), Session(engine) as s:
        with pytest.raises(TenantMismatch) as info:
            s.get(Letter, 1)
    assert SECRET not in str(info.value)
    with carnet.tenant_scope("p1"), Session(engine) as s:
        got = s.get(Letter, 1)
        assert got is not None and got.data == {"s": SECRET}


def test_a_failed_statement_shows_no_value(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    import traceback

    row = {"id": 1, "practice_id": "p1", "scan": PDF, "data": {"s": SECRET}}
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(docs.insert(), [row])
    with pytest.raises(sa.exc.IntegrityError) as info:  # the same primary key again
        with carnet.tenant_scope("p1"), engine.begin() as conn:
            conn.execute(docs.insert(), [row])
    shown = "".join(traceback.format_exception(info.value))
    assert SECRET not in shown and SECRET.encode().hex() not in shown
    assert repr(docs.c.scan.type).startswith("EncryptedBytes(")


def test_json_in_text_storage(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    md = sa.MetaData()
    t = sa.Table(
        "forms",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("answers", carnet.EncryptedJSON(tenant="practice_id", storage="text")),
    )
    md.create_all(engine)
    value = {"q1": SECRET, "q2": [1, 2]}
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1, "practice_id": "p1", "answers": value}])
    stored = _raw(engine, "SELECT answers FROM forms")[0][0]
    assert stored.startswith(envelope.TEXT_PREFIX) and SECRET not in stored
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        assert conn.execute(sa.select(t.c.answers)).scalar_one() == value
    with pytest.raises(carnet.errors.ConfigurationError):
        carnet.EncryptedJSON(storage="text", mixed_read=True)


def test_an_orm_update_of_a_value_that_is_not_text_needs_no_scope(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    # The row's practice seals the new value, as for a str; the object itself
    # (a date, a tracked dict, bytes) is back on the instance after the flush.
    with Session(engine) as s:
        s.add(Visit(id=1, practice_id="p1", day=dt.date(2024, 2, 29)))
        s.add(Letter(id=1, practice_id="p1", scan=b"a", data={"a": 1}))
        s.commit()
    with Session(engine) as s:
        visit, letter = s.get(Visit, 1), s.get(Letter, 1)
        assert visit is not None and letter is not None
        visit.day = dt.date(2025, 3, 1)
        letter.scan = b"b"
        tracked = letter.data
        assert tracked is not None
        tracked["b"] = 2
        s.flush()
        assert visit.day == dt.date(2025, 3, 1) and letter.scan == b"b"
        assert letter.data is tracked and isinstance(letter.data, MutableDict)
        tracked["c"] = 3  # still tracked after the flush
        s.commit()
    with Session(engine) as s:
        visit, letter = s.get(Visit, 1), s.get(Letter, 1)
        assert visit is not None and letter is not None
        assert (visit.day, letter.scan, letter.data) == (
            dt.date(2025, 3, 1),
            b"b",
            {"a": 1, "b": 2, "c": 3},
        )


def test_migrate_refuses_a_blob_in_place(
    db_url: str, engine: sa.Engine, master_key_uri: str
) -> None:
    md = sa.MetaData()
    blob = sa.LargeBinary().with_variant(sa.dialects.mysql.LONGBLOB(), "mysql", "mariadb")
    legacy = sa.Table(
        "scans",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("letter", blob),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(legacy.insert(), [{"id": 1, "practice_id": "p1", "letter": PDF}])
    args = ["--table", "scans", "--column", "letter", "--tenant", "practice_id"]
    for cmd in ("plan", "run"):
        res = _migrate(db_url, master_key_uri, cmd, *args)
        assert res.exit_code == 2 and "--into" in res.output and "EncryptedBytes" in res.output
    with engine.connect() as conn:
        assert bytes(conn.execute(sa.select(legacy.c.letter)).scalar_one()) == PDF
