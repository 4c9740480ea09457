"""The examples' one table: consultation notes, one practice (tenant) per row."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import carnet


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "consultation_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The row's own practice picks the data key (ORM); the request's scope must
    # match it in strict mode.
    practice_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    patient_id: Mapped[str] = mapped_column(sa.String(64), index=True)
    # The audit trail records, for each note opened, its patient: "who opened
    # this patient's file" is then one command (carnet audit report --row).
    body: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id"), info={"carnet_audit_rows": "patient_id"}
    )


def create_tables(engine: sa.Engine, keys: carnet.KeyManager) -> None:
    """carnet's key table and the notes table. A real application uses its migrations."""
    keys.create_schema()
    Base.metadata.create_all(engine)
