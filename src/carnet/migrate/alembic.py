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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from ..errors import ConfigurationError
from ..keystore import add_key_kinds_in
from ..schema import KEYS_TABLE, carnet_metadata, looks_like_carnet_table, table_names
from ..types import EncryptedText
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
    ``VARBINARY(45 + 4n)`` on MariaDB) or ``carnet.EncryptedDate()``.
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
    from ..searchable import EncryptedDate, EncryptedString, ciphertext_width

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
    # batch_alter_table: ALTERs on PostgreSQL and MariaDB, a table copy on
    # SQLite where the ALTER is not supported.
    with o.batch_alter_table(table) as b:
        b.drop_column(legacy)
    if rename:
        with o.batch_alter_table(table) as b:
            b.alter_column(
                new, new_column_name=legacy, existing_type=_storage(type_), existing_nullable=True
            )
        bind = o.get_bind()
        if sa.inspect(bind).has_table(state.MIGRATIONS.name):
            t = state.MIGRATIONS
            bind.execute(
                t.update()
                .where(t.c.table_name == table, t.c.column_name == new)
                .values(column_name=legacy, source_column=legacy, mode="contracted")
            )


# -- autogenerate: how an EncryptedText column is written into a migration -------------


def render_type(type_: EncryptedText) -> str:
    """``carnet.EncryptedText(...)`` with the arguments that shape stored values.

    ``tenant`` and an explicit ``label`` are kept (a migration that writes
    data through the table it creates must seal as the application does);
    ``storage`` only when it is not the default. ``mixed_read`` and
    ``manager`` are runtime choices of the application, not schema.
    ``EncryptedString(n)`` keeps its length (it sizes the column) and
    ``EncryptedDate`` its name (it sizes the column and types the value).
    """
    from ..searchable import EncryptedDate, EncryptedString

    args = []
    name = "EncryptedText"
    if isinstance(type_, EncryptedString):
        name = "EncryptedString"
        args.append(str(type_.length))
    elif isinstance(type_, EncryptedDate):
        name = "EncryptedDate"
    if type_.tenant is not None:
        args.append(f"tenant={type_.tenant!r}")
    if type_.label is not None:
        args.append(f"label={type_.label!r}")
    if type_.storage != "binary":
        args.append(f"storage={type_.storage!r}")
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
    from ..searchable import BlindIndexType

    return isinstance(obj, BlindIndexType)


_render_encrypted_text = render_item  # autogenerate_options' own argument shadows the name


# -- autogenerate: which objects carnet keeps out of it --------------------------------

IncludeObject = Callable[[Any, Any, str, bool, Any], bool]
RenderItem = Callable[[str, Any, Any], Any]


class CarnetObjects:
    """Alembic ``include_object`` filter that hides carnet's tables from autogenerate.

    A table is carnet's if its name is one of carnet's (with ``keys_table``)
    or if its columns are those of a carnet table (a key table renamed by
    ``KeyManager(table_name=...)`` and not named here is still recognised).
    Its columns, indexes and constraints are hidden with it: carnet's tables
    change only through :func:`upgrade_carnet_tables`. Everything else goes
    to ``include_object`` (the application's own filter) if given.
    """

    def __init__(
        self,
        keys_table: str = KEYS_TABLE,
        *,
        manage_tables: bool = True,
        include_object: IncludeObject | None = None,
    ) -> None:
        self.keys_table = keys_table
        self.manage_tables = manage_tables
        self.include_object = include_object
        self.names = table_names(keys_table)

    def is_carnet_table(self, table: sa.Table) -> bool:
        return table.name in self.names or looks_like_carnet_table(c.name for c in table.columns)

    def __call__(self, obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        table = obj if type_ == "table" else getattr(obj, "table", None)
        if isinstance(table, sa.Table) and self.is_carnet_table(table):
            return False
        if self.include_object is not None:
            return self.include_object(obj, name, type_, reflected, compare_to)
        return True


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


# -- carnet's own tables as Alembic operations -----------------------------------------


@dataclass(frozen=True)
class Step:
    """One change that brings carnet's tables up to date; ``apply`` takes Alembic's ``op``."""

    description: str
    apply: Callable[[Any], None]


def plan_carnet_tables(bind: sa.Engine | sa.Connection, keys_table: str = KEYS_TABLE) -> list[Step]:
    """What the live database lacks of carnet's current tables, in order; empty when up to date.

    Compared: missing tables, missing columns, and the collation of string
    columns that carnet declares with one. Nothing is ever dropped.
    """
    insp = sa.inspect(bind)
    dialect = bind.dialect
    steps: list[Step] = []
    for table in carnet_metadata(keys_table).sorted_tables:
        if not insp.has_table(table.name):
            steps.append(Step(f"create table {table.name}", _create_table_step(table)))
            continue
        live = {c["name"].lower(): c for c in insp.get_columns(table.name)}
        for col in table.columns:
            got = live.get(col.name.lower())
            if got is None and table.name == keys_table and col.name == "kind":
                # Not a plain ADD COLUMN: the one-active-key and version
                # constraints become per kind too, or a practice's first index
                # root would collide with its active data key.
                steps.append(
                    Step(
                        f"add key kinds to {table.name} (kind column, constraints per kind)",
                        _key_kinds_step(table),
                    )
                )
                continue
            if got is None:
                steps.append(
                    Step(f"add column {table.name}.{col.name}", _add_column_step(table.name, col))
                )
                continue
            step = _collation_step(dialect, table.name, col, got)
            if step is not None:
                steps.append(step)
    return steps


def _key_kinds_step(table: sa.Table) -> Callable[[Any], None]:
    def apply(op: Any) -> None:
        # The store's own upgrade (carnet init runs the same), inside the
        # migration's transaction.
        add_key_kinds_in(op.get_bind(), table)

    return apply


def _create_table_step(table: sa.Table) -> Callable[[Any], None]:
    def apply(op: Any) -> None:
        from alembic.operations import ops

        op.invoke(ops.CreateTableOp.from_table(table))

    return apply


def _add_column_step(table_name: str, col: sa.Column[Any]) -> Callable[[Any], None]:
    new = col._copy()
    if not new.nullable and new.server_default is None:
        # Existing rows need a value for a NOT NULL column: the declared
        # Python-side default, when it is a constant, becomes the server
        # default that fills them. Without one the ALTER could only fail.
        default = col.default
        arg = getattr(default, "arg", None)
        if default is None or callable(arg) or not getattr(default, "is_scalar", False):
            raise ConfigurationError(
                f"carnet declares {table_name}.{col.name} NOT NULL without a constant default: "
                "existing rows cannot be given a value"
            )
        # A str is quoted by SQLAlchemy itself; other constants are rendered by
        # each dialect's DDL compiler as literals.
        new.server_default = sa.DefaultClause(
            arg if isinstance(arg, str) else sa.literal(arg, type_=col.type)
        )

    def apply(op: Any) -> None:
        op.add_column(table_name, new)

    return apply


def _collation_of(type_: sa.types.TypeEngine[Any], dialect: sa.Dialect) -> str | None:
    return getattr(type_.dialect_impl(dialect), "collation", None)


def _collation_step(
    dialect: sa.Dialect, table_name: str, col: sa.Column[Any], live: Any
) -> Step | None:
    """The hook where a change of a string column's collation is planned.

    carnet declares a collation where exact comparison matters (tenant ids
    are exact strings: no case or trailing-space folding). On PostgreSQL and
    MariaDB the column is altered in place to the declared type, keeping its
    nullability; a unique index on it is kept by the database. SQLite
    compares with BINARY (exact) unless told otherwise, and changing a
    collation there means rebuilding the table: left to a batch migration.
    """
    want = _collation_of(col.type, dialect)
    if want is None or dialect.name == "sqlite":
        return None
    have = getattr(live.get("type"), "collation", None) or live.get("collation")
    if have is not None and have.lower() == want.lower():
        return None
    declared = col.type.dialect_impl(dialect)
    nullable = bool(live.get("nullable", col.nullable))

    def apply(op: Any) -> None:
        op.alter_column(
            table_name,
            col.name,
            type_=declared,
            existing_type=live["type"],
            existing_nullable=nullable,
        )

    return Step(f"set collation of {table_name}.{col.name} to {want}", apply)


def _offline(o: Any) -> bool:
    return bool(o.get_context().as_sql)


def create_carnet_tables(op: Any = None, *, keys_table: str = KEYS_TABLE) -> None:
    """Create whichever of carnet's tables is missing (an Alembic migration step).

    In offline mode (``alembic upgrade --sql``) nothing can be inspected: the
    script creates all three tables.
    """
    o = _ops(op)
    tables = carnet_metadata(keys_table).sorted_tables
    if not _offline(o):
        insp = sa.inspect(o.get_bind())
        tables = [t for t in tables if not insp.has_table(t.name)]
    for table in tables:
        _create_table_step(table)(o)


def upgrade_carnet_tables(op: Any = None, *, keys_table: str = KEYS_TABLE) -> list[str]:
    """Bring carnet's tables to what this release declares; idempotent (an Alembic step).

    Compares the live database with :func:`carnet.schema.carnet_metadata` and
    applies what is missing (see :func:`plan_carnet_tables`); running it again
    does nothing. Returns the descriptions of the steps applied. In offline
    mode it creates the three tables, as :func:`create_carnet_tables` does.
    """
    o = _ops(op)
    if _offline(o):
        create_carnet_tables(o, keys_table=keys_table)
        return [f"create table {t.name}" for t in carnet_metadata(keys_table).sorted_tables]
    steps = plan_carnet_tables(o.get_bind(), keys_table)
    for step in steps:
        step.apply(o)
    return [s.description for s in steps]
