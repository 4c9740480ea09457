"""Plaintext in a binary encrypted column (SQLite's type affinity lets a BLOB column hold
text) reads as InvalidCiphertext, never a TypeError, and never shows the value."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from carnet import envelope
from carnet.errors import InvalidCiphertext

SECRET = "PLANTED-SECRET-binary-7c1d"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


@pytest.mark.parametrize("stored", [SECRET, 42, 4.5])
def test_non_binary_value_is_invalid_ciphertext(
    tmp_path: Path, master_key_uri: str, stored: object
) -> None:
    path = tmp_path / "clinic.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)
    carnet.configure(keys)
    try:
        with Session(engine) as s:
            s.add(Note(id=1, practice_id="p1", body="sealed"))
            s.commit()
        # A write around carnet, its database checks dropped first (carnet checks drop,
        # or a schema made without them): the BLOB column takes text or a number.
        con = sqlite3.connect(path)
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            con.execute(f'DROP TRIGGER "{name}"')
        con.execute("INSERT INTO notes (id, practice_id, body) VALUES (2, 'p1', ?)", (stored,))
        con.commit()
        con.close()

        errors: list[BaseException] = []
        with Session(engine) as s, carnet.tenant_scope("p1"):
            assert s.get(Note, 1).body == "sealed"  # type: ignore[union-attr]
            with pytest.raises(InvalidCiphertext) as exc:
                s.get(Note, 2)
            errors.append(exc.value)
        notes = sa.table("notes", sa.column("id"), sa.column("body", Note.__table__.c.body.type))
        with engine.connect() as conn:
            # Core under a scope: the decrypting path.
            with carnet.tenant_scope("p1"), pytest.raises(InvalidCiphertext) as exc:
                conn.execute(sa.select(notes.c.body).where(notes.c.id == 2)).all()
            errors.append(exc.value)
            # Core without a scope: the value is refused before it is held as Sealed.
            with pytest.raises(InvalidCiphertext) as exc:
                conn.execute(sa.select(notes.c.body).where(notes.c.id == 2)).all()
            errors.append(exc.value)
        for e in errors:
            assert e.label == "notes.body"
            assert SECRET not in str(e) and SECRET not in repr(e)
    finally:
        carnet.configure(None)
        keys.close()
        engine.dispose()


def test_from_binary() -> None:
    assert envelope.from_binary(b"\x02abc") == b"\x02abc"
    assert envelope.from_binary(memoryview(b"xy")) == b"xy"
    assert envelope.from_binary(bytearray(b"z")) == b"z"
    for bad in ("text", 3, None, ["b"]):
        with pytest.raises(InvalidCiphertext, match="not binary"):
            envelope.from_binary(bad, "t.c")
