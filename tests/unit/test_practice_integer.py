"""An integer practice column: a value is sealed for the practice the row holds."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet


class Base(DeclarativeBase):
    pass


class Visit(Base):
    __tablename__ = "visits"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[int] = mapped_column(sa.Integer)
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


@pytest.mark.parametrize("given", ["007", " 7", "+7", 7])
def test_integer_practice_given_as_text_is_sealed_for_the_stored_number(
    engine: sa.Engine, master_key_uri: str, given: object
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)  # with the database's practice check
    carnet.configure(keys)
    try:
        with Session(engine) as s:  # the ORM
            s.add(Visit(id=1, practice_id=given, body="orm note"))
            s.commit()
        with engine.begin() as conn:  # Core
            conn.execute(
                Visit.__table__.insert(), {"id": 2, "practice_id": given, "body": "core note"}
            )
        # The database holds 7; a fresh manager opens both under "7".
        other = carnet.KeyManager(engine, master_key=master_key_uri)
        t = sa.table("visits", sa.column("id"), sa.column("practice_id"), sa.column("body"))
        with engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.practice_id, t.c.body).order_by(t.c.id)).all()
        label = Visit.__table__.c.body.type.field_label
        got = [other.decrypt(bytes(b), tenant=str(p), label=label).decode() for p, b in rows]
        assert [p for p, _ in rows] == [7, 7]
        assert got == ["orm note", "core note"]
    finally:
        carnet.configure(None)


def test_integer_practice_bool_is_sealed_for_its_number(
    engine: sa.Engine, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)
    carnet.configure(keys)
    try:
        with engine.begin() as conn:
            conn.execute(Visit.__table__.insert(), {"id": 1, "practice_id": True, "body": "n"})
        with Session(engine) as s:
            v = s.get(Visit, 1)
            assert v is not None and (v.practice_id, v.body) == (1, "n")
    finally:
        carnet.configure(None)


class Person(Base):
    __tablename__ = "people"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[int] = mapped_column(sa.Integer)
    kind: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "person"}


class Patient(Person):
    """Joined inheritance: the practice is on the base table, bound by the ORM."""

    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(sa.ForeignKey("people.id"), primary_key=True)
    history: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    __mapper_args__ = {"polymorphic_identity": "patient"}


def test_integer_practice_on_a_base_table_is_sealed_for_the_stored_number(
    engine: sa.Engine, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)
    carnet.configure(keys)
    try:
        with Session(engine) as s:
            s.add(Patient(id=1, practice_id="007", history="first"))
            s.commit()
        with Session(engine) as s:
            p = s.get(Patient, 1)
            assert p is not None and (p.practice_id, p.history) == (7, "first")
            p.practice_id = "008"  # type: ignore[assignment]  # the ORM re-seals for 8
            s.commit()
        with Session(engine) as s:
            p = s.get(Patient, 1)
            assert p is not None and (p.practice_id, p.history) == (8, "first")
    finally:
        carnet.configure(None)
