"""The application's side of the migration: the same table in three phases.

- ``legacy``: ``comment`` is a plain Text column (before).
- ``mixed``: ``EncryptedText(storage="text", mixed_read=True)`` while
  ``carnet migrate run`` works: legacy plaintext is returned as it is (and
  counted in ``KeyManager.stats()["legacy_plaintext_reads"]``), every write is
  sealed.
- ``strict``: ``EncryptedText(storage="text")`` after ``carnet migrate
  finish``: a value that is not valid ciphertext raises, never returned.

The tenant is the patient's practice, two tables away, so reads and writes
run inside ``carnet.tenant_scope`` (Core).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

import carnet


def consultations(phase: str) -> sa.Table:
    md = sa.MetaData()
    sa.Table("patients", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("practice_id", sa.Integer))
    comment_type: Any
    if phase == "legacy":
        comment_type = sa.Text()
    elif phase == "mixed":
        comment_type = carnet.EncryptedText(storage="text", mixed_read=True)
    elif phase == "strict":
        comment_type = carnet.EncryptedText(storage="text")
    else:
        raise ValueError(phase)
    return sa.Table(
        "consultations", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("patient_id", sa.Integer, sa.ForeignKey("patients.id")),
        sa.Column("comment", comment_type),
    )


def practice_of(conn: sa.Connection, table: sa.Table, consultation_id: int) -> str:
    patients = table.metadata.tables["patients"]
    pid = conn.execute(
        sa.select(patients.c.practice_id)
        .join_from(table, patients, table.c.patient_id == patients.c.id)
        .where(table.c.id == consultation_id)
    ).scalar_one()
    return str(pid)


def read_comment(engine: sa.Engine, table: sa.Table, consultation_id: int) -> str | None:
    with engine.connect() as conn:
        tenant = practice_of(conn, table, consultation_id)
        with carnet.tenant_scope(tenant):
            value: str | None = conn.execute(
                sa.select(table.c.comment).where(table.c.id == consultation_id)
            ).scalar_one()
    return value


def write_comment(engine: sa.Engine, table: sa.Table, consultation_id: int, text: str) -> None:
    with engine.begin() as conn:
        tenant = practice_of(conn, table, consultation_id)
        with carnet.tenant_scope(tenant):
            conn.execute(table.update().where(table.c.id == consultation_id)
                         .values(comment=text))
