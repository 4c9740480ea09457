"""Expand: sealed columns and blind indexes beside the patients' clear identifiers.

A branch of its own (``identifiers``), independent of the comment's. The
legacy columns cannot hold ciphertext (``phone VARCHAR(20)``, ``birth_date
DATE``), so each identifier gets a new column of the carnet type the
application declares, and each lookup a BIGINT blind-index column with its
index on (practice_id, index). The legacy columns become nullable: the
application clears them as it writes the sealed ones.

Then deploy ``legacy_practice.app.patient_model("migrating")`` and fill the
new columns with ``carnet migrate run --table patients --column phone --into
phone_enc --tenant practice_id --index ...`` (docs/migration.md,
"Identifiers: names, phones, birth dates").

Revision ID: 0003_expand_identifiers
Revises:
"""

import sqlalchemy as sa
from alembic import op

import carnet
from carnet.migrate.alembic import add_encrypted_column

revision = "0003_expand_identifiers"
down_revision = None
branch_labels = ("identifiers",)
depends_on = None

# legacy column -> (new column, its carnet type, the legacy type)
COLUMNS = {
    "last_name": ("last_name_enc", carnet.EncryptedString(100), sa.String(100)),
    "first_name": ("first_name_enc", carnet.EncryptedString(100), sa.String(100)),
    "birth_date": ("birth_date_enc", carnet.EncryptedDate(), sa.Date()),
    "phone": ("phone_enc", carnet.EncryptedString(20), sa.String(20)),
}
INDEXES = ("phone_bidx", "name_bidx", "birth_date_bidx")


def upgrade() -> None:
    for new, typ, _legacy in COLUMNS.values():
        add_encrypted_column("patients", new, typ)
    for name in INDEXES:
        op.add_column("patients", sa.Column(name, sa.BigInteger(), nullable=True))
        # The name and columns carnet.BlindIndex declares: lookups filter on both.
        op.create_index(f"ix_patients_{name}", "patients", ["practice_id", name])
    with op.batch_alter_table("patients") as b:
        for legacy, (_new, _typ, legacy_type) in COLUMNS.items():
            b.alter_column(legacy, existing_type=legacy_type, nullable=True)


def downgrade() -> None:
    for name in INDEXES:
        op.drop_index(f"ix_patients_{name}", "patients")
    with op.batch_alter_table("patients") as b:
        for name in INDEXES:
            b.drop_column(name)
        for new, _typ, _legacy in COLUMNS.values():
            b.drop_column(new)
