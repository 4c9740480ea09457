"""The encrypted type is recognised wherever it hides: SQL guard, write guard and ORM alike.

One function (``carnet.types.encrypted_type``) decides whether a column is
encrypted. Each form below stores carnet values: a ``TypeDecorator`` whose
``impl`` is ``EncryptedText``, ``with_variant``, ``type_coerce``, a second
``Table`` object for the same table, a reflected table given its type back,
a searchable type. For each: SQL over the ciphertext is refused before it
runs, a write is sealed for its row's practice (a scope of another practice
is refused), and the value reads back as text, through Core and the ORM.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

import carnet
from carnet.errors import TenantMismatch, TenantRequired, UnsupportedOperation
from carnet.types import encrypted_type

DIALECTS = ("sqlite", "postgresql", "mysql", "mariadb")


class Wrapped(TypeDecorator[Any]):
    """An application's own type around carnet's, as a codebase grows them."""

    impl = carnet.EncryptedText
    cache_ok = True


def _declared(md: sa.MetaData, name: str, body: sa.types.TypeEngine[Any]) -> sa.Table:
    return sa.Table(
        name,
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(20)),
        sa.Column("body", body),
    )


def wrapped(md: sa.MetaData, _engine: sa.Engine) -> sa.Table:
    return _declared(md, "w_wrapped", Wrapped(tenant="practice_id"))


def variant(md: sa.MetaData, _engine: sa.Engine) -> sa.Table:
    enc = carnet.EncryptedText(tenant="practice_id", label="w_variant.body")
    return _declared(md, "w_variant", sa.LargeBinary().with_variant(enc, *DIALECTS))


def second_table(md: sa.MetaData, engine: sa.Engine) -> sa.Table:
    # The application's table, and a second Table object for it (another
    # MetaData, as a script or a report builds one).
    _declared(md, "w_second", carnet.EncryptedText(tenant="practice_id"))
    md.create_all(engine)
    return _declared(
        sa.MetaData(), "w_second", carnet.EncryptedText(tenant="practice_id", label="w_second.body")
    )


def reflected(md: sa.MetaData, engine: sa.Engine) -> sa.Table:
    _declared(md, "w_reflected", carnet.EncryptedText(tenant="practice_id"))
    md.create_all(engine)
    return sa.Table(
        "w_reflected",
        sa.MetaData(),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id", label="w_reflected.body")),
        autoload_with=engine,
    )


def searchable(md: sa.MetaData, _engine: sa.Engine) -> sa.Table:
    return _declared(md, "w_string", carnet.EncryptedString(200, tenant="practice_id"))


FORMS: dict[str, Callable[[sa.MetaData, sa.Engine], sa.Table]] = {
    "TypeDecorator(impl=EncryptedText)": wrapped,
    "with_variant": variant,
    "a second Table": second_table,
    "a reflected Table": reflected,
    "EncryptedString": searchable,
}


@pytest.fixture(params=sorted(FORMS))
def table(request: pytest.FixtureRequest, keys: carnet.KeyManager, engine: sa.Engine) -> sa.Table:
    md = sa.MetaData()
    t = FORMS[request.param](md, engine)
    md.create_all(engine)
    t.metadata.create_all(engine)
    return t


def test_the_one_function_sees_the_encrypted_type(table: sa.Table, engine: sa.Engine) -> None:
    assert encrypted_type(table.c.body, engine.dialect.name) is not None
    assert encrypted_type(table.c.practice_id, engine.dialect.name) is None


def test_sql_over_the_ciphertext_is_refused(table: sa.Table, engine: sa.Engine) -> None:
    body = table.c.body
    # Some are refused as they are built (the column's comparator), the others
    # when executed (the SQL guard): either way, before the database sees them.
    refused: list[Callable[[], Any]] = [
        lambda: sa.select(table).order_by(body),
        lambda: sa.select(table).order_by(sa.desc(body)),
        lambda: sa.select(table).order_by(sa.desc("body")),
        lambda: sa.select(sa.func.length(body)),
        lambda: sa.select(table.c.id).group_by(body),
        lambda: sa.select(table.c.id).where(sa.func.lower(body) == "x"),
        lambda: sa.select(sa.func.row_number().over(partition_by=body)),
        lambda: sa.select(table).order_by(sa.type_coerce(table.c.practice_id, Wrapped())),
    ]
    with carnet.tenant_scope("A"), engine.connect() as conn:
        for build in refused:
            with pytest.raises(UnsupportedOperation):
                conn.execute(build())


def test_writes_are_sealed_for_their_row_and_read_back(
    table: sa.Table, engine: sa.Engine, keys: carnet.KeyManager
) -> None:
    # No scope: each row's values are sealed for its own practice.
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [
                {"id": 1, "practice_id": "A", "body": "note de A"},
                {"id": 2, "practice_id": "B", "body": "note de B"},
            ],
        )
    # A scope never writes into another practice's row.
    with carnet.tenant_scope("B"), engine.begin() as conn, pytest.raises(TenantMismatch):
        conn.execute(table.insert(), {"id": 3, "practice_id": "A", "body": "PLANTED"})
    with engine.begin() as conn, pytest.raises(TenantRequired):
        conn.execute(table.insert(), {"id": 4, "body": "no practice"})
    for practice, row_id in (("A", 1), ("B", 2)):
        with carnet.tenant_scope(practice), engine.connect() as conn:
            got = conn.execute(sa.select(table.c.body).where(table.c.id == row_id)).scalar_one()
        assert got == f"note de {practice}"
    # Stored sealed, for the row's practice.
    with engine.connect() as conn:
        raw = conn.execute(
            sa.select(sa.type_coerce(table.c.body, sa.LargeBinary)).where(table.c.id == 1)
        ).scalar_one()
    raw = raw.encode() if isinstance(raw, str) else bytes(raw)
    assert b"note de A" not in raw
    assert carnet.envelope.tenant_of(raw) == "A"


def test_the_orm_opens_a_wrapped_column_under_its_row(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    class Base(DeclarativeBase):
        pass

    class Letter(Base):
        __tablename__ = "w_letters"
        id: Mapped[int] = mapped_column(primary_key=True)
        practice_id: Mapped[str] = mapped_column(sa.String(20))
        body: Mapped[str] = mapped_column(Wrapped(tenant="practice_id"))

    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(
            [Letter(id=1, practice_id="A", body="de A"), Letter(id=2, practice_id="B", body="de B")]
        )
        s.commit()
    with Session(engine) as s:
        # No scope: each value opens under its own row's practice.
        assert {(n.practice_id, n.body) for n in s.scalars(sa.select(Letter))} == {
            ("A", "de A"),
            ("B", "de B"),
        }
        with pytest.raises(UnsupportedOperation):
            s.scalars(sa.select(Letter).order_by(Letter.body)).all()
