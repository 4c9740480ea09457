"""A joined-inheritance row moved to another practice, with the database's checks on."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from carnet import dbchecks


class Base(DeclarativeBase):
    pass


class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(20))
    kind: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "contact"}


class Client(Contact):
    __tablename__ = "clients"
    id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id"), primary_key=True)
    notes: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    summary: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text")
    )
    __mapper_args__ = {"polymorphic_identity": "client"}


def test_moved_row_is_resealed_for_its_new_practice(engine: sa.Engine, master_key_uri: str) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)
    carnet.configure(keys)
    try:
        with engine.connect() as conn:  # the move check sits on the base table
            (spec, _) = dbchecks.specs_for(Client.__table__, conn.dialect.name)
            assert spec.parent is not None and dbchecks.missing(conn, spec) == []
        with Session(engine) as s:
            s.add(Client(id=1, practice_id="p1", notes="first", summary=None))
            s.commit()
        with Session(engine) as s:
            c = s.get(Client, 1)
            assert c is not None
            c.practice_id = "p2"  # refused by carnet_m_* before the ORM emptied the values
            s.commit()
        other = carnet.KeyManager(engine, master_key=master_key_uri)
        with engine.connect() as conn:
            blob = conn.execute(sa.text("SELECT notes FROM clients WHERE id = 1")).scalar_one()
        label = Client.__table__.c.notes.type.field_label
        assert other.decrypt(bytes(blob), tenant="p2", label=label) == b"first"
        with Session(engine) as s:
            c = s.get(Client, 1)
            assert c is not None and (c.practice_id, c.notes, c.summary) == ("p2", "first", None)
    finally:
        carnet.configure(None)
