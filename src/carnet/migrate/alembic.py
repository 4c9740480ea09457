"""Alembic support: autogenerate with EncryptedText, carnet's own tables, expand/contract.

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

Autogenerate and carnet's own tables (docs/alembic.md). One line in
``env.py``::

    context.configure(connection=connection, target_metadata=target_metadata,
                      **carnet.migrate.alembic.autogenerate_options())

makes ``alembic revision --autogenerate`` render ``carnet.EncryptedText(...)``
with its ``import carnet``, never propose to drop or alter carnet's tables
(``carnet_keys`` holds every wrapped data key: dropping it crypto-shreds every
tenant), and propose ``upgrade_carnet_tables(op)`` while they are missing or
older than the running carnet declares them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from .. import dbchecks
from ..errors import ConfigurationError
from ..schema import KEYS_TABLE
from ..types import EncryptedText
from . import run as run_mod
from . import state
from .carnet_tables import (
    CarnetObjects,
    IncludeObject,
    Step,
    create_carnet_tables,
    plan_carnet_tables,
    upgrade_carnet_tables,
)
from .carnet_tables import alembic_ops as _ops

try:  # op.carnet_install_checks / op.carnet_drop_checks, for migrations that import this
    from . import alembic_ops as _checks_ops  # noqa: F401
except ModuleNotFoundError as exc:  # Alembic not installed: the helpers below need it anyway
    if exc.name != "alembic":
        raise

# Public here: env.py and migrations import them from carnet.migrate.alembic.
__all__ = [
    "CarnetObjects",
    "Step",
    "add_encrypted_column",
    "autogenerate_options",
    "binary_type",
    "contract",
    "create_carnet_tables",
    "plan_carnet_tables",
    "render_item",
    "render_type",
    "require_strict",
    "upgrade_carnet_tables",
]


def binary_type() -> sa.types.TypeEngine[Any]:
    """The column type EncryptedText(storage='binary') uses on each backend."""
    return (
        sa.LargeBinary()
        .with_variant(postgresql.BYTEA(), "postgresql")
        .with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
    )


def add_encrypted_column(
    table: str, column: str, type_: EncryptedText | None = None, *, op: Any = None
) -> None:
    """Expand: add a nullable binary column to receive the ciphertext.

    ``type_``: the carnet type the application declares for it, when not
    ``EncryptedText()``: ``carnet.EncryptedString(n)`` (an inline
    ``VARBINARY(1067 + 4n)`` on MariaDB) or ``carnet.EncryptedDate()``.
    """
    _ops(op).add_column(table, sa.Column(column, _storage(type_), nullable=True))


def _storage(type_: EncryptedText | None) -> sa.types.TypeEngine[Any]:
    if type_ is None:
        return binary_type()
    if not isinstance(type_, EncryptedText):
        raise ConfigurationError(
            "type_ must be a carnet type (EncryptedString(n), EncryptedDate())"
        )
    # The column the type's load_dialect_impl gives on each backend, as plain
    # SQLAlchemy types: Alembic's batch mode (SQLite) compares types by name.
    from ..types import EncryptedDate, EncryptedString, ciphertext_width

    width: int | None = None
    if isinstance(type_, EncryptedString):
        width = type_.width
    elif isinstance(type_, EncryptedDate):
        width = ciphertext_width(10, type_.storage)
    if type_.storage == "text":
        return sa.Text() if width is None else sa.String(width)
    if width is None:
        return binary_type()
    return (
        sa.LargeBinary(width)
        .with_variant(postgresql.BYTEA(), "postgresql")
        .with_variant(mysql.VARBINARY(width), "mysql", "mariadb")
    )


def require_strict(table: str, column: str, *, op: Any = None) -> None:
    """Raise unless ``carnet migrate finish`` recorded ``table.column`` as strict."""
    rec = state.get(_ops(op).get_bind(), table, column)
    if rec is None or rec["state"] != state.STRICT:
        raise ConfigurationError(
            f"{table}.{column} is not recorded as strict: run `carnet migrate finish` for it "
            "first (it checks that every value opens)"
        )


def contract(
    table: str,
    *,
    legacy: str,
    new: str,
    rename: bool = True,
    type_: EncryptedText | None = None,
    op: Any = None,
) -> None:
    """Contract: drop the legacy plaintext column, then (by default) rename the new one to it.

    ``type_``: the type given to :func:`add_encrypted_column`, if any (a
    rename on MariaDB restates the column's type).
    """
    o = _ops(op)
    require_strict(table, new, op=o)
    # The new column's database checks (installed by `migrate finish`) name the
    # column in their bodies, and SQLite's table copy drops its triggers: they
    # are removed first and installed again on the column's final name.
    bind = o.get_bind()
    spec = run_mod.recorded_checks_spec(bind, table, new, state.get(bind, table, new) or {})
    dbchecks.drop(bind, [spec])
    # batch_alter_table: ALTERs on PostgreSQL and MariaDB, a table copy on
    # SQLite where the ALTER is not supported. The copy also drops the triggers
    # of the table's other columns (those a previous contract() of the same
    # migration installed, say), and a parent's trigger that reads the table
    # would stop the copy: they are put aside and created again afterwards.
    kept = _sqlite_triggers(bind, table, legacy)
    with o.batch_alter_table(table) as b:
        b.drop_column(legacy)
    if rename:
        with o.batch_alter_table(table) as b:
            b.alter_column(
                new, new_column_name=legacy, existing_type=_storage(type_), existing_nullable=True
            )
        spec = replace(spec, column=legacy)
    _restore_triggers(bind, kept)
    dbchecks.install(bind, [spec])
    if rename:
        if sa.inspect(bind).has_table(state.MIGRATIONS.name):
            t = state.MIGRATIONS
            bind.execute(
                t.update()
                .where(t.c.table_name == table, t.c.column_name == new)
                .values(column_name=legacy, source_column=legacy, mode="contracted")
            )


def _sqlite_triggers(bind: sa.Connection, table: str, dropped: str) -> dict[str, str]:
    """carnet's triggers that a table copy of ``table`` loses or trips over (SQLite).

    Those on ``table`` vanish with the copy. Those on another table that read
    ``table`` (a parent's practice-move check) make SQLite refuse to rename
    the copy into place: they are dropped here. Both are created again by
    :func:`_restore_triggers`, but the ones that name the column being
    dropped.
    """
    if bind.dialect.name != "sqlite":
        return {}
    rows = bind.exec_driver_sql(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger'"
    ).all()
    refers = re.compile(rf"\b{re.escape(table)}\b")
    gone = re.compile(rf"\b{re.escape(dropped)}\b")
    kept: dict[str, str] = {}
    for name, tbl, sql in rows:
        name, sql = str(name), str(sql or "")
        if not name.startswith("carnet_") or not sql:
            continue
        if tbl != table:
            if not refers.search(sql):
                continue
            bind.exec_driver_sql(f'DROP TRIGGER "{name}"')
        if not gone.search(sql):
            kept[name] = sql
    return kept


def _restore_triggers(bind: sa.Connection, kept: dict[str, str]) -> None:
    if not kept:
        return
    rows = bind.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").all()
    present = {str(r[0]) for r in rows}
    for name, sql in kept.items():
        if name not in present:
            bind.exec_driver_sql(sql)


# -- autogenerate: how an EncryptedText column is written into a migration -------------


def render_type(type_: EncryptedText) -> str:
    """``carnet.EncryptedText(...)`` with the arguments that shape stored values.

    ``tenant`` and an explicit ``label`` are kept (a migration that writes
    data through the table it creates must seal as the application does);
    ``storage`` only when it is not the default. ``mixed_read`` and
    ``manager`` are runtime choices of the application, not schema.
    ``EncryptedString(n)`` keeps its length (it sizes the column) and
    ``EncryptedDate`` its name (it sizes the column and types the value), as
    do ``EncryptedBytes`` (with a ``max_bytes`` below the default) and
    ``EncryptedJSON`` (they type the value).
    """
    from ..types import EncryptedDate, EncryptedString
    from ..types_binary import MAX_BYTES, EncryptedBytes, EncryptedJSON

    args = []
    name = "EncryptedText"
    if isinstance(type_, EncryptedString):
        name = "EncryptedString"
        args.append(str(type_.length))
    elif isinstance(type_, EncryptedDate):
        name = "EncryptedDate"
    elif isinstance(type_, EncryptedBytes):
        name = "EncryptedBytes"
    elif isinstance(type_, EncryptedJSON):
        name = "EncryptedJSON"
    if type_.tenant is not None:
        args.append(f"tenant={type_.tenant!r}")
    if type_.label is not None:
        args.append(f"label={type_.label!r}")
    if type_.storage != "binary":
        args.append(f"storage={type_.storage!r}")
    if isinstance(type_, EncryptedBytes) and type_.max_bytes != MAX_BYTES:
        args.append(f"max_bytes={type_.max_bytes}")
    return f"carnet.{name}({', '.join(args)})"


def render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Alembic ``render_item`` hook: EncryptedText as the public name, with its import.

    Without it Alembic writes ``carnet.types.EncryptedText(...)`` and no
    ``import carnet``: the migration fails with NameError.
    """
    if type_ == "type" and isinstance(obj, EncryptedText):
        autogen_context.imports.add("import carnet")
        return render_type(obj)
    if type_ == "type" and _is_blind_index(obj):
        # The database holds a plain BIGINT: the transform, bits and sources
        # live in the application's model, which computes the values. A
        # migration needs only the column (and its index, rendered as usual).
        autogen_context.imports.add("import sqlalchemy as sa")
        return "sa.BigInteger()"
    return False


def _is_blind_index(obj: Any) -> bool:
    from ..types import BlindIndexType

    return isinstance(obj, BlindIndexType)


_render_encrypted_text = render_item  # autogenerate_options' own argument shadows the name


# -- autogenerate: which objects carnet keeps out of it --------------------------------

RenderItem = Callable[[str, Any, Any], Any]


def autogenerate_options(
    *,
    keys_table: str = KEYS_TABLE,
    manage_tables: bool = True,
    include_object: IncludeObject | None = None,
    render_item: RenderItem | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``context.configure(...)`` in ``env.py``.

    ``keys_table``: the key table's name if ``KeyManager(table_name=...)``
    changed it. ``manage_tables``: propose :func:`upgrade_carnet_tables` in
    autogenerated migrations while carnet's tables are missing or outdated
    (``False`` if they live in another database or are managed otherwise).
    ``include_object`` / ``render_item``: the application's own hooks, called
    for everything carnet does not handle.
    """
    from . import _alembic_autogen

    _alembic_autogen.install()
    user_render = render_item

    def _render(type_: str, obj: Any, autogen_context: Any) -> Any:
        rendered = _render_encrypted_text(type_, obj, autogen_context)
        if rendered is False and user_render is not None:
            return user_render(type_, obj, autogen_context)
        return rendered

    return {
        "render_item": _render,
        "include_object": CarnetObjects(
            keys_table, manage_tables=manage_tables, include_object=include_object
        ),
    }
