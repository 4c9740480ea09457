"""carnet's own tables under Alembic: which are carnet's, and the steps that create or upgrade them.

:class:`CarnetObjects` keeps carnet's tables out of autogenerate;
:func:`plan_carnet_tables` compares the live database with
:func:`carnet.schema.carnet_metadata`; :func:`upgrade_carnet_tables` and
:func:`create_carnet_tables` apply the steps through Alembic's ``op``. Public
through :mod:`carnet.migrate.alembic`; the autogenerate comparator
(:mod:`carnet.migrate._alembic_autogen`) uses them from here, so neither of
those two modules imports the other's definitions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .. import _sa
from ..errors import ConfigurationError
from ..keystore_upgrade import add_audit_kind_in, add_key_kinds_in, lacks_audit_kind
from ..schema import KEYS_TABLE, carnet_metadata, looks_like_carnet_table, table_names

IncludeObject = Callable[[Any, Any, str, bool, Any], bool]


def alembic_ops(op: Any) -> Any:
    if op is not None:
        return op
    try:
        from alembic import op as alembic_op
    except ImportError:  # pragma: no cover - depends on the extra
        from ..errors import MissingDependency

        raise MissingDependency("carnet.migrate.alembic", "alembic", "alembic") from None
    return alembic_op


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
        if type_ == "check_constraint" and reflected and _is_carnet_check(name):
            # carnet's database checks (carnet.dbchecks): never in the models'
            # metadata, installed and dropped by op.carnet_install_checks.
            return False
        if self.include_object is not None:
            return self.include_object(obj, name, type_, reflected, compare_to)
        return True


def _is_carnet_check(name: Any) -> bool:
    from ..dbchecks import NAME_RE

    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


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
        if table.name == keys_table and "kind" in live:
            conn = bind if isinstance(bind, sa.Connection) else None
            if conn is None:
                with bind.connect() as c:  # type: ignore[union-attr]
                    lacks = lacks_audit_kind(c, table)
            else:
                lacks = lacks_audit_kind(conn, table)
            if lacks:
                steps.append(
                    Step(
                        f"let {table.name} hold the audit key (kind check)", _audit_kind_step(table)
                    )
                )
    return steps


def _audit_kind_step(table: sa.Table) -> Callable[[Any], None]:
    def apply(op: Any) -> None:
        add_audit_kind_in(op.get_bind(), table)

    return apply


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
    new = _sa.copy_column(col)
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
    script creates all of carnet's tables.
    """
    o = alembic_ops(op)
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
    mode it creates all of carnet's tables, as :func:`create_carnet_tables` does.
    """
    o = alembic_ops(op)
    if _offline(o):
        create_carnet_tables(o, keys_table=keys_table)
        return [f"create table {t.name}" for t in carnet_metadata(keys_table).sorted_tables]
    steps = plan_carnet_tables(o.get_bind(), keys_table)
    for step in steps:
        step.apply(o)
    return [s.description for s in steps]
