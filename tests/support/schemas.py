"""Tables as older carnet releases created them, for upgrade tests."""

from __future__ import annotations

import sqlalchemy as sa


def old_keys_table(md: sa.MetaData) -> sa.Table:
    # carnet_keys as created before key kinds existed, and before practice ids were exact.
    return sa.Table(
        "carnet_keys",
        md,
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(255), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("active_tenant", sa.String(255), nullable=True, unique=True),
        sa.Column("master_key_uri", sa.String(1024), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("tenant", "version", name="uq_carnet_keys_tenant_version"),
        sa.CheckConstraint(
            "state IN ('active', 'inactive', 'retired', 'destroyed')", name="ck_carnet_keys_state"
        ),
    )
