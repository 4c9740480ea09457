"""carnet._redact: another column fails next to a note, the error must not render the note.

SQLAlchemy's ``StatementError`` lists the statement's parameters. When a bind
processor fails (a bad flag, a bad date on SQLite) those are the caller's
values, the note in clear; when the database refuses the row they are the
processed values. Whatever failed, a statement that binds an encrypted column
renders no parameters: Core insert, executemany and ORM flush, on every
backend, in str, repr, the printed traceback and the whole cause/context chain.
At the end, ``redact`` called directly from a test's own error hook: before
execution it takes the pipeline's word (``binds_secrets``), after it the
compiled statement's binds.
"""

from __future__ import annotations

import datetime
import logging
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from carnet import _redact

SECRET = "PLANTED-depression-4d1e9"


class Base(DeclarativeBase):
    pass


class Visit(Base):
    __tablename__ = "visits"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    seen_on: Mapped[datetime.date | None] = mapped_column(sa.Date)
    urgent: Mapped[bool | None] = mapped_column(sa.Boolean)
    note: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


VISITS = Visit.__table__

# A bind processor raises on every backend (Boolean refuses a string); a bad
# date is refused by SQLite's bind processor, by the server elsewhere.
BAD = {"flag": {"urgent": "yes"}, "date": {"seen_on": "31/02/2026"}}


def _everything(exc: BaseException) -> str:
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        parts += [str(e), repr(e), repr(getattr(e, "args", ""))]
        parts.append(repr(getattr(e, "params", "")))
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return "\n".join(parts)


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """This module's models, created by the shared ``keys``."""
    return (Base.metadata,)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)


def _row(i: int, bad: dict[str, Any] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": i,
        "practice_id": "p1",
        "seen_on": datetime.date(2026, 1, i),
        "urgent": False,
        "note": f"{SECRET} {i}",
    }
    row.update(bad or {})
    return row


def _check(exc: BaseException, logs: pytest.LogCaptureFixture, engine: sa.Engine) -> None:
    assert isinstance(exc, sa.exc.StatementError), type(exc)
    text = _everything(exc)
    assert SECRET not in text
    assert "INSERT INTO visits" in text  # the statement is still named
    assert SECRET not in logs.text
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(VISITS)).scalar_one() == 0


@pytest.mark.parametrize("bad", sorted(BAD))
def test_core_insert(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture, bad: str
) -> None:
    with (
        pytest.raises(sa.exc.StatementError) as ei,
        carnet.tenant_scope("p1"),
        engine.begin() as conn,
    ):
        conn.execute(VISITS.insert(), _row(1, BAD[bad]))
    _check(ei.value, logs, engine)


@pytest.mark.parametrize("bad", sorted(BAD))
def test_executemany(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture, bad: str
) -> None:
    rows = [_row(1), _row(2), _row(3, BAD[bad]), _row(4)]
    with (
        pytest.raises(sa.exc.StatementError) as ei,
        carnet.tenant_scope("p1"),
        engine.begin() as conn,
    ):
        conn.execute(VISITS.insert(), rows)
    _check(ei.value, logs, engine)


@pytest.mark.parametrize("bad", sorted(BAD))
def test_orm_flush(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture, bad: str
) -> None:
    with Session(engine) as s:
        s.add_all([Visit(**_row(1)), Visit(**_row(2, BAD[bad]))])
        with pytest.raises(sa.exc.StatementError) as ei:
            s.commit()
        s.rollback()
    _check(ei.value, logs, engine)


def test_statements_without_encrypted_binds_keep_their_parameters(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    # The hook is engine-wide: the application's other statements keep
    # SQLAlchemy's usual, debuggable message.
    other = sa.Table(
        "plain",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("urgent", sa.Boolean),
    )
    other.create(engine)
    with pytest.raises(sa.exc.StatementError) as ei, engine.begin() as conn:
        conn.execute(other.insert(), {"id": 1, "urgent": "visible-value"})
    assert "visible-value" in str(ei.value)


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_undecodable_legacy_text_is_not_quoted(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    # A Latin-1 legacy note in a mixed-read column: pysqlite's own message
    # quotes the stored bytes.
    summary = sa.Table(
        "legacy",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("summary", carnet.EncryptedText(storage="text", mixed_read=True)),
    )
    summary.create(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO legacy VALUES (1, CAST(? AS TEXT))",
            ((SECRET + " r\u00e9sum\u00e9").encode("latin-1"),),
        )
    logs.clear()  # the planting statement itself is logged
    with (
        pytest.raises(sa.exc.OperationalError) as ei,
        carnet.tenant_scope("p1"),
        engine.connect() as conn,
    ):
        conn.execute(sa.select(summary.c.summary)).all()
    text = _everything(ei.value)
    assert SECRET not in text
    assert "Could not decode to UTF-8 column 'summary'" in text
    assert SECRET not in logs.text


class _WrappedText(sa.types.TypeDecorator[Any]):
    """An application's own type over carnet's."""

    impl = carnet.EncryptedText
    cache_ok = True


_WRAPPED_MD = sa.MetaData()
# The same table, its note column declared through a wrapper: carnet's
# redaction must see through it as its database checks do.
WRAPPED = {
    "variant": sa.Table(
        "visits_variant",
        _WRAPPED_MD,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("seen_on", sa.Date),
        sa.Column("urgent", sa.Boolean),
        sa.Column(
            "note",
            sa.Text().with_variant(
                carnet.EncryptedText(tenant="practice_id"),
                "sqlite",
                "postgresql",
                "mysql",
                "mariadb",
            ),
        ),
    ),
    "decorator": sa.Table(
        "visits_decorator",
        _WRAPPED_MD,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("seen_on", sa.Date),
        sa.Column("urgent", sa.Boolean),
        sa.Column("note", _WrappedText(tenant="practice_id")),
    ),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPED))
@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_wrapped_encrypted_column_hides_its_note_too(
    keys: carnet.KeyManager,
    engine: sa.Engine,
    logs: pytest.LogCaptureFixture,
    bad: str,
    wrapper: str,
) -> None:
    table = WRAPPED[wrapper]
    _WRAPPED_MD.create_all(engine, tables=[table])
    with (
        pytest.raises(sa.exc.StatementError) as ei,
        carnet.tenant_scope("p1"),
        engine.begin() as conn,
    ):
        conn.execute(table.insert(), _row(1, BAD[bad]))
    text = _everything(ei.value)
    assert SECRET not in text and SECRET not in logs.text
    assert f"INSERT INTO {table.name}" in text


# -- redact() called directly, on the failures of real statements ----------------------

_plain = sa.MetaData()
flags = sa.Table(
    "rd_flags",
    _plain,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("flag", sa.Boolean),
    sa.Column("label", sa.String(80)),
)
# Shaped like carnet's key table (recognised by its columns, whatever its name).
wrapped = sa.Table(
    "rd_wrapped",
    _plain,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("wrapped_key", sa.LargeBinary),
    sa.Column("master_key_uri", sa.String(200)),
)


def _fail_and_redact(
    engine: sa.Engine, binds_secrets: bool, stmt: sa.Executable, params: dict[str, object]
) -> tuple[sa.exc.StatementError, list[object]]:
    """Run ``stmt`` to its failure, calling redact() from this test's own error hook."""
    contexts: list[object] = []

    def hook(ctx: sa.engine.ExceptionContext) -> None:
        contexts.append(ctx.execution_context)
        _redact.redact(ctx, binds_secrets=binds_secrets)

    sa.event.listen(engine, "handle_error", hook)
    try:
        with pytest.raises(sa.exc.StatementError) as ei, engine.begin() as conn:
            conn.execute(stmt, params)
    finally:
        sa.event.remove(engine, "handle_error", hook)
    return ei.value, contexts


@pytest.mark.parametrize("binds_secrets", [True, False])
def test_redact_takes_the_pipelines_word_when_the_statement_never_reached_the_database(
    engine: sa.Engine, binds_secrets: bool
) -> None:
    # A bind processor fails (Boolean refuses a string) before SQLAlchemy has
    # an execution context: the parameters are the caller's, as given.
    _plain.create_all(engine)
    err, contexts = _fail_and_redact(
        engine, binds_secrets, flags.insert(), {"id": 1, "flag": "yes", "label": SECRET}
    )
    assert contexts == [None]
    shown = _everything(err)
    if binds_secrets:
        assert err.params is None and SECRET not in shown
    else:
        assert err.params is not None and SECRET in shown


@pytest.mark.parametrize("binds_secrets", [True, False])
def test_redact_asks_the_compiled_statement_once_it_ran(
    engine: sa.Engine, binds_secrets: bool
) -> None:
    # A duplicate primary key: the database refused a statement SQLAlchemy
    # compiled, whose binds say what it carries, whatever the pipeline said.
    _plain.create_all(engine)
    with engine.begin() as conn:
        conn.execute(flags.insert(), {"id": 1, "flag": True, "label": "first"})
        conn.execute(wrapped.insert(), {"id": 1, "wrapped_key": b"k", "master_key_uri": "x"})
    err, contexts = _fail_and_redact(
        engine, binds_secrets, flags.insert(), {"id": 1, "flag": True, "label": SECRET}
    )
    assert contexts[0] is not None
    assert isinstance(err, sa.exc.IntegrityError)
    assert err.params is not None and SECRET in _everything(err)  # nothing secret bound
    key_bytes = SECRET.encode()
    err, _ = _fail_and_redact(
        engine,
        binds_secrets,
        wrapped.insert(),
        {"id": 1, "wrapped_key": key_bytes, "master_key_uri": "x"},
    )
    assert isinstance(err, sa.exc.IntegrityError)
    assert err.params is None and SECRET not in _everything(err)  # a wrapped key, as a note
