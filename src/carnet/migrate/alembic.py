"""Alembic operations for the expand/contract path.

Expand (one migration, before the backfill)::

    from carnet.migrate.alembic import add_encrypted_column
    def upgrade():
        add_encrypted_column("consultations", "comment_enc")

then ``carnet migrate run --into comment_enc`` fills it online, and ``carnet
migrate finish --into comment_enc`` checks every value and records the new
column as strict. Contract (a later migration)::

    from carnet.migrate.alembic import contract
    def upgrade():
        contract("consultations", legacy="comment", new="comment_enc")

``contract`` refuses to run unless ``finish`` recorded the new column as
strict, so the legacy column cannot be dropped while some note exists only
there. It drops the legacy column and renames the new one to the legacy name
(the default label, ``table.legacy``, then matches the application's default).
Dropping a column does not erase its bytes: run ``carnet migrate compact``
after the contract migration (PostgreSQL needs ``--vacuum-full`` here, and
InnoDB drops columns instantly, leaving the data until OPTIMIZE rebuilds).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from ..errors import ConfigurationError
from . import state


def _ops(op: Any) -> Any:
    if op is not None:
        return op
    try:
        from alembic import op as alembic_op
    except ImportError:  # pragma: no cover - depends on the extra
        from ..errors import MissingDependency

        raise MissingDependency("carnet.migrate.alembic", "alembic", "alembic") from None
    return alembic_op


def binary_type() -> sa.types.TypeEngine[Any]:
    """The column type EncryptedText(storage='binary') uses on each backend."""
    return (sa.LargeBinary()
            .with_variant(postgresql.BYTEA(), "postgresql")
            .with_variant(mysql.LONGBLOB(), "mysql", "mariadb"))


def add_encrypted_column(table: str, column: str, *, op: Any = None) -> None:
    """Expand: add a nullable binary column to receive the ciphertext."""
    _ops(op).add_column(table, sa.Column(column, binary_type(), nullable=True))


def require_strict(table: str, column: str, *, op: Any = None) -> None:
    """Raise unless ``carnet migrate finish`` recorded ``table.column`` as strict."""
    rec = state.get(_ops(op).get_bind(), table, column)
    if rec is None or rec["state"] != state.STRICT:
        raise ConfigurationError(
            f"{table}.{column} is not recorded as strict: run `carnet migrate finish` for it "
            "first (it checks that every value opens)"
        )


def contract(table: str, *, legacy: str, new: str, rename: bool = True, op: Any = None) -> None:
    """Contract: drop the legacy plaintext column, then (by default) rename the new one to it."""
    o = _ops(op)
    require_strict(table, new, op=o)
    # batch_alter_table: ALTERs on PostgreSQL and MariaDB, a table copy on
    # SQLite where the ALTER is not supported.
    with o.batch_alter_table(table) as b:
        b.drop_column(legacy)
    if rename:
        with o.batch_alter_table(table) as b:
            b.alter_column(new, new_column_name=legacy, existing_type=binary_type(),
                           existing_nullable=True)
        bind = o.get_bind()
        if sa.inspect(bind).has_table(state.MIGRATIONS.name):
            t = state.MIGRATIONS
            bind.execute(t.update().where(t.c.table_name == table, t.c.column_name == new)
                         .values(column_name=legacy, source_column=legacy, mode="contracted"))
