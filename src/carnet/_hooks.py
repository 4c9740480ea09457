"""Engine-wide hooks.

- Keep plaintext out of SQLAlchemy's own error messages. When a bind
  processor raises inside statement execution (a missing tenant, an
  unreachable master key), SQLAlchemy wraps the error in ``StatementError``,
  whose text lists the statement's parameters: the note in clear. This hook
  re-raises carnet's own error instead, whose message carries no plaintext.
- On SQLite, create a practice's first key on the statement's own connection.
  SQLite has one writer: a key created on a second connection would wait on
  the write lock this connection may already hold (the ORM does the same in
  its flush hook, see :mod:`carnet.orm`).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.sql.dml import Insert, Update

from . import context, guard
from .errors import CarnetError
from .types import EncryptedText

_installed = False


def _handle_error(ctx: Any) -> BaseException | None:
    orig = ctx.original_exception
    if isinstance(orig, CarnetError):
        return orig
    return None


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
        guard.install()  # refuse SQL that would compute on ciphertext (carnet.guard)
        _installed = True
