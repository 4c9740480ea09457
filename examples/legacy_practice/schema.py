"""The legacy schema: practices, their patients, and consultations with a free-text comment.

The comment is a plain TEXT column, next to names, dates of birth and phone
numbers: the shape of the database whose leak motivates carnet. The tenant
(the practice) is two foreign keys away from the comment.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

practices = sa.Table(
    "practices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("city", sa.String(100), nullable=False),
)

patients = sa.Table(
    "patients",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("practice_id", sa.Integer, sa.ForeignKey("practices.id"), nullable=False),
    sa.Column("last_name", sa.String(100), nullable=False),
    sa.Column("first_name", sa.String(100), nullable=False),
    sa.Column("birth_date", sa.Date, nullable=False),
    sa.Column("phone", sa.String(20), nullable=True),
)

consultations = sa.Table(
    "consultations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("patient_id", sa.Integer, sa.ForeignKey("patients.id"), nullable=False),
    sa.Column("happened_at", sa.DateTime, nullable=False),
    sa.Column("reason", sa.String(200), nullable=True),
    sa.Column("comment", sa.Text, nullable=True),
)


def create(engine: sa.Engine) -> None:
    metadata.create_all(engine)
