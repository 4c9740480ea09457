"""Installing, finding and removing the checks; created with their table.

:func:`install` and :func:`drop` run the DDL of :mod:`carnet.dbchecks.ddl`;
:func:`installed`, :func:`missing`, :func:`mode_installed` and
:func:`disabled` read the database's catalog; :func:`attach` has a declared
table create its checks right after CREATE TABLE.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

import sqlalchemy as sa

from .columns import MODES, ColumnSpec, Mode, format_only, specs_for
from .ddl import ddl_objects


def key_table_here(conn: sa.Connection, schema: str | None = None) -> str | None:
    """The key table's name when it lives in ``conn``'s database, else None."""
    from .. import context

    names = ["carnet_keys"]
    manager = context.default_manager()
    if manager is not None and manager.store.name not in names:
        names.insert(0, manager.store.name)
    insp = sa.inspect(conn)
    for name in names:
        if insp.has_table(name, schema=schema):
            return name
    return None


def install(
    conn: sa.Connection,
    specs: Iterable[ColumnSpec],
    *,
    keys_table: str | None | Literal["auto"] = "auto",
) -> list[str]:
    """Create the checks of ``specs`` on ``conn`` (replacing carnet's earlier ones).

    Returns the names of the objects created. Fails, and creates nothing
    (inside the caller's transaction where the database has transactional
    DDL), when existing rows break a check: ``carnet verify`` names them.
    """
    made: list[str] = []
    for spec in specs:
        keys = key_table_here(conn, spec.schema) if keys_table == "auto" else keys_table
        drop(conn, [spec])
        for obj in ddl_objects(spec, conn.dialect, keys_table=keys):
            for sql in obj.create:
                conn.exec_driver_sql(sql)
            made.append(obj.name)
    return made


def drop(conn: sa.Connection, specs: Iterable[ColumnSpec]) -> None:
    """Remove carnet's checks of ``specs``, in every mode (an opt-out, or before a change)."""
    for spec in specs:
        seen: set[tuple[str, str]] = set()
        for mode in MODES:
            for keys in (None, "carnet_keys"):
                objs = ddl_objects(replace(spec, mode=mode), conn.dialect, keys_table=keys)
                # Triggers before the functions they call (PostgreSQL refuses otherwise).
                for obj in reversed(objs):
                    if (obj.kind, obj.name) in seen:
                        continue
                    seen.add((obj.kind, obj.name))
                    for sql in obj.drop:
                        conn.exec_driver_sql(sql)


def installed(conn: sa.Connection, table: str, schema: str | None = None) -> set[str]:
    """Names of carnet's checks and triggers found on ``table`` (and on it as a parent)."""
    d = conn.dialect.name
    if d == "sqlite":
        rows = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,)
        )
        return {r[0] for r in rows if r[0].startswith("carnet_")}
    if d == "postgresql":
        rows = conn.execute(
            sa.text(
                "SELECT c.conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
                "WHERE t.relname = :t AND c.contype = 'c' AND c.convalidated "
                "UNION SELECT g.tgname FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid "
                "WHERE t.relname = :t AND NOT g.tgisinternal AND g.tgenabled <> 'D'"
            ),
            {"t": table},
        )
        return {r[0] for r in rows if r[0].startswith("carnet_")}
    rows = conn.execute(
        sa.text(
            "SELECT CONSTRAINT_NAME FROM information_schema.TABLE_CONSTRAINTS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t AND CONSTRAINT_TYPE = 'CHECK' "
            "UNION SELECT TRIGGER_NAME FROM information_schema.TRIGGERS "
            "WHERE TRIGGER_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = :t"
        ),
        {"t": table},
    )
    return {r[0] for r in rows if r[0].startswith("carnet_")}


def expected(
    spec: ColumnSpec, dialect: sa.Dialect, keys_table: str | None
) -> list[tuple[str, str]]:
    """(table, name) of each constraint or trigger ``spec`` needs (functions left out)."""
    return [
        (o.table, o.name)
        for o in ddl_objects(spec, dialect, keys_table=keys_table)
        if o.kind != "function"
    ]


def missing(conn: sa.Connection, spec: ColumnSpec) -> list[str]:
    """The checks of ``spec`` that the database lacks (or holds disabled)."""
    keys = key_table_here(conn, spec.schema)
    want = expected(spec, conn.dialect, keys)
    found: dict[str, set[str]] = {}
    out = []
    for table, name in want:
        if table not in found:
            found[table] = installed(conn, table, spec.schema)
        if name not in found[table]:
            out.append(name)
    return out


def mode_installed(conn: sa.Connection, spec: ColumnSpec) -> Mode | None:
    """The mode of the format check found on ``spec``'s column, or None."""
    names = installed(conn, spec.table, spec.schema)
    for mode in MODES:
        name = replace(spec, mode=mode).name("f")
        if name in names or name + "_i" in names:
            return mode
    return None


# -- table events: checks created with the table ------------------------------------------


def attach(table: sa.Table) -> None:
    """Have ``table`` create its checks right after CREATE TABLE (once per table)."""
    from .. import _hooks

    # Configuration errors (a CHAR(n) practice column) before CREATE TABLE:
    # SQLite and MariaDB would keep a table created without its checks.
    _hooks.on_table_create(table, before=_before_create, after=_after_create)


def _before_create(table: sa.Table, conn: Any, **_kw: Any) -> None:
    specs_for(table, conn.dialect.name)


def _after_create(table: sa.Table, conn: Any, **_kw: Any) -> None:
    specs = specs_for(table, conn.dialect.name)
    if not specs:
        return
    if not isinstance(conn, sa.Connection):
        # Offline (``alembic upgrade --sql``): emit the DDL as text, key check left
        # out since the key table cannot be looked up.
        for spec in specs:
            for obj in ddl_objects(spec, conn.dialect, keys_table=None):
                for sql in obj.create:
                    conn.execute(sa.DDL(sql.replace("%", "%%")))
        return
    install(conn, specs)


# -- one check replaced, others untouched ----------------------------------------------


def set_format_mode(conn: sa.Connection, spec: ColumnSpec, mode: Mode) -> list[str]:
    """Replace the format check of ``spec``'s column by the one of ``mode``; others untouched."""
    fmt = format_only(spec)
    for m in MODES:
        for obj in ddl_objects(replace(fmt, mode=m), conn.dialect):
            for sql in obj.drop:
                conn.exec_driver_sql(sql)
    made = []
    for obj in ddl_objects(replace(fmt, mode=mode), conn.dialect):
        for sql in obj.create:
            conn.exec_driver_sql(sql)
        made.append(obj.name)
    return made


# -- checks present but not in force -----------------------------------------------------


def disabled(conn: sa.Connection, table: str) -> set[str]:
    """carnet's checks present but not in force: a disabled trigger, a NOT VALID constraint.

    PostgreSQL only (``ALTER TABLE ... DISABLE TRIGGER``, ``ADD CONSTRAINT ...
    NOT VALID``); :func:`installed` leaves them out, so :func:`missing` lists
    them. MariaDB's ``SET check_constraint_checks=0`` and SQLite's ``PRAGMA
    ignore_check_constraints`` are settings of one session, invisible here.
    """
    if conn.dialect.name != "postgresql":
        return set()
    rows = conn.execute(
        sa.text(
            "SELECT c.conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "WHERE t.relname = :t AND c.contype = 'c' AND NOT c.convalidated "
            "UNION SELECT g.tgname FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid "
            "WHERE t.relname = :t AND NOT g.tgisinternal AND g.tgenabled = 'D'"
        ),
        {"t": table},
    )
    return {r[0] for r in rows if r[0].startswith("carnet_")}
