"""A practice attribute mapped to a column of another name gets its database checks."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from carnet import dbchecks
from carnet.errors import TenantMismatch


class Base(DeclarativeBase):
    pass


class Letter(Base):
    __tablename__ = "letters"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice: Mapped[str] = mapped_column("practice_id", sa.String(20))
    body: Mapped[str | None] = mapped_column("note_body", carnet.EncryptedText(tenant="practice"))


def test_checks_compare_the_column_behind_the_practice_attribute(
    engine: sa.Engine, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)  # refused before: "names no column of letters"
    carnet.configure(keys)
    try:
        with engine.connect() as conn:
            (spec,) = dbchecks.specs_for(Letter.__table__, conn.dialect.name)
            assert (spec.column, spec.practice) == ("note_body", "practice_id")
            assert dbchecks.missing(conn, spec) == []
        with Session(engine) as s:
            s.add_all([Letter(id=1, practice="p1", body="one"), Letter(id=2, practice="p2")])
            s.commit()
        with Session(engine) as s:  # the ORM's re-seal of a moved row passes the checks
            letter = s.get(Letter, 1)
            assert letter is not None
            letter.practice = "p2"
            s.commit()
        with Session(engine) as s:
            letter = s.get(Letter, 1)
            assert letter is not None and (letter.practice, letter.body) == ("p2", "one")
        # The practice check reads practice_id: p2's value pasted into a p1 row is refused.
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE letters SET practice_id = 'p1' WHERE id = 2")
        with pytest.raises(TenantMismatch) as exc, engine.begin() as conn:
            t = sa.table("letters", sa.column("id"), sa.column("note_body", sa.LargeBinary))
            v = conn.execute(sa.select(t.c.note_body).where(t.c.id == 1)).scalar_one()
            conn.exec_driver_sql(
                "UPDATE letters SET note_body = "
                + ("%(v)s" if conn.dialect.paramstyle == "pyformat" else "?")
                + " WHERE id = 2",
                {"v": v} if conn.dialect.paramstyle == "pyformat" else (v,),
            )
        assert exc.value.constraint.startswith(spec.name("p"))
    finally:
        carnet.configure(None)
