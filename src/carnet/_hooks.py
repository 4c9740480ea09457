"""carnet's hooks into SQLAlchemy: the one module that attaches listeners.

Every statement any Engine executes (ORM sessions execute through them)
passes :func:`_before_execute`, one pipeline in a fixed order:

1. the SQL guard (:func:`carnet.guard.check_statement`): refuses SQL that
   would compute on ciphertext, before anything else happens, so a refused
   INSERT creates no data key;
2. the tenant binding (:func:`carnet.tenancy.bind_write`): binds each value
   an INSERT or UPDATE writes to its row's practice, refuses what it cannot
   make true, pins an UPDATE to the practices it was bound for, and creates
   the practices' first keys (:mod:`carnet._txkeys`);
3. the blind-index columns (:func:`carnet.indexing.index_columns`): each
   written row gets the index values of its blind-indexed fields, under the
   practice step 2 bound them to.

A step that does not understand a statement raises: the statement is
refused, never passed through (reads of SQLAlchemy's private state go
through :mod:`carnet._sa`, which raises when they are not what carnet
expects).

After it, ``after_execute`` (:func:`_after_execute`): the rows of a Core
SELECT that returns encrypted columns, for an audit trail that wants them
(:func:`carnet.audit_rows.core_result`): a function SQLAlchemy calls on each
Row the result makes, installed only then; it never changes the Row.

Around it:

- ``handle_error``: keep plaintext out of SQLAlchemy's error messages. A
  refusal by one of carnet's database checks becomes carnet's own error; a
  failed statement that writes notes loses its parameters (:mod:`carnet._redact`),
  told so by a flag the pipeline leaves on the connection.
- ``commit`` / ``rollback`` / ``rollback_savepoint``: a practice's first key
  created inside a transaction is forgotten when that transaction rolls back
  (:mod:`carnet._txkeys`).
- The ORM: ``mapper_configured`` (each mapper's encrypted attributes, then
  its blind indexes, and the column loader that opens a value as its row
  loads), per-mapper ``load`` / ``refresh`` / ``before_insert`` /
  ``before_update`` / ``after_*`` (:mod:`carnet.orm`), the flush hooks of
  the blind indexes, and ``do_orm_execute`` (blind indexes of ORM bulk
  statements, then the expiry of encrypted attributes an UPDATE wrote).
- Per table, the database checks created with it (:mod:`carnet.dbchecks`);
  per engine, the SQLite lock watch of long jobs.

:func:`install` runs when an encrypted column meets a table, or a
:class:`~carnet.KeyManager` is made: an application that imports carnet
without using it keeps SQLAlchemy untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Mapper, Session

from . import _redact, _txkeys, audit_rows, dbchecks, guard, indexing, orm, tenancy
from .errors import CarnetError

# conn.info key: whether the statement being executed on the connection binds
# notes (an encrypted column written, an encrypted literal) or wrapped keys.
# Set by the pipeline before execution, read by the redaction of a failure
# that happens while SQLAlchemy processes the parameters.
BINDS_SECRETS = "carnet_binds_secrets"

_installed = False


def _before_execute(
    conn: sa.Connection,
    clauseelement: Any,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
    execution_options: Any,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    # Fail closed until the steps have run: a step that raises leaves the
    # flag on, and a failure with it on hides its parameters.
    conn.info[BINDS_SECRETS] = True
    binds_encrypted = guard.check_statement(clauseelement)  # 1. the SQL guard
    clauseelement, multiparams, params, writes = tenancy.bind_write(  # 2. the tenant binding
        conn, clauseelement, multiparams, params
    )
    multiparams, params = indexing.index_columns(  # 3. the blind-index columns
        conn, clauseelement, multiparams, params
    )
    conn.info[BINDS_SECRETS] = binds_encrypted or writes or _redact._on_key_table(clauseelement)
    return clauseelement, multiparams, params


def _after_execute(
    conn: sa.Connection,
    clauseelement: Any,
    multiparams: Any,
    params: Any,
    execution_options: Any,
    result: Any,
) -> None:
    audit_rows.core_result(conn, clauseelement, execution_options, result)  # the rows read


def _handle_error(ctx: Any) -> BaseException | None:
    orig = ctx.original_exception
    if isinstance(orig, CarnetError):
        return orig
    # A refusal by one of carnet's database checks: carnet's error, chosen by
    # the check's name, and the driver's error stripped of the row it quotes.
    name = dbchecks.check_of(orig)
    if name is not None:
        dbchecks.scrub(orig, name)
        sa_exc = ctx.sqlalchemy_exception
        if sa_exc is not None:
            sa_exc.hide_parameters = True
            sa_exc.params = None
            sa_exc.args = (f"refused by {name}",)
        return dbchecks.error_for(name)
    # Any other failure: strip the notes SQLAlchemy's error would show (see
    # carnet._redact).
    conn = ctx.connection
    flagged = True if conn is None else bool(conn.info.get(BINDS_SECRETS, True))
    _redact.redact(ctx, binds_secrets=flagged)
    return None


def _mapper_configured(mapper: Mapper[Any], class_: type) -> None:
    orm.setup_mapper(mapper, class_)  # encrypted attributes first: the indexes use them
    indexing.setup_mapper(mapper, class_)


def install() -> None:
    """Attach carnet's SQLAlchemy listeners; idempotent, and never at import."""
    global _installed
    if _installed:
        return
    event.listen(sa.Engine, "before_execute", _before_execute, retval=True)
    event.listen(sa.Engine, "after_execute", _after_execute)
    event.listen(sa.Engine, "handle_error", _handle_error)
    event.listen(sa.Engine, "rollback", _txkeys.on_rollback)
    event.listen(sa.Engine, "rollback_savepoint", _txkeys.forget)
    event.listen(sa.Engine, "commit", _txkeys.on_commit)
    event.listen(Mapper, "mapper_configured", _mapper_configured)
    event.listen(Session, "before_flush", indexing.before_flush)
    event.listen(Session, "after_flush_postexec", indexing.after_flush_postexec)
    # In this order: the blind indexes of an ORM bulk statement are added to
    # its parameters, and the statement run (invoke_statement runs the
    # listeners after it), before the expiry of what the UPDATE wrote.
    event.listen(Session, "do_orm_execute", indexing.orm_execute)
    event.listen(Session, "do_orm_execute", orm.expire_after_update)
    _installed = True


# -- listeners on one object, for the modules that need them ---------------------------------


def on_mapper(
    mapper: Mapper[Any], handlers: dict[str, Callable[..., Any]], *, first: bool = False
) -> None:
    """Per-mapper ORM events (``load``, ``before_update``, ...), called with the InstanceState.

    ``first``: ahead of the listeners already attached (SQLAlchemy's ``insert=True``).
    """
    for name, fn in handlers.items():
        event.listen(mapper, name, fn, raw=True, insert=first)


def on_every_mapper(fn: Callable[[Mapper[Any], type], None]) -> None:
    """``fn(mapper, class_)`` for every mapper configured from now on (the audit trail's rows)."""
    event.listen(Mapper, "mapper_configured", fn)


def on_table_create(
    table: sa.Table,
    before: Callable[..., Any],
    after: Callable[..., Any],
) -> None:
    """``before`` and ``after`` CREATE TABLE of ``table``, once per table."""
    # Asked of the table's own listeners, not of a flag in ``table.info``:
    # Alembic's op.create_table and Table.to_metadata copy ``info`` to the new
    # Table, which would then never get its listener.
    if event.contains(table, "after_create", after):
        return
    event.listen(table, "after_create", after)
    event.listen(table, "before_create", before)


def on_engine(engine: sa.Engine, handlers: dict[str, Callable[..., Any]]) -> None:
    """Engine events for one engine (a long job watching its own connections)."""
    for name, fn in handlers.items():
        event.listen(engine, name, fn)
