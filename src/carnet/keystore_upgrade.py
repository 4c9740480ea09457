"""Older key tables brought up to date in place, by ``KeyManager.create_schema``,
``carnet init`` and the Alembic upgrade of carnet's tables.

- practice ids made exact (byte for byte): a column whose collation folds case
  or accents is converted (:func:`make_practice_ids_exact`);
- the ``kind`` column, then the audit and decoy kinds, added to a table from
  before them (:func:`add_key_kinds`, :func:`add_audit_kind`).
"""

from __future__ import annotations

import logging

import sqlalchemy as sa

# The kind check read from keystore when the constraint is written (it is the
# declaration's, and tests stand in an older release's for it).
from . import keystore as _keystore
from .keystore import (  # the table's declaration and constants stay with it
    _PRACTICE_COLUMNS,
    EXACT_COLLATION,
)

log = logging.getLogger("carnet")


def inexact_practice_columns(conn: sa.Connection, table: sa.Table) -> list[str]:
    """Practice-id columns of ``table`` whose collation folds ids (MariaDB/MySQL only)."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        return []
    rows = conn.execute(
        sa.text(
            "SELECT COLUMN_NAME, COLLATION_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = COALESCE(:schema, DATABASE()) AND TABLE_NAME = :name"
        ),
        {"schema": table.schema, "name": table.name},
    ).all()
    # A binary column (no collation) compares bytes: exact too.
    return [
        str(col)
        for col, collation in rows
        if str(col) in _PRACTICE_COLUMNS and collation not in (None, EXACT_COLLATION)
    ]


def make_practice_ids_exact(engine: sa.Engine, table: sa.Table) -> list[str]:
    """Convert a key table made with a folding collation; return the converted columns.

    Safe on live data: a binary collation only tells apart ids the old one
    merged, so no unique constraint can be violated by the conversion.
    """
    with engine.begin() as conn:
        cols = inexact_practice_columns(conn, table)
        if not cols:
            return []
        prep = conn.dialect.identifier_preparer
        parts = []
        for name in cols:
            col = table.c[name]
            ddl_type = col.type.compile(dialect=conn.dialect)
            null = "NULL" if col.nullable else "NOT NULL"
            parts.append(f"MODIFY COLUMN {prep.quote(name)} {ddl_type} {null}")
        conn.execute(sa.text(f"ALTER TABLE {prep.format_table(table)} {', '.join(parts)}"))
    log.warning(
        "carnet: converted %s.%s to exact practice ids (collation %s)",
        table.name,
        "/".join(cols),
        EXACT_COLLATION,
    )
    return cols


def add_key_kinds(engine: sa.Engine, table: sa.Table) -> bool:
    """Upgrade a key table made before key kinds to ``table``'s shape; True if it did.

    Adds the ``kind`` column (existing rows are data keys) and makes the
    one-active-key and version rules hold per kind (docs/format.md, "Key
    kinds"). The old constraints are found by their columns, whatever the
    backend named them. SQLite cannot drop a constraint: the table is
    rebuilt and its rows copied, in one transaction. Run with no writer.
    """
    with engine.begin() as conn:
        return add_key_kinds_in(conn, table)


def add_key_kinds_in(conn: sa.Connection, table: sa.Table) -> bool:
    """:func:`add_key_kinds` inside ``conn``'s transaction (an Alembic migration's)."""
    insp = sa.inspect(conn)
    if not insp.has_table(table.name, schema=table.schema):
        return False
    if "kind" in {c["name"] for c in insp.get_columns(table.name, schema=table.schema)}:
        return False
    q = conn.dialect.identifier_preparer
    tname = q.format_table(table)
    if conn.dialect.name == "sqlite":
        old = q.quote(f"{table.name}_before_kinds")
        conn.exec_driver_sql(f"ALTER TABLE {tname} RENAME TO {old}")
        table.create(conn)
        cols = ", ".join(q.quote(c.name) for c in table.c if c.name != "kind")
        conn.exec_driver_sql(
            f"INSERT INTO {tname} ({cols}) SELECT {cols} FROM {old}"  # noqa: S608 - quoted names
        )
        conn.exec_driver_sql(f"DROP TABLE {old}")
        return True
    drop = "DROP INDEX" if conn.dialect.name in ("mysql", "mariadb") else "DROP CONSTRAINT"
    for uc in insp.get_unique_constraints(table.name, schema=table.schema):
        if sorted(uc["column_names"]) in (["active_tenant"], ["tenant", "version"]):
            conn.exec_driver_sql(f"ALTER TABLE {tname} {drop} {q.quote(str(uc['name']))}")
    conn.exec_driver_sql(f"ALTER TABLE {tname} ADD COLUMN kind VARCHAR(8) DEFAULT 'data' NOT NULL")
    n = table.name
    conn.exec_driver_sql(
        f"ALTER TABLE {tname} ADD CONSTRAINT {q.quote(f'uq_{n}_kind_active')} "
        "UNIQUE (kind, active_tenant)"
    )
    conn.exec_driver_sql(
        f"ALTER TABLE {tname} ADD CONSTRAINT {q.quote(f'uq_{n}_tenant_kind_version')} "
        "UNIQUE (tenant, kind, version)"
    )
    ck = q.quote(f"ck_{n}_kind")
    conn.exec_driver_sql(f"ALTER TABLE {tname} ADD CONSTRAINT {ck} CHECK ({_keystore._KIND_CHECK})")
    return True


def lacks_audit_kind(conn: sa.Connection, table: sa.Table) -> bool:
    """True if the live key table has kinds but its kind check refuses ``audit`` or ``decoy``."""
    insp = sa.inspect(conn)
    if not insp.has_table(table.name, schema=table.schema):
        return False
    if "kind" not in {c["name"] for c in insp.get_columns(table.name, schema=table.schema)}:
        return False  # add_key_kinds_in installs the current check
    for ck in insp.get_check_constraints(table.name, schema=table.schema):
        text = str(ck.get("sqltext", ""))
        if "kind" in text and "'index'" in text:
            return "'audit'" not in text or "'decoy'" not in text
    return False


def add_audit_kind(engine: sa.Engine, table: sa.Table) -> bool:
    """Let a key table made before the audit trail hold the audit key; True if it changed."""
    with engine.begin() as conn:
        return add_audit_kind_in(conn, table)


def add_audit_kind_in(conn: sa.Connection, table: sa.Table) -> bool:
    """:func:`add_audit_kind` inside ``conn``'s transaction (an Alembic migration's).

    The kind check gains ``'audit'`` and ``'decoy'``. SQLite cannot alter a check: the table
    is rebuilt and its rows copied, in one transaction, as for key kinds.
    """
    if not lacks_audit_kind(conn, table):
        return False
    q = conn.dialect.identifier_preparer
    tname = q.format_table(table)
    ck = q.quote(f"ck_{table.name}_kind")
    if conn.dialect.name == "sqlite":
        old = q.quote(f"{table.name}_before_audit")
        conn.exec_driver_sql(f"ALTER TABLE {tname} RENAME TO {old}")
        table.create(conn)
        cols = ", ".join(q.quote(c.name) for c in table.c)
        conn.exec_driver_sql(
            f"INSERT INTO {tname} ({cols}) SELECT {cols} FROM {old}"  # noqa: S608 - quoted names
        )
        conn.exec_driver_sql(f"DROP TABLE {old}")
        return True
    conn.exec_driver_sql(f"ALTER TABLE {tname} DROP CONSTRAINT {ck}")
    conn.exec_driver_sql(f"ALTER TABLE {tname} ADD CONSTRAINT {ck} CHECK ({_keystore._KIND_CHECK})")
    return True
