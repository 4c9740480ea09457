"""Engine-wide hooks.

- Keep plaintext out of SQLAlchemy's own error messages. When a bind
  processor raises inside statement execution (a missing tenant, an
  unreachable master key), SQLAlchemy wraps the error in ``StatementError``,
  whose text lists the statement's parameters: the note in clear. This hook
  re-raises carnet's own error instead, whose message carries no plaintext.
  When anything else fails in a statement that binds an encrypted column (a
  bad date in another column, a constraint), the error keeps its type but
  loses its parameters: before bind processing they are the plaintext notes.
  SQLite's "Could not decode to UTF-8 column 'c' with text '...'" (a Latin-1
  legacy note read as text) loses the quoted text, whatever the statement.
- On SQLite, create a practice's first key on the statement's own connection.
  SQLite has one writer: a key created on a second connection would wait on
  the write lock this connection may already hold (the ORM does the same in
  its flush hook, see :mod:`carnet.orm`).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.sql.compiler import Compiled
from sqlalchemy.sql.dml import Insert, Update

from . import context
from .errors import CarnetError
from .types import EncryptedText

_installed = False


_UNDECODABLE = "Could not decode to UTF-8 column "
_WITH_TEXT = " with text '"
_HIDDEN_DETAIL = "carnet: parameters of a statement on an encrypted column are not shown"


def _handle_error(ctx: Any) -> BaseException | None:
    orig = ctx.original_exception
    if isinstance(orig, CarnetError):
        return orig
    sa_exc = ctx.sqlalchemy_exception
    _scrub_undecodable(orig, sa_exc)
    if sa_exc is not None and sa_exc.params and _binds_encrypted(ctx):
        # Returning a replacement exception cannot help: SQLAlchemy raises it
        # ``from`` the original. So the wrapper itself loses the parameters;
        # dropping them (not only hiding them) also keeps them out of a
        # pickled copy (StatementError.__reduce__), as task queues store.
        sa_exc.hide_parameters = True
        sa_exc.params = None
        sa_exc.add_detail(_HIDDEN_DETAIL)
    return None


def _binds_encrypted(ctx: Any) -> bool:
    """Does the failed statement bind a value of an encrypted column?"""
    ec = ctx.execution_context
    if ec is not None:
        compiled = getattr(ec, "compiled", None)
    else:
        # The error came from bind processing, while SQLAlchemy built the
        # execution context: the parameters shown would be the caller's,
        # plaintext notes included. Only the frames hold the compiled statement.
        compiled = _compiled_from_frames(ctx.original_exception.__traceback__)
        if compiled is None:
            return True  # cannot tell: fail closed, hide them
    if compiled is None:
        return False  # a raw driver-level string statement: no carnet type in it
    binds = getattr(compiled, "binds", None) or {}
    return any(isinstance(b.type, EncryptedText) for b in binds.values())


def _compiled_from_frames(tb: TracebackType | None) -> Compiled | None:
    # SQLAlchemy's _execute_context holds it as ``statement``, _init_compiled
    # as ``compiled``; look no deeper than a few frames.
    for _ in range(6):
        if tb is None:
            return None
        local = tb.tb_frame.f_locals
        for name in ("statement", "compiled"):
            value = local.get(name)
            if isinstance(value, Compiled):
                return value
        tb = tb.tb_next
    return None


def _scrub_undecodable(orig: BaseException, sa_exc: Any) -> None:
    # pysqlite quotes the stored bytes it could not decode: a legacy
    # Latin-1 note, verbatim. Keep the column name, drop the text.
    args = getattr(orig, "args", ())
    if not args or not isinstance(args[0], str) or not args[0].startswith(_UNDECODABLE):
        return
    text = args[0]
    cut = text.find(_WITH_TEXT)
    if cut < 0:
        return
    safe = text[:cut] + " (stored text not shown)"
    orig.args = (safe, *args[1:])
    if sa_exc is not None and sa_exc.args and isinstance(sa_exc.args[0], str):
        # The wrapper copied str(orig) into its own message when it was built.
        sa_exc.args = (sa_exc.args[0].replace(text, safe), *sa_exc.args[1:])


def _before_execute(conn: sa.Connection, clauseelement: Any, *_args: Any) -> None:
    if conn.dialect.name != "sqlite" or not isinstance(clauseelement, Insert | Update):
        return
    tenant = context._tenant.get()
    if tenant is None:
        return  # ORM flushes bind their rows' tenants and create keys in the flush hook
    for col in getattr(clauseelement.table, "c", ()):
        typ = col.type
        if not isinstance(typ, EncryptedText):
            continue
        manager = typ._manager if typ._manager is not None else context._default_manager
        if manager is None or manager.has_cached_active_key(tenant):
            continue
        if not manager.shares_sqlite_database(conn):
            continue
        created = manager.ensure_key_in(conn, tenant)
        if created is not None:
            # If this transaction rolls back, so does the key: forget it. Forgetting
            # a key that did commit costs one reload, never a wrong answer.
            event.listen(
                conn,
                "rollback",
                lambda _c, m=manager, k=created: m.forget_key(tenant, k),
                once=True,
            )


def install() -> None:
    global _installed
    if not _installed:
        event.listen(sa.Engine, "handle_error", _handle_error)
        event.listen(sa.Engine, "before_execute", _before_execute)
        _installed = True
