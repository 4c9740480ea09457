"""Contract: drop the patients' clear identifiers; the sealed columns take their names.

Refuses to run unless `carnet migrate finish ... --into <column>_enc` recorded
each new column as strict (finish also checks, with --index, that every row
has its blind-index values). The blind-index columns stay as they are: their
values are bound to their own label (``patients.phone_bidx``...), not to the
names of the columns they index. Afterwards run `carnet migrate compact
--table patients` (with --vacuum-full on PostgreSQL: a dropped column's bytes
stay in the pages until the table is rewritten).

Revision ID: 0004_contract_identifiers
Revises: 0003_expand_identifiers
"""

import carnet
from carnet.migrate.alembic import contract

revision = "0004_contract_identifiers"
down_revision = "0003_expand_identifiers"
branch_labels = None
depends_on = None

COLUMNS = {
    "last_name": ("last_name_enc", carnet.EncryptedString(100)),
    "first_name": ("first_name_enc", carnet.EncryptedString(100)),
    "birth_date": ("birth_date_enc", carnet.EncryptedDate()),
    "phone": ("phone_enc", carnet.EncryptedString(20)),
}


def upgrade() -> None:
    for legacy, (new, typ) in COLUMNS.items():
        contract("patients", legacy=legacy, new=new, type_=typ)


def downgrade() -> None:
    raise RuntimeError("the clear identifiers are gone by design; restore from backup if needed")
