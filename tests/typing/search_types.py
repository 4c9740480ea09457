"""What type checkers see of carnet's searchable identifiers (tests/cli/test_typing.py).

Checked, not run: mypy --strict and pyright (strict) must both accept every
``assert_type`` below.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from typing_extensions import assert_type

import carnet
from carnet import transforms
from carnet.searchable import BlindIndexAttribute


class Base(DeclarativeBase): ...


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    first_name: Mapped[str] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
    last_name: Mapped[str] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
    phone: Mapped[str | None] = mapped_column(carnet.EncryptedString(32, tenant="practice_id"))
    birth_date: Mapped[dt.date | None] = mapped_column(carnet.EncryptedDate(tenant="practice_id"))

    # Declared as docs/searchable.md shows: no annotation needed.
    phone_index = carnet.BlindIndex("phone", transform=transforms.phone_fr, bits=10)
    name_index = carnet.BlindIndex(
        "first_name", "last_name", transform=transforms.initial_lastname, bits=8
    )


class Letter(Base):
    __tablename__ = "letters"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    phone: Mapped[str | None] = mapped_column(carnet.EncryptedString(32, tenant="practice_id"))
    phone_index = carnet.BlindIndex("phone", transform=transforms.phone_fr, bits=10)


def lookups(session: Session) -> None:
    # search() is generic in the model of the index attribute.
    assert_type(carnet.search(session, Note.phone_index, "06 12 34 56 78", tenant="p1"), list[Note])
    assert_type(carnet.search(session, Letter.phone_index, "0612345678", tenant="p1"), list[Letter])
    named = carnet.search(session, Note.name_index, ("Hélène", "Dupont"), tenant="p1")
    assert_type(named, list[Note])
    legacy = carnet.search(session, Note.phone_index, "06", tenant="p1", legacy=[Note.phone])
    assert_type(legacy, list[Note])
    for note in carnet.search(session, Note.phone_index, "06 12 34 56 78", tenant="p1"):
        assert_type(note.phone, str | None)
        assert_type(note.birth_date, dt.date | None)
        # A row's index attribute holds the stored index value (NULL: no value).
        assert_type(note.phone_index, int | None)


def index_attribute(session: Session) -> None:
    # On the class: the ORM's attribute, usable in queries and remembering its model.
    assert_type(Note.phone_index, BlindIndexAttribute[Note])
    stmt = sa.select(Note).where(Note.practice_id == "p1", Note.phone_index == 3)
    assert_type(session.scalars(stmt).all(), Sequence[Note])
    assert_type(session.scalars(sa.select(Note.phone_index)).all(), Sequence[int | None])


def core_table() -> sa.Table:
    # In a Core Table, BlindIndex(..., column_name=...) is a Column like any other.
    return sa.Table(
        "patients",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("phone", carnet.EncryptedString(32, tenant="practice_id")),
        carnet.BlindIndex(
            "phone", transform=transforms.phone_fr, bits=10, column_name="phone_bidx"
        ),
    )
