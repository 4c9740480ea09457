"""Contract: drop the plaintext consultations.comment; comment_enc takes its name.

Refuses to run unless `carnet migrate finish ... --into comment_enc` recorded
comment_enc as strict. Afterwards run `carnet migrate compact` (with
--vacuum-full on PostgreSQL: a dropped column's bytes stay in the pages).

Revision ID: 0002_contract_comment
Revises: 0001_expand_comment
"""

from carnet.migrate.alembic import contract

revision = "0002_contract_comment"
down_revision = "0001_expand_comment"
branch_labels = None
depends_on = None


def upgrade() -> None:
    contract("consultations", legacy="comment", new="comment_enc")


def downgrade() -> None:
    raise RuntimeError("the plaintext column is gone by design; restore from backup if needed")
