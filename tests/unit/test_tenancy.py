"""carnet.tenancy: each write path named by the tenant invariant, on the three backends.

A note belongs to its row's practice: after the write either every value
opens, from a brand-new KeyManager, under its row's practice, or the write was
refused with a CarnetError and nothing of it was written. At the end, the
module's own functions called directly: ``practice_text`` (the practice a row
holds, as the database stores it) and ``bind_write`` (the pipeline's step).
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    load_only,
    mapped_column,
    relationship,
)

import carnet
from carnet import envelope, tenancy
from carnet.errors import (
    CarnetError,
    ConfigurationError,
    InvalidPlaintext,
    TenantMismatch,
    TenantRequired,
    UnsupportedOperation,
)
from carnet.values import BoundText


class Base(DeclarativeBase):
    pass


class Practice(Base):
    __tablename__ = "tp_practices"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)


class Note(Base):
    __tablename__ = "tp_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str | None] = mapped_column(sa.ForeignKey("tp_practices.id"))
    practice: Mapped[Practice | None] = relationship()
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    summary: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text")
    )


notes = Note.__table__
BODY, SUMMARY = "Patiente anxieuse, suivi dépression", "violences évoquées"


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """This module's models, created by the shared ``keys``."""
    return (Base.metadata,)


@pytest.fixture
def practices(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """Practices A and B, the parents the notes here point to."""
    with engine.begin() as conn:
        conn.execute(Practice.__table__.insert(), [{"id": "A"}, {"id": "B"}])


def stored(engine: sa.Engine, master_key_uri: str, nid: int) -> tuple[str, str | None, str | None]:
    """(practice, body, summary) of a row, opened by a brand-new KeyManager under its practice."""
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        with engine.connect() as conn:
            r = conn.execute(
                sa.text("SELECT practice_id, body, summary FROM tp_notes WHERE id = :i"), {"i": nid}
            ).one()
        body = (
            None
            if r.body is None
            else keys.decrypt(bytes(r.body), tenant=r.practice_id, label="tp_notes.body").decode()
        )
        summary = (
            None
            if r.summary is None
            else keys.decrypt(
                envelope.from_text(r.summary), tenant=r.practice_id, label="tp_notes.summary"
            ).decode()
        )
        return r.practice_id, body, summary
    finally:
        keys.close()


def _seed(engine: sa.Engine, nid: int = 1, practice: str = "A") -> None:
    with Session(engine) as s:
        s.add(Note(id=nid, practice_id=practice, body=BODY, summary=SUMMARY))
        s.commit()


# -- the row's practice changes through the ORM --------------------------------------


def test_form_posting_the_same_text_back_reseals_for_the_new_practice(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    with Session(engine) as s:
        n = s.get(Note, 1)
        assert n is not None
        n.practice_id, n.body, n.summary = "B", BODY, SUMMARY
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("B", BODY, SUMMARY)


def test_merge_with_the_same_text_reseals_for_the_new_practice(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    with Session(engine) as s:
        s.merge(Note(id=1, practice_id="B", body=BODY, summary=SUMMARY))
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("B", BODY, SUMMARY)


@pytest.mark.parametrize("how", ["load_only", "defer", "expired", "expired_all"])
def test_practice_change_with_values_not_loaded_reseals_them(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str, how: str
) -> None:
    _seed(engine)
    with Session(engine) as s:
        if how == "load_only":
            n = s.scalars(sa.select(Note).options(load_only(Note.id, Note.practice_id))).one()
        elif how == "defer":
            n = s.scalars(sa.select(Note).options(defer(Note.body), defer(Note.summary))).one()
        else:
            n = s.get(Note, 1)  # type: ignore[assignment]
            assert n is not None
            s.expire(n, ["body", "summary"] if how == "expired" else None)
        n.practice_id = "B"
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("B", BODY, SUMMARY)


def test_practice_change_through_a_relationship_reseals(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    with Session(engine) as s:
        n = s.get(Note, 1)
        assert n is not None
        n.practice = s.get(Practice, "B")
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("B", BODY, SUMMARY)


def test_practice_change_to_the_same_value_writes_no_move(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    with Session(engine) as s:
        n = s.scalars(sa.select(Note).options(load_only(Note.id))).one()
        n.practice_id = "A"  # not loaded before: the database decides it is no move
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("A", BODY, SUMMARY)


def test_orm_update_statement_moving_rows_is_refused(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    with Session(engine) as s, pytest.raises(UnsupportedOperation):
        s.execute(sa.update(Note).where(Note.id == 1).values(practice_id="B"))
    with Session(engine) as s, pytest.raises(UnsupportedOperation):
        s.execute(sa.update(Note), [{"id": 1, "practice_id": "B"}])
    with engine.begin() as conn, pytest.raises(UnsupportedOperation):
        conn.execute(notes.update().values(practice_id="B"))
    assert stored(engine, master_key_uri, 1) == ("A", BODY, SUMMARY)


def test_statement_writing_every_encrypted_column_may_move_rows(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    with engine.begin() as conn:
        conn.execute(
            notes.update().where(notes.c.id == 1).values(practice_id="B", body="x", summary=None)
        )
    assert stored(engine, master_key_uri, 1) == ("B", "x", None)


def test_statement_writing_some_encrypted_columns_never_moves_a_row(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    # summary is not written: the statement is pinned to rows already in B.
    _seed(engine)
    with engine.begin() as conn:
        res = conn.execute(notes.update().where(notes.c.id == 1).values(practice_id="B", body="x"))
        assert res.rowcount == 0
    assert stored(engine, master_key_uri, 1) == ("A", BODY, SUMMARY)


# -- a scope never overrides the row's own practice ---------------------------------------


def test_core_insert_naming_another_practice_than_the_scope_is_refused(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine
) -> None:
    with carnet.tenant_scope("A"), engine.begin() as conn, pytest.raises(TenantMismatch):
        conn.execute(notes.insert(), {"id": 1, "practice_id": "B", "body": "PLANTED"})
    with carnet.tenant_scope("A"), engine.begin() as conn, pytest.raises(TenantMismatch):
        conn.execute(notes.insert().values(id=1, practice_id="B", body="PLANTED"))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tp_notes")).scalar_one() == 0


def test_core_insert_without_the_practice_column_is_refused_even_in_a_scope(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine
) -> None:
    with carnet.tenant_scope("A"), engine.begin() as conn, pytest.raises(TenantRequired):
        conn.execute(notes.insert(), {"id": 1, "body": "PLANTED"})


def test_core_update_in_a_scope_is_pinned_to_the_scope_practice(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine, 1, "A")
    _seed(engine, 2, "B")
    with carnet.tenant_scope("A"), engine.begin() as conn:
        res = conn.execute(notes.update().values(body="rewritten"))
    assert res.rowcount == 1  # B's row did not match: the rowcount says so
    assert stored(engine, master_key_uri, 1) == ("A", "rewritten", SUMMARY)
    assert stored(engine, master_key_uri, 2) == ("B", BODY, SUMMARY)


def test_core_update_without_scope_or_practice_is_refused(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    with engine.begin() as conn, pytest.raises(TenantRequired):
        conn.execute(notes.update().where(notes.c.id == 1).values(body="x"))
    assert stored(engine, master_key_uri, 1) == ("A", BODY, SUMMARY)


def test_scoped_orm_bulk_update_of_another_practice_row_changes_nothing(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine, 1, "B")
    with Session(engine) as s, carnet.tenant_scope("A"):
        try:
            s.execute(sa.update(Note), [{"id": 1, "body": "PLANTED"}])
            s.commit()
        except Exception:  # noqa: BLE001 - a refusal is as good as a pinned no-op
            s.rollback()
    assert stored(engine, master_key_uri, 1) == ("B", BODY, SUMMARY)
    with Session(engine) as s, carnet.tenant_scope("A"), pytest.raises(TenantMismatch):
        s.execute(sa.update(Note), [{"id": 1, "practice_id": "B", "body": "x", "summary": "y"}])


def test_orm_write_under_another_practice_scope_is_refused(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine
) -> None:
    with Session(engine) as s, carnet.tenant_scope("A"):
        s.add(Note(id=1, practice_id="B", body="PLANTED"))
        with pytest.raises(TenantMismatch):
            s.commit()


# -- savepoints -------------------------------------------------------------------------------


def test_first_key_created_in_a_rolled_back_core_savepoint_is_not_used_later(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    with engine.begin() as conn:
        conn.execute(notes.insert(), {"id": 1, "practice_id": "A"})  # holds the write lock
        sp = conn.begin_nested()
        conn.execute(notes.insert(), {"id": 2, "practice_id": "B", "body": "gone"})
        sp.rollback()
        conn.execute(notes.insert(), {"id": 3, "practice_id": "B", "body": "kept"})
    keys.clear_cache()
    assert stored(engine, master_key_uri, 3) == ("B", "kept", None)


def test_first_key_created_in_a_rolled_back_orm_savepoint_is_not_used_later(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    with Session(engine) as s:
        s.add(Note(id=1, practice_id="A"))
        s.flush()
        sp = s.begin_nested()
        s.add(Note(id=2, practice_id="B", body="gone"))
        s.flush()
        sp.rollback()
        s.add(Note(id=3, practice_id="B", body="kept"))
        s.commit()
    assert stored(engine, master_key_uri, 3) == ("B", "kept", None)


# -- values of the wrong kind -------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"bytes", 123, 4.5, ["list"]])
def test_values_that_are_not_str_are_refused_on_every_path(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, value: object
) -> None:
    with Session(engine) as s:
        s.add(Note(id=1, practice_id="A", body=value))  # type: ignore[arg-type]
        with pytest.raises(InvalidPlaintext):
            s.commit()
    with Session(engine) as s, pytest.raises(InvalidPlaintext):
        s.execute(sa.insert(Note), [{"id": 2, "practice_id": "A", "body": value}])
    with engine.begin() as conn, pytest.raises(InvalidPlaintext):
        conn.execute(notes.insert(), {"id": 3, "practice_id": "A", "body": value})
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tp_notes")).scalar_one() == 0


def test_str_subclasses_are_stored_as_their_plain_text(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    class Markup(str):
        pass

    with Session(engine) as s:
        s.add(Note(id=1, practice_id="A", body=Markup("<b>suivi</b>")))
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("A", "<b>suivi</b>", None)
    with Session(engine) as s:
        n = s.get(Note, 1)
        assert n is not None and type(n.body) is str


# -- no Sealed left in a str attribute ----------------------------------------------------------


@pytest.mark.parametrize("how", ["load_only", "refresh", "refresh_after_expire"])
def test_value_loaded_without_its_practice_opens_on_access(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, how: str
) -> None:
    _seed(engine)
    with Session(engine) as s:
        if how == "load_only":
            n = s.scalars(sa.select(Note).options(load_only(Note.body))).one()
        else:
            n = s.get(Note, 1)  # type: ignore[assignment]
            assert n is not None
            if how == "refresh_after_expire":
                s.expire(n)
            s.refresh(n, ["body"])
        assert n.body == BODY and type(n.body) is str
        assert n.practice_id == "A"


# -- strict mode: a lost scope fails closed -------------------------------------------------------


def test_require_scope_refuses_reads_and_writes_without_a_scope(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)
    carnet.configure(keys, require_scope=True)
    with Session(engine) as s, pytest.raises(TenantRequired):
        s.get(Note, 1)
    with Session(engine) as s, carnet.tenant_scope("B"), pytest.raises(TenantMismatch):
        s.get(Note, 1)
    with Session(engine) as s:
        s.add(Note(id=2, practice_id="A", body="x"))
        with pytest.raises(TenantRequired):
            s.commit()
    with engine.connect() as conn:
        sealed = conn.execute(sa.select(notes.c.body)).scalar_one()
    with pytest.raises(TenantRequired):
        sealed.open("A")
    with carnet.tenant_scope("A"):
        assert sealed.open("A") == BODY
        with Session(engine) as s:
            n = s.get(Note, 1)
            assert n is not None and n.body == BODY
            n.body = "edited"
            s.add(Note(id=2, practice_id="A", body="two"))
            s.commit()
            # carnet's own re-seal of a row leaving the scope's practice is allowed
            n.practice_id = "B"
            s.commit()
    assert stored(engine, master_key_uri, 1) == ("B", "edited", SUMMARY)
    assert stored(engine, master_key_uri, 2) == ("A", "two", None)
    keys.require_scope = False


def test_require_scope_holds_for_carnets_own_reseal_of_a_moved_row(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    # Moving a row re-seals its values, which carnet reads from the database
    # when they are not loaded: in strict mode that read needs a scope of the
    # practice the row leaves, checked before any value is opened.
    _seed(engine)
    carnet.configure(keys, require_scope=True)
    opened: list[str] = []
    try:
        with carnet.tenant_scope("A"), Session(engine) as s:
            n = s.get(Note, 1, options=[sa.orm.defer(Note.body), sa.orm.defer(Note.summary)])
            assert n is not None
        keys.decrypt_hook = lambda tenant, _label, _n: opened.append(tenant)
        with Session(engine) as s:
            s.add(n)
            n.practice_id = "B"
            with pytest.raises(TenantRequired):
                s.commit()
        assert opened == []  # refused before any value was opened
        with carnet.tenant_scope("B"), Session(engine) as s:
            s.add(n)
            n.practice_id = "B"
            with pytest.raises(TenantMismatch):
                s.commit()
        assert opened == []
        assert stored(engine, master_key_uri, 1) == ("A", BODY, SUMMARY)
    finally:
        keys.require_scope = False
        keys.decrypt_hook = None


def test_leaving_a_scope_in_another_context_is_safe() -> None:
    import contextvars

    scope = carnet.tenant_scope("A")
    ctx = contextvars.copy_context()
    ctx.run(scope.__enter__)
    assert ctx.run(carnet.current_tenant) == "A"
    scope.__exit__(None, None, None)  # here, not in ctx: no ValueError from ContextVar
    assert carnet.current_tenant() is None


def test_a_literal_of_another_type_in_values_is_sealed_not_stored_in_clear(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    with carnet.tenant_scope("A"), engine.begin() as conn:
        conn.execute(notes.insert().values(id=1, practice_id="A", body=sa.literal("en clair?")))
        conn.execute(notes.insert().values(id=2, practice_id="A", body=sa.literal("x")))
        conn.execute(notes.update().where(notes.c.id == 2).values(body=sa.literal("mis à jour")))
    assert stored(engine, master_key_uri, 1) == ("A", "en clair?", None)
    assert stored(engine, master_key_uri, 2) == ("A", "mis à jour", None)


def test_multi_row_values_are_sealed_as_given_or_refused_never_rewritten(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    # carnet does not rewrite a multi-row VALUES (its rows are SQLAlchemy's
    # private state): rows of the scope's practice are sealed as they are...
    with carnet.tenant_scope("A"), engine.begin() as conn:
        conn.execute(
            notes.insert().values(
                [
                    {"id": 1, "practice_id": "A", "body": "de A"},
                    {"id": 2, "practice_id": "A", "body": "encore A"},
                ]
            )
        )
    assert stored(engine, master_key_uri, 1) == ("A", "de A", None)
    assert stored(engine, master_key_uri, 2) == ("A", "encore A", None)
    # ...rows that would each need sealing for their own practice are refused,
    # with the executemany form that does it...
    mixed = [
        {"id": 3, "practice_id": "A", "body": "de A"},
        {"id": 4, "practice_id": "B", "body": "de B"},
    ]
    with engine.begin() as conn, pytest.raises(UnsupportedOperation, match="execute"):
        conn.execute(notes.insert().values(mixed))
    with engine.begin() as conn:
        conn.execute(notes.insert(), mixed)
    assert stored(engine, master_key_uri, 3) == ("A", "de A", None)
    assert stored(engine, master_key_uri, 4) == ("B", "de B", None)
    # ...and a row of another practice than the scope's is refused as ever.
    with carnet.tenant_scope("A"), engine.begin() as conn, pytest.raises(TenantMismatch):
        conn.execute(notes.insert().values([{"id": 5, "practice_id": "B", "body": "PLANTED"}]))
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(notes)).scalar() == 4


def test_a_scope_never_writes_into_or_moves_another_practices_row(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    _seed(engine)  # row 1, practice A
    with carnet.tenant_scope("B"), engine.begin() as conn:
        done = conn.execute(
            notes.update()
            .where(notes.c.id == 1)
            .values(practice_id="B", body="PLANTED by B", summary="PLANTED")
        )
        assert done.rowcount == 0  # pinned to rows of practice B: A's row not matched
    with carnet.tenant_scope("B"), Session(engine) as s:
        with pytest.raises(sa.orm.exc.StaleDataError):
            s.execute(
                sa.update(Note),
                [{"id": 1, "practice_id": "B", "body": "PLANTED by B", "summary": "PLANTED"}],
            )
            s.commit()
    assert stored(engine, master_key_uri, 1) == ("A", BODY, SUMMARY)
    # Nor does the row's own practice's scope seal for another: only carnet's
    # own re-seal (the ORM moving the row) may.
    with carnet.tenant_scope("A"), engine.begin() as conn, pytest.raises(TenantMismatch):
        conn.execute(
            notes.update().where(notes.c.id == 1).values(practice_id="B", body="b", summary="s")
        )
    with carnet.tenant_scope("A"), Session(engine) as s:
        note = s.get(Note, 1)
        assert note is not None
        note.practice_id = "B"
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("B", BODY, SUMMARY)


def test_a_later_row_without_its_practice_is_refused_and_creates_no_key(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine
) -> None:
    # The second row would take the practice column's default: no practice to seal for.
    before = {r.tenant for r in keys.store.list_keys()}
    for stmt, params in [
        (
            notes.insert().values(
                [{"id": 1, "practice_id": "A", "body": "x"}, {"id": 2, "body": "y"}]
            ),
            None,
        ),
        (notes.insert(), [{"id": 1, "practice_id": "A", "body": "x"}, {"id": 2, "body": "y"}]),
    ]:
        with engine.begin() as conn, pytest.raises(TenantRequired, match="practice"):
            conn.execute(stmt, params)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(notes)).scalar() == 0
    assert {r.tenant for r in keys.store.list_keys()} <= before | {"A"}


def test_a_column_default_is_sealed_for_its_rows_practice(
    keys: carnet.KeyManager, practices: None, master_key_uri: str
) -> None:
    md = sa.MetaData()
    t = sa.Table(
        "with_default",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(20)),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id"), default="(no note yet)"),
        sa.Column("other", carnet.EncryptedText(tenant="practice_id"), default=lambda: "made"),
    )
    engine = keys.engine
    md.create_all(engine)
    with engine.begin() as conn:  # no scope: each row's own practice seals its default
        conn.execute(t.insert().values(id=1, practice_id="A"))
        conn.execute(t.insert(), [{"id": 2, "practice_id": "B"}, {"id": 3, "practice_id": "A"}])
    fresh = carnet.KeyManager(engine, master_key=master_key_uri)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, practice_id, body, other FROM with_default"))
        for nid, practice, body, other in rows:
            assert envelope.tenant_of(bytes(body)) == practice
            assert fresh.decrypt(bytes(body), tenant=practice, label="with_default.body") == (
                b"(no note yet)"
            ), nid
            assert fresh.decrypt(bytes(other), tenant=practice, label="with_default.other") == (
                b"made"
            )


def test_a_server_default_on_an_encrypted_column_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="server_default"):
        sa.Table(
            "t",
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("body", carnet.EncryptedText(), server_default="stored in clear"),
        )


def test_null_notes_need_no_key_even_for_a_destroyed_practice(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine
) -> None:
    # Found by the model test: a row whose notes are NULL asks for no key.
    _seed(engine, 1, "A")
    keys.destroy("A")
    with carnet.tenant_scope("A"), engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": 2, "practice_id": "A", "body": None}])
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": 3, "practice_id": "A", "body": None}])
    with Session(engine) as s:
        s.add(Note(id=4, practice_id="A", body=None))
        s.commit()


@pytest.mark.parametrize(
    ("where", "sync"),
    [("id_range", "evaluate"), ("id_range", "auto"), ("none", "evaluate"), ("id_range", "fetch")],
)
def test_orm_update_synchronize_session_never_puts_one_practices_text_on_another_practices_object(
    keys: carnet.KeyManager,
    practices: None,
    engine: sa.Engine,
    master_key_uri: str,
    where: str,
    sync: str,
) -> None:
    _seed(engine, 1, "A")
    _seed(engine, 2, "B")
    with Session(engine) as s:
        with carnet.tenant_scope("A"):
            a = s.get(Note, 1)
        with carnet.tenant_scope("B"):
            b = s.get(Note, 2)
        assert a is not None and b is not None
        assert (a.body, b.body) == (BODY, BODY)
        stmt = sa.update(Note).values(body="rewritten for A")
        if where == "id_range":
            stmt = stmt.where(Note.id >= 1)
        with carnet.tenant_scope("A"):
            s.execute(stmt, execution_options={"synchronize_session": sync})
            assert a.body == "rewritten for A"
        # B's row was pinned out of the UPDATE: its object shows B's own text.
        assert b.__dict__.get("body", BODY) == BODY
        with carnet.tenant_scope("B"):
            assert b.body == BODY
            s.expire(b)
            assert b.body == BODY
        s.commit()
    assert stored(engine, master_key_uri, 1) == ("A", "rewritten for A", SUMMARY)
    assert stored(engine, master_key_uri, 2) == ("B", BODY, SUMMARY)


# -- tenancy's own functions, called directly ------------------------------------------

_plain_md = sa.MetaData()
# No encrypted column: what the database stores for a practice, carnet aside.
practice_values = sa.Table(
    "tp_practice_values",
    _plain_md,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("as_int", sa.Integer),
    sa.Column("as_text", sa.String(20)),
)


@pytest.mark.parametrize("given", [7, "007", " 7", "+7", "-3", "0"])
def test_practice_text_of_an_integer_column_is_the_number_the_database_stores(
    engine: sa.Engine, given: object
) -> None:
    # Sealing for "007" while the row holds 7 would make the note unreadable
    # (and the database's practice check would refuse it).
    _plain_md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(practice_values.insert(), {"id": 1, "as_int": given})
        stored = conn.execute(sa.select(practice_values.c.as_int)).scalar_one()
    assert tenancy.practice_text(given, practice_values.c.as_int) == str(stored)


@pytest.mark.parametrize("given", ["007", "A-12", " 7", 7])
def test_practice_text_of_a_text_column_is_the_text_the_database_stores(
    engine: sa.Engine, given: object
) -> None:
    _plain_md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(practice_values.insert(), {"id": 1, "as_text": given})
        stored = conn.execute(sa.select(practice_values.c.as_text)).scalar_one()
    assert tenancy.practice_text(given, practice_values.c.as_text) == stored
    assert tenancy.practice_text(given) == stored  # no column: the text as given


def test_bind_write_binds_each_rows_values_to_that_rows_practice(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine, master_key_uri: str
) -> None:
    rows = [
        {"id": 1, "practice_id": "A", "body": BODY, "summary": None},
        {"id": 2, "practice_id": "B", "body": SUMMARY, "summary": BODY},
    ]
    with engine.begin() as conn:
        stmt, multi, params, writes = tenancy.bind_write(conn, notes.insert(), rows, {})
        assert writes is True
        assert [(r["body"].carnet_tenant, r["body"]) for r in multi] == [
            ("A", BODY),
            ("B", SUMMARY),
        ]
        assert multi[1]["summary"].carnet_tenant == "B" and multi[0]["summary"] is None
        conn.execute(stmt, multi)
    # Written through the pipeline as bound: each note opens under its own row's practice.
    assert stored(engine, master_key_uri, 1) == ("A", BODY, None)
    assert stored(engine, master_key_uri, 2) == ("B", SUMMARY, BODY)


def test_bind_write_leaves_statements_without_encrypted_columns_alone(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with engine.connect() as conn:
        for stmt, rows in [
            (sa.select(notes), []),
            (Practice.__table__.insert(), [{"id": "C"}]),
            (Practice.__table__.update().values(id="D"), []),
        ]:
            out, multi, params, writes = tenancy.bind_write(conn, stmt, rows, {})
            assert (out, multi, params, writes) == (stmt, rows, {}, False)


def test_bind_write_refuses_a_practice_it_cannot_know(
    keys: carnet.KeyManager, practices: None, engine: sa.Engine
) -> None:
    stmt = notes.insert().values(id=1, practice_id=sa.func.lower("A"), body=BODY)
    with engine.connect() as conn, pytest.raises(UnsupportedOperation, match="SQL expression"):
        tenancy.bind_write(conn, stmt, [], {})
    assert _count(engine) == 0


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(notes)).scalar_one())


# -- rows naming their own practice: one frame, the same decisions as row by row ----------

_MISSING_KEY = object()
_PRACTICES = st.sampled_from(["A", "B", None, 7, _MISSING_KEY])
_VALUES = st.sampled_from(
    [BODY, "", None, 123, b"bytes", "bound A", "bound B", "moved", _MISSING_KEY]
)


def _value_of(v: object) -> object:
    """A strategy's token as a row value: BoundText tokens made fresh for each run."""
    if v in ("bound A", "bound B"):
        bound = BoundText(SUMMARY)
        bound.carnet_tenant = str(v)[-1]
        return bound
    if v == "moved":
        bound = BoundText(BODY)
        bound.carnet_tenant, bound.carnet_moved_from = "B", "A"
        return bound
    return v


def _row(i: int, practice: object, body: object, summary: object) -> dict[str, object]:
    row: dict[str, object] = {"id": i, "b_id": i}
    for key, v in (("practice_id", practice), ("body", body), ("summary", summary)):
        if v is not _MISSING_KEY:
            row[key] = _value_of(v)
    return row


def _outcome(conn: sa.Connection, stmt: Any, rows: list[dict[str, object]]) -> tuple[object, ...]:
    """What bind_write decides: the error, or each row's values with what binds them."""
    given = [dict(r) for r in rows]
    try:
        _stmt, multi, _params, _writes = tenancy.bind_write(conn, stmt, rows, {})
    except CarnetError as exc:
        return ("refused", type(exc).__name__, str(exc))
    assert rows == given  # the caller's dicts stay as given
    return tuple(
        tuple(
            (
                k,
                type(v).__name__,
                v,
                getattr(v, "carnet_tenant", None),
                getattr(v, "carnet_moved_from", None),
            )
            for k, v in sorted(r.items())
        )
        for r in multi
    )


def _row_by_row(
    self: Any, tenant_key: str, encs: list[Any], written: list[Any], managers: Any
) -> None:
    """The reference: every row through bind_row, as before the one-frame path."""
    for i in range(len(self.out_rows)):
        self.bind_row(i, tenant_key, encs, written, managers, {}, False)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.tuples(_PRACTICES, _VALUES, _VALUES), min_size=1, max_size=4),
    scope=st.sampled_from([None, "A", "B"]),
    require_scope=st.booleans(),
    update=st.booleans(),
)
def test_rows_naming_their_practice_bind_as_they_would_row_by_row(
    keys: carnet.KeyManager,
    practices: None,
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    rows: list[tuple[object, object, object]],
    scope: str | None,
    require_scope: bool,
    update: bool,
) -> None:
    # Every row has the first row's columns, as SQLAlchemy requires of an executemany;
    # a later row may lack one (refused), or hold anything the application put there.
    stmt: Any = (
        notes.update().where(notes.c.id == sa.bindparam("b_id")) if update else notes.insert()
    )
    made = [_row(i, *r) for i, r in enumerate(rows, 1)]
    if update:
        for r in made:
            r.pop("id")
    else:
        for r in made:
            r.pop("b_id")
    with monkeypatch.context() as m:
        m.setattr(keys, "require_scope", require_scope)
        with carnet.tenant_scope(scope) if scope else contextlib.nullcontext():
            with engine.connect() as conn:
                fast = _outcome(conn, stmt, made)
                conn.rollback()
            m.setattr(tenancy._Write, "bind_rows_of_their_practice", _row_by_row)
            with engine.connect() as conn:
                reference = _outcome(conn, stmt, made)
                conn.rollback()
    assert fast == reference
