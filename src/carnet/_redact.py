"""Keep notes out of SQLAlchemy's errors, from the engine-wide ``handle_error`` hook.

- A statement that binds an encrypted column and fails for any other reason
  (a bad date in another column, a constraint) keeps its error type but loses
  its parameters: when bind processing failed they are the caller's values,
  the notes in clear, and SQLAlchemy's message lists them. The statement
  text stays. Other statements keep SQLAlchemy's usual message.
- So does a failed write to carnet's key table: its parameters include
  wrapped data keys.
- SQLite's "Could not decode to UTF-8 column 'c' with text '...'" (a Latin-1
  legacy note read as text) loses the quoted text, whatever the statement.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from sqlalchemy.sql.compiler import Compiled

from .dbchecks import encrypted_type

_UNDECODABLE = "Could not decode to UTF-8 column "
_WITH_TEXT = " with text '"
_HIDDEN_DETAIL = "carnet: parameters of a statement on an encrypted column are not shown"


def redact(ctx: Any) -> None:
    """Strip notes from the error of a failed statement (a ``handle_error`` context)."""
    orig = ctx.original_exception
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


def _binds_encrypted(ctx: Any) -> bool:
    """Does the failed statement bind a note (an encrypted column) or a wrapped key?"""
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
    # Through TypeDecorator and with_variant too: the one answer to "is it encrypted?".
    dialect = getattr(getattr(ctx, "dialect", None), "name", None)
    return any(encrypted_type(b.type, dialect) is not None for b in binds.values()) or (
        _on_key_table(compiled)
    )


def _on_key_table(compiled: Compiled) -> bool:
    # A write to carnet's key table binds wrapped data keys: key material,
    # kept out of messages like a note. Recognised by its columns, since its
    # name is the application's choice.
    table = getattr(getattr(compiled, "statement", None), "table", None)
    columns = getattr(table, "c", None)
    return columns is not None and "wrapped_key" in columns and "master_key_uri" in columns


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
