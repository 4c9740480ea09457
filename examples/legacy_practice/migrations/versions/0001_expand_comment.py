"""Expand: add consultations.comment_enc to receive the encrypted comments.

Deploy the application writing comment_enc (sealed, label "consultations.comment")
and reading comment_enc first, then comment; then fill comment_enc with
`carnet migrate run --table consultations --column comment --into comment_enc`.

Revision ID: 0001_expand_comment
Revises:
"""

from carnet.migrate.alembic import add_encrypted_column

revision = "0001_expand_comment"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_encrypted_column("consultations", "comment_enc")


def downgrade() -> None:
    from alembic import op

    op.drop_column("consultations", "comment_enc")
