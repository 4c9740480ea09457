"""The ``carnet_keys`` table: wrapped data keys, one row per key version.

States::

    active    encrypts and decrypts; exactly one per tenant (enforced by a
              UNIQUE column ``active_tenant`` that holds the tenant id only
              while the key is active: NULLs do not collide on any backend,
              so this works where partial indexes do not, e.g. MariaDB)
    inactive  decrypts only, after a rotation
    retired   material erased after re-encryption moved every value away
    destroyed material erased by crypto-shredding the whole tenant
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import sqlalchemy as sa

ACTIVE = "active"
INACTIVE = "inactive"
RETIRED = "retired"
DESTROYED = "destroyed"
STATES = (ACTIVE, INACTIVE, RETIRED, DESTROYED)


def keys_table(metadata: sa.MetaData, name: str = "carnet_keys") -> sa.Table:
    return sa.Table(
        name,
        metadata,
        # hex, not binary: a BLOB cannot be a MariaDB primary key without a prefix length.
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active_tenant", sa.String(255), nullable=True, unique=True),
        sa.Column("master_key_uri", sa.String(1024), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant", "version", name=f"uq_{name}_tenant_version"),
        sa.CheckConstraint(
            "state IN ('active', 'inactive', 'retired', 'destroyed')", name=f"ck_{name}_state"
        ),
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
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly description without key material."""
        return {
            "key_id": self.key_id.hex(),
            "tenant": self.tenant,
            "version": self.version,
            "state": self.state,
            "master_key_uri": self.master_key_uri,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }
