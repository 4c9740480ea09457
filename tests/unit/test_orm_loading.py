"""Every way the ORM loads an encrypted attribute opens it under its own row's practice.

An attribute whose practice column is in its own row is loaded by carnet's
column loader (carnet._sa.load_column_with): the value opens as the row is
loaded. Each load shape below (aliases, loader options, a deferred column,
a textual statement, a refresh, populate_existing, a self-referencing eager
load, with and without a scope) must give back every note as text, never a
Sealed placeholder, and a value that does not belong to its row must fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    defer,
    joinedload,
    load_only,
    mapped_column,
    relationship,
    selectinload,
    undefer,
)

import carnet
from carnet.errors import TenantMismatch
from carnet.values import Sealed
from support.dbutil import drop_checks


class Base(DeclarativeBase):
    pass


class Record(Base):
    __tablename__ = "orm_loading_records"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    parent_id: Mapped[int | None] = mapped_column(sa.ForeignKey("orm_loading_records.id"))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    late: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id"), deferred=True
    )
    children: Mapped[list[Record]] = relationship(back_populates="parent")
    parent: Mapped[Record | None] = relationship(back_populates="children", remote_side=[id])


@pytest.fixture
def keys_metadata() -> list[sa.MetaData]:
    return [Base.metadata]


TEXTS = {1: ("p1", "premier"), 2: ("p1", "deuxième"), 3: ("p2", "troisième"), 4: ("p2", "")}


def _insert(engine: sa.Engine, practices: set[str]) -> None:
    with Session(engine) as s:
        for pk, (practice, text) in TEXTS.items():
            if practice in practices:
                s.add(
                    Record(
                        id=pk,
                        practice_id=practice,
                        parent_id=1 if pk == 2 else (3 if pk == 4 else None),
                        body=text,
                        late=text.upper(),
                    )
                )
        s.commit()


@pytest.fixture
def records(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    _insert(engine, {"p1", "p2"})


def _plain(s: Session) -> list[Record]:
    return list(s.scalars(sa.select(Record)))


def _aliased(s: Session) -> list[Record]:
    r = aliased(Record)
    return list(s.scalars(sa.select(r)))


def _load_only_body(s: Session) -> list[Record]:
    # The practice is not in the row: the value opens once the practice is loaded.
    return list(s.scalars(sa.select(Record).options(load_only(Record.body))))


def _deferred_then_loaded(s: Session) -> list[Record]:
    return list(s.scalars(sa.select(Record).options(defer(Record.body))))


def _undeferred(s: Session) -> list[Record]:
    return list(s.scalars(sa.select(Record).options(undefer(Record.late))))


def _textual(s: Session) -> list[Record]:
    stmt = sa.text("SELECT id, practice_id, parent_id, body FROM orm_loading_records")
    return list(s.scalars(sa.select(Record).from_statement(stmt)))


def _joined_children(s: Session) -> list[Record]:
    parents = s.scalars(sa.select(Record).options(joinedload(Record.children))).unique()
    return [r for p in parents for r in (p, *p.children)]


def _selectin_children(s: Session) -> list[Record]:
    parents = s.scalars(sa.select(Record).options(selectinload(Record.children)))
    return [r for p in parents for r in (p, *p.children)]


def _refreshed(s: Session) -> list[Record]:
    rows = _plain(s)
    for r in rows:
        s.refresh(r)
        s.refresh(r, ["body"])
    return rows


def _expired(s: Session) -> list[Record]:
    rows = _plain(s)
    s.expire_all()
    return rows


def _populate_existing(s: Session) -> list[Record]:
    _plain(s)
    return list(s.scalars(sa.select(Record).execution_options(populate_existing=True)))


def _get(s: Session) -> list[Record]:
    return [r for pk in TEXTS if (r := s.get(Record, pk)) is not None]


SHAPES: dict[str, Callable[[Session], list[Record]]] = {
    "plain": _plain,
    "aliased": _aliased,
    "load_only_body": _load_only_body,
    "deferred_then_loaded": _deferred_then_loaded,
    "undeferred": _undeferred,
    "textual": _textual,
    "joined_children": _joined_children,
    "selectin_children": _selectin_children,
    "refreshed": _refreshed,
    "expired": _expired,
    "populate_existing": _populate_existing,
    "get": _get,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("scope", [None, "p1"])
def test_every_load_shape_opens_each_note_under_its_row(
    keys: carnet.KeyManager, engine: sa.Engine, shape: str, scope: str | None
) -> None:
    # Under a scope the database holds that practice's rows only (a scope
    # never opens another practice's note, whatever the query).
    _insert(engine, {"p1", "p2"} if scope is None else {scope})
    with Session(engine) as s, carnet.tenant_scope(scope) if scope else _nothing():
        rows = SHAPES[shape](s)
        assert rows
        for r in rows:
            practice, text = TEXTS[r.id]
            assert r.practice_id == practice
            assert r.body == text and type(r.body) is str
            assert r.late == text.upper()
            assert not any(isinstance(v, Sealed) for v in sa.inspect(r).dict.values())


def test_a_value_copied_into_another_practices_row_never_opens_there(
    records: None, engine: sa.Engine
) -> None:
    # Planted with the database checks off (a DBA dropped them): row 3 (p2)
    # now holds row 1's value, sealed for p1.
    with engine.begin() as conn:
        drop_checks(conn, Record)
        v = conn.execute(sa.text("SELECT body FROM orm_loading_records WHERE id = 1")).scalar_one()
        conn.execute(sa.text("UPDATE orm_loading_records SET body = :v WHERE id = 3"), {"v": v})
    for scope in (None, "p1", "p2"):
        with Session(engine) as s, carnet.tenant_scope(scope) if scope else _nothing():
            with pytest.raises(TenantMismatch):
                s.scalars(sa.select(Record).where(Record.id == 3)).one()


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
