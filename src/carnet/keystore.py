"""The ``carnet_keys`` table: wrapped data keys, one row per key version.

States::

    active    encrypts and decrypts; exactly one per tenant and kind (enforced
              by UNIQUE (kind, active_tenant), where ``active_tenant`` holds
              the tenant id only while the key is active: a NULL in a unique
              constraint collides with nothing on any backend, so this works
              where partial indexes do not, e.g. MariaDB)
    inactive  decrypts only, after a rotation
    retired   material erased after re-encryption moved every value away
    destroyed material erased by crypto-shredding the whole tenant

Practice ids are exact strings: ``tenant`` and ``active_tenant`` compare
byte for byte on every backend. SQLite (BINARY) and PostgreSQL (deterministic
collations, no padding for VARCHAR) do so by default; MariaDB's default
collations fold case and accents and ignore trailing spaces, so there the two
columns use ``utf8mb4_nopad_bin`` (``utf8mb4_bin`` would still pad spaces).
A table created before that is converted by :func:`make_practice_ids_exact`.

Kinds::

    data      a data key (DEK): AES-256-GCM key of the tenant's field values
    index     a blind-index root key: HKDF input of the tenant's blind-index
              keys (see carnet.indexkeys); never encrypts anything
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .errors import KeyStoreInconsistent

log = logging.getLogger("carnet")

ACTIVE = "active"
INACTIVE = "inactive"
RETIRED = "retired"
DESTROYED = "destroyed"
STATES = (ACTIVE, INACTIVE, RETIRED, DESTROYED)
DATA = "data"
INDEX = "index"
KINDS = (DATA, INDEX)

# MariaDB collation comparing code points exactly, without padding trailing spaces.
EXACT_COLLATION = "utf8mb4_nopad_bin"
_PRACTICE_COLUMNS = ("tenant", "active_tenant")


def practice_id_type(length: int = 255) -> sa.types.TypeEngine[str]:
    """VARCHAR that compares practice ids exactly on every backend."""
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation=EXACT_COLLATION), "mysql", "mariadb"
    )


def keys_table(metadata: sa.MetaData, name: str = "carnet_keys", *, kinds: bool = True) -> sa.Table:
    """The key table; ``kinds=False``: its shape before key kinds (read until upgraded)."""
    if kinds:
        per_kind: list[sa.schema.SchemaItem] = [
            sa.Column("kind", sa.String(8), nullable=False, default=DATA, server_default=DATA),
            sa.Column("active_tenant", practice_id_type(), nullable=True),
            sa.UniqueConstraint("tenant", "kind", "version", name=f"uq_{name}_tenant_kind_version"),
            sa.UniqueConstraint("kind", "active_tenant", name=f"uq_{name}_kind_active"),
            sa.CheckConstraint("kind IN ('data', 'index')", name=f"ck_{name}_kind"),
        ]
    else:
        per_kind = [
            sa.Column("active_tenant", practice_id_type(), nullable=True, unique=True),
            sa.UniqueConstraint("tenant", "version", name=f"uq_{name}_tenant_version"),
        ]
    return sa.Table(
        name,
        metadata,
        # hex, not binary: a BLOB cannot be a MariaDB primary key without a prefix length.
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant", practice_id_type(), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("master_key_uri", sa.String(1024), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        *per_kind,
        sa.CheckConstraint(
            "state IN ('active', 'inactive', 'retired', 'destroyed')", name=f"ck_{name}_state"
        ),
    )


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


def lock_conflict(exc: sa.exc.DBAPIError) -> bool:
    """Deadlock, lock wait time-out, serialization failure or busy SQLite: worth a retry."""
    orig = exc.orig
    code = (getattr(orig, "args", None) or [None])[0]
    return (
        code in (1205, 1213)
        or getattr(orig, "sqlstate", None) in ("40001", "40P01", "55P03")
        or "database is locked" in str(orig).lower()
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class KeyRecord:
    """A row of ``carnet_keys``. ``wrapped_key`` is excluded from ``repr``."""

    key_id: bytes
    tenant: str
    version: int
    state: str
    master_key_uri: str
    created_at: dt.datetime
    updated_at: dt.datetime
    wrapped_key: bytes | None = field(default=None, repr=False)
    active_tenant: str | None = None
    kind: str = DATA

    def check(self) -> None:
        """Raise unless the row is coherent: a known state, and an active marker
        present exactly when active and naming the row's own practice. A row
        that fails this (tampered, or damaged by hand) is never used."""
        marked = self.active_tenant is not None
        if (
            self.state not in STATES
            or marked != (self.state == ACTIVE)
            or (marked and self.active_tenant != self.tenant)
        ):
            raise KeyStoreInconsistent(
                f"key row {self.key_id.hex()} is inconsistent (state {self.state!r}, practice "
                f"{self.tenant!r}, active marker {self.active_tenant!r}): refusing to use it"
            )

    @classmethod
    def from_row(cls, row: sa.Row[object] | sa.RowMapping) -> KeyRecord:
        m = row._mapping if isinstance(row, sa.Row) else row
        wrapped = m["wrapped_key"]
        return cls(
            key_id=bytes.fromhex(m["key_id"]),
            tenant=m["tenant"],
            version=m["version"],
            state=m["state"],
            master_key_uri=m["master_key_uri"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            wrapped_key=bytes(wrapped) if wrapped is not None else None,
            active_tenant=m.get("active_tenant"),
            kind=m.get("kind", DATA),
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly description without key material."""
        return {
            "key_id": self.key_id.hex(),
            "tenant": self.tenant,
            "version": self.version,
            "state": self.state,
            "kind": self.kind,
            "master_key_uri": self.master_key_uri,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def wrap_context(tenant: str, key_id: bytes, kind: str = DATA) -> dict[str, str]:
    """The context a key's wrap authenticates (docs/format.md).

    Index root keys also bind their kind, so a wrapped root relabelled as a
    data key in the table does not unwrap as one. Data keys keep the context
    they always had, so existing wraps stay valid.
    """
    ctx = {"tenant": tenant, "key_id": key_id.hex()}
    if kind != DATA:
        ctx["kind"] = kind
    return ctx


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
    conn.exec_driver_sql(
        f"ALTER TABLE {tname} ADD CONSTRAINT {q.quote(f'ck_{n}_kind')} "
        "CHECK (kind IN ('data', 'index'))"
    )
    return True
