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

from typing import Any

from .types import encrypted_type

_UNDECODABLE = "Could not decode to UTF-8 column "
_WITH_TEXT = " with text '"
_HIDDEN_DETAIL = "carnet: parameters of a statement on an encrypted column are not shown"


def redact(ctx: Any, *, binds_secrets: bool = True) -> None:
    """Strip notes from the error of a failed statement (a ``handle_error`` context).

    ``binds_secrets``: what carnet's statement pipeline said of the statement
    before it ran (see carnet._hooks); used when the failure came before
    SQLAlchemy had an execution context to ask.
    """
    orig = ctx.original_exception
    sa_exc = ctx.sqlalchemy_exception
    _scrub_undecodable(orig, sa_exc)
    if sa_exc is not None and sa_exc.params and _binds_encrypted(ctx, binds_secrets):
        # Returning a replacement exception cannot help: SQLAlchemy raises it
        # ``from`` the original. So the wrapper itself loses the parameters;
        # dropping them (not only hiding them) also keeps them out of a
        # pickled copy (StatementError.__reduce__), as task queues store.
        sa_exc.hide_parameters = True
        sa_exc.params = None
        sa_exc.add_detail(_HIDDEN_DETAIL)


def _binds_encrypted(ctx: Any, flagged: bool) -> bool:
    """Does the failed statement bind a note (an encrypted column) or a wrapped key?"""
    ec = ctx.execution_context
    if ec is None:
        # The error came from bind processing, while SQLAlchemy built the
        # execution context: the parameters shown would be the caller's,
        # plaintext notes included. The pipeline said before execution
        # whether the statement binds any (True when it could not tell).
        return flagged
    compiled = getattr(ec, "compiled", None)
    if compiled is None:
        return False  # a raw driver-level string statement: no carnet type in it
    binds = getattr(compiled, "binds", None) or {}
    # Through TypeDecorator and with_variant too: the one answer to "is it encrypted?".
    dialect = getattr(getattr(ctx, "dialect", None), "name", None)
    return any(encrypted_type(b.type, dialect) is not None for b in binds.values()) or (
        _on_key_table(getattr(compiled, "statement", None))
    )


def _on_key_table(stmt: Any) -> bool:
    # A write to carnet's key table binds wrapped data keys: key material,
    # kept out of messages like a note. Recognised by its columns, since its
    # name is the application's choice.
    table = getattr(stmt, "table", None)
    columns = getattr(table, "c", None)
    return columns is not None and "wrapped_key" in columns and "master_key_uri" in columns


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
