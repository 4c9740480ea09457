"""The application's side of the migration: the same table in three phases.

- ``legacy``: ``comment`` is a plain Text column (before).
- ``mixed``: ``EncryptedText(storage="text", mixed_read=True)`` while
  ``carnet migrate run`` works: legacy plaintext is returned as it is (and
  counted in ``KeyManager.stats()["legacy_plaintext_reads"]``), every write is
  sealed.
- ``strict``: ``EncryptedText(storage="text")`` after ``carnet migrate
  finish``: a value that is not valid ciphertext raises, never returned.

The tenant is the patient's practice, on the parent row: the ORM model
declares ``EncryptedText(tenant="patient.practice_id")`` and reads and writes
need no scope and no practice column on consultations.

The patients' names, birth dates and phone numbers move to sealed columns
with blind indexes through expand/contract: :func:`patient_model` gives the
ORM class of each phase, :func:`find_patients` the lookup that keeps working
while the migration runs.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import carnet
from carnet import transforms


def consultations(phase: str) -> sa.Table:
    md = sa.MetaData()
    sa.Table(
        "patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.Integer),
    )
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
        "consultations",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("patient_id", sa.Integer, sa.ForeignKey("patients.id")),
        sa.Column("comment", comment_type),
    )


def practice_of(conn: sa.Connection, table: sa.Table, consultation_id: int) -> str:
    """The practice of a consultation, through its patient (Core; kept for scripts)."""
    patients = table.metadata.tables["patients"]
    pid = conn.execute(
        sa.select(patients.c.practice_id)
        .join_from(table, patients, table.c.patient_id == patients.c.id)
        .where(table.c.id == consultation_id)
    ).scalar_one()
    return str(pid)


def consultation_model(phase: str, storage: str = "text") -> type[Any]:
    """The ``consultations`` ORM class of a phase, its practice on the patient.

    ``EncryptedText(tenant="patient.practice_id")``: the practice is read from
    the patient row (a many-to-one), so no practice column is copied onto
    consultations. Reads open under the patient's practice, writes seal for
    it, and a consultation moved to a patient of another practice is re-sealed.
    """

    class Base(DeclarativeBase):
        pass

    class PatientRow(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        practice_id: Mapped[int] = mapped_column(sa.Integer)

    comment_type: Any
    if phase == "legacy":
        comment_type = sa.Text()
    elif phase == "mixed":
        comment_type = carnet.EncryptedText(
            tenant="patient.practice_id", storage="text", mixed_read=True
        )
    elif phase == "strict":
        comment_type = carnet.EncryptedText(
            tenant="patient.practice_id",
            storage=storage,  # type: ignore[arg-type]
        )
    else:
        raise ValueError(phase)

    class Consultation(Base):
        __tablename__ = "consultations"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patients.id"))
        patient: Mapped[PatientRow] = relationship(PatientRow)
        comment: Mapped[str | None] = mapped_column(comment_type)

    return Consultation


_MODELS: dict[tuple[str, str], type[Any]] = {}


def _model(table: sa.Table) -> type[Any]:
    """The ORM class matching a Core table of one phase (its comment column's type)."""
    typ = table.c.comment.type
    if not isinstance(typ, carnet.EncryptedText):
        key = ("legacy", "text")
    else:
        key = ("mixed" if typ.mixed_read else "strict", typ.storage)
    if key not in _MODELS:
        _MODELS[key] = consultation_model(*key)
    return _MODELS[key]


def read_comment(engine: sa.Engine, table: sa.Table, consultation_id: int) -> str | None:
    """A consultation's comment, through the ORM: opened under its patient's practice."""
    with Session(engine) as session:
        consultation = session.get(_model(table), consultation_id)
        return None if consultation is None else consultation.comment


def write_comment(engine: sa.Engine, table: sa.Table, consultation_id: int, text: str) -> None:
    """Replace a consultation's comment, sealed for its patient's practice."""
    with Session(engine) as session:
        consultation = session.get(_model(table), consultation_id)
        if consultation is None:
            raise LookupError(f"no consultation {consultation_id}")
        consultation.comment = text
        session.commit()


# -- patients' identifiers: names, phone numbers, birth dates ------------------------------
#
# Expand/contract (migrations 0003 and 0004): the legacy VARCHAR(20) and DATE
# columns cannot hold ciphertext. Three phases of the same table:
#
# - ``legacy``: the clear columns only (before 0003).
# - ``migrating``: after 0003, while `carnet migrate run --into ... --index ...`
#   works. Writes go to the sealed ``*_enc`` columns (their labels are those of
#   the legacy columns, so they survive the contract's rename) and clear the
#   legacy ones; reads prefer the sealed value; lookups go through the blind
#   indexes and, for rows not indexed yet, fall back to the clear columns
#   (``carnet.search(..., legacy=[...])``).
# - ``encrypted``: after 0004, the sealed columns under the legacy names.
#
# The blind indexes keep explicit labels: their values stay valid when 0004
# renames the columns they are computed from.

PHONE_BITS = 8
NAME_BITS = 6
BIRTH_BITS = 6


def patient_model(phase: str) -> type[Any]:
    """The ``patients`` ORM class of a phase (a new declarative base per call)."""

    class Base(DeclarativeBase):
        pass

    tenant = "practice_id"
    if phase == "migrating":

        class MigratingPatient(Base):
            __tablename__ = "patients"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            practice_id: Mapped[int] = mapped_column(sa.Integer)
            last_name: Mapped[str | None] = mapped_column(sa.String(100))
            first_name: Mapped[str | None] = mapped_column(sa.String(100))
            birth_date: Mapped[Any] = mapped_column(sa.Date)
            phone: Mapped[str | None] = mapped_column(sa.String(20))
            last_name_enc: Mapped[str | None] = mapped_column(
                carnet.EncryptedString(100, tenant=tenant, label="patients.last_name")
            )
            first_name_enc: Mapped[str | None] = mapped_column(
                carnet.EncryptedString(100, tenant=tenant, label="patients.first_name")
            )
            birth_date_enc: Mapped[Any] = mapped_column(
                carnet.EncryptedDate(tenant=tenant, label="patients.birth_date")
            )
            phone_enc: Mapped[str | None] = mapped_column(
                carnet.EncryptedString(20, tenant=tenant, label="patients.phone")
            )
            phone_bidx = carnet.BlindIndex(
                "phone_enc",
                transform=transforms.phone_fr,
                bits=PHONE_BITS,
                label="patients.phone_bidx",
            )
            name_bidx = carnet.BlindIndex(
                "first_name_enc",
                "last_name_enc",
                transform=transforms.initial_lastname,
                bits=NAME_BITS,
                label="patients.name_bidx",
            )
            birth_date_bidx = carnet.BlindIndex(
                "birth_date_enc",
                transform=transforms.date_iso,
                bits=BIRTH_BITS,
                label="patients.birth_date_bidx",
            )

        return MigratingPatient
    if phase == "encrypted":

        class Patient(Base):
            __tablename__ = "patients"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            practice_id: Mapped[int] = mapped_column(sa.Integer)
            last_name: Mapped[str | None] = mapped_column(
                carnet.EncryptedString(100, tenant=tenant, label="patients.last_name")
            )
            first_name: Mapped[str | None] = mapped_column(
                carnet.EncryptedString(100, tenant=tenant, label="patients.first_name")
            )
            birth_date: Mapped[Any] = mapped_column(
                carnet.EncryptedDate(tenant=tenant, label="patients.birth_date")
            )
            phone: Mapped[str | None] = mapped_column(
                carnet.EncryptedString(20, tenant=tenant, label="patients.phone")
            )
            phone_bidx = carnet.BlindIndex(
                "phone", transform=transforms.phone_fr, bits=PHONE_BITS, label="patients.phone_bidx"
            )
            name_bidx = carnet.BlindIndex(
                "first_name",
                "last_name",
                transform=transforms.initial_lastname,
                bits=NAME_BITS,
                label="patients.name_bidx",
            )
            birth_date_bidx = carnet.BlindIndex(
                "birth_date",
                transform=transforms.date_iso,
                bits=BIRTH_BITS,
                label="patients.birth_date_bidx",
            )

        return Patient
    raise ValueError(phase)


# The classes `carnet migrate run --index` and `carnet reindex --index` import
# (e.g. --app-dir examples --index legacy_practice.app:MigratingPatient.phone_bidx).
MigratingPatient = patient_model("migrating")
Patient = patient_model("encrypted")

# Each index of the migrating phase: (legacy clear column(s), sealed column(s)).
MIGRATING_INDEXES = {
    "phone_bidx": (("phone",), ("phone_enc",)),
    "name_bidx": (("first_name", "last_name"), ("first_name_enc", "last_name_enc")),
    "birth_date_bidx": (("birth_date",), ("birth_date_enc",)),
}


def find_patients(
    session: Any, model: type[Any], index: str, value: Any, practice: str
) -> list[Any]:
    """Patients of ``practice`` whose indexed field(s) match ``value``, in either phase.

    While migrating, rows not indexed yet are compared on their clear legacy
    columns (and those sealed but not yet indexed on their sealed value).
    """
    attr = getattr(model, index)
    if model.__name__ == "MigratingPatient":
        legacy_cols, _sealed = MIGRATING_INDEXES[index]
        return carnet.search(
            session, attr, value, tenant=practice, legacy=[getattr(model, c) for c in legacy_cols]
        )
    return carnet.search(session, attr, value, tenant=practice)


def identifiers(obj: Any) -> tuple[Any, Any, Any, Any]:
    """(last name, first name, birth date, phone) of a patient in either phase."""
    if type(obj).__name__ == "MigratingPatient":

        def pick(sealed: str, clear: str) -> Any:
            v = getattr(obj, sealed)
            return v if v is not None else getattr(obj, clear)

        return (
            pick("last_name_enc", "last_name"),
            pick("first_name_enc", "first_name"),
            pick("birth_date_enc", "birth_date"),
            pick("phone_enc", "phone"),
        )
    return obj.last_name, obj.first_name, obj.birth_date, obj.phone
