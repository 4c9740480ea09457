"""Models and helpers for tests/scenarios/test_db_refuses.py: statements the database refuses.

The models cover the three places a row's practice can be: the row itself
(``notes``), a parent row reached by a foreign key (``patients`` /
``consultations``), and the base table of a joined inheritance (``docs`` /
``letters``). The helpers run SQL *around* carnet's Python guard (driver SQL,
a raw DBAPI cursor) and read back what is stored, byte for byte.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import carnet
from carnet import dbchecks
from carnet.errors import CarnetError

# A distinctive note planted in every row: it must appear in no error.
SECRET = "Zq7-planted-note-dysphorie-91c4"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str | None] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    tbody: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text")
    )


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))


class Consultation(Base):
    __tablename__ = "consultations"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patients.id"))
    patient: Mapped[Patient] = relationship()
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="patient.practice_id"))


class Doc(Base):
    __tablename__ = "docs"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(sa.String(16))
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "doc"}


class Letter(Doc):
    __tablename__ = "letters"
    id: Mapped[int] = mapped_column(sa.ForeignKey("docs.id"), primary_key=True)
    letter: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    __mapper_args__ = {"polymorphic_identity": "letter"}


class MixedNote(Base):
    """A column in a migration's mixed-read phase: legacy plaintext still allowed."""

    __tablename__ = "mixed_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str | None] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text", mixed_read=True)
    )


class IntNote(Base):
    """A practice column that is an INTEGER: the database renders it as its digits."""

    __tablename__ = "int_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[int | None] = mapped_column(sa.Integer)
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


TABLES = ("notes", "patients", "consultations", "docs", "letters", "mixed_notes", "int_notes")

# The same ``notes`` table seen by code that knows nothing of carnet: no
# practice column, plain binary and text columns.
plain_metadata = sa.MetaData()
plain_notes = sa.Table(
    "notes",
    plain_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("body", sa.LargeBinary),
    sa.Column("tbody", sa.Text),
)


def _norm(v: Any) -> Any:
    return bytes(v) if isinstance(v, memoryview | bytearray) else v


def snapshot(engine: sa.Engine, tables: Iterable[str] = TABLES) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of ``tables`` as stored (ciphertext bytes), to prove nothing changed."""
    out = {}
    with engine.connect() as conn:
        for t in tables:
            rows = conn.exec_driver_sql(f"SELECT * FROM {t} ORDER BY id")  # noqa: S608
            out[t] = [tuple(_norm(v) for v in r) for r in rows]
    return out


def stored(engine: sa.Engine, table: str, column: str, row_id: int) -> Any:
    """One stored value, as bytes or text."""
    with engine.connect() as conn:
        v = conn.exec_driver_sql(
            f"SELECT {column} FROM {table} WHERE id = {int(row_id)}"  # noqa: S608
        ).scalar_one()
    return _norm(v)


def paramstyle(engine: sa.Engine, sql: str) -> str:
    """``?`` placeholders in the driver's own style."""
    return sql if engine.dialect.name == "sqlite" else sql.replace("?", "%s")


def raw(engine: sa.Engine, sql: str, params: Sequence[Any] = ()) -> None:
    """Run ``sql`` on a raw DBAPI cursor (no SQLAlchemy event at all), then commit."""
    dbapi_conn = engine.raw_connection()
    try:
        cur = dbapi_conn.cursor()
        try:
            if params:
                cur.execute(paramstyle(engine, sql), tuple(params))
            else:
                cur.execute(sql)
            dbapi_conn.commit()
        except BaseException:
            dbapi_conn.rollback()
            raise
        finally:
            cur.close()
    finally:
        dbapi_conn.close()


def driver_sql(engine: sa.Engine, sql: str, params: Sequence[Any] = ()) -> None:
    """Run ``sql`` with ``Connection.exec_driver_sql``: SQLAlchemy, but no statement guard."""
    with engine.begin() as conn:
        if params:
            conn.exec_driver_sql(paramstyle(engine, sql), tuple(params))
        else:
            conn.exec_driver_sql(sql)


def refusal(exc: BaseException) -> str | None:
    """The name of the carnet check behind ``exc``: carnet's, SQLAlchemy's or the driver's error."""
    if isinstance(exc, CarnetError):
        return exc.constraint
    orig = getattr(exc, "orig", None)
    return dbchecks.check_of(orig if orig is not None else exc)


def chain(err: BaseException) -> list[BaseException]:
    """``err`` and every exception reachable by ``__cause__`` / ``__context__``."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return seen


def leaks(err: BaseException, secrets: Iterable[str] = (SECRET,)) -> list[str]:
    """Where a planted secret shows in ``err``: its text, repr, chain or formatted traceback."""
    texts = {"traceback": "".join(traceback.format_exception(err))}
    for i, e in enumerate(chain(err)):
        texts[f"str[{i}] {type(e).__name__}"] = str(e)
        texts[f"repr[{i}] {type(e).__name__}"] = repr(e)
        texts[f"args[{i}] {type(e).__name__}"] = repr(e.args)
    found: list[str] = []
    for s in secrets:
        forms = (s, s.encode().hex(), s.encode().hex().upper())
        found.extend(where for where, t in texts.items() if any(f in t for f in forms))
    return found


def name(kind: str, table: str, column: str) -> str:
    return dbchecks.check_name(kind, table, column)
