"""carnet.orm: the ORM's hooks, on the three backends.

The practice on a parent table: ``EncryptedText(tenant="patient.practice_id")``.

Like most practice-management schemas, the note is on ``consultations`` and
the practice on ``patients``. Reads open under the parent's practice, writes
seal under it, a consultation moved to a patient of another practice is
re-sealed, and a patient's practice cannot change while its consultations
hold notes sealed for the old one. A joined-inheritance row moved to another
practice is re-sealed too; and an ORM UPDATE never leaves its new text on the
objects of the session (``expire_after_update``).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    configure_mappers,
    load_only,
    mapped_column,
    relationship,
)

import carnet
from carnet import dbchecks
from carnet.errors import ConfigurationError, TenantMismatch, UnsupportedOperation


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "pp_patients"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))


class Consultation(Base):
    __tablename__ = "pp_consultations"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("pp_patients.id"))
    patient: Mapped[Patient] = relationship()
    comment: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="patient.practice_id"))


consultations = Consultation.__table__
NOTE = "Patient anxieux, évoque des idées noires"


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """This module's models, created by the shared ``keys``."""
    return (Base.metadata,)


@pytest.fixture
def patients(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """Patients 1 and 2 of practice A, 3 of practice B; consultation 10 of patient 1."""
    with Session(engine) as s:
        s.add_all(
            [
                Patient(id=1, practice_id="A"),
                Patient(id=2, practice_id="A"),
                Patient(id=3, practice_id="B"),
            ]
        )
        s.add(Consultation(id=10, patient_id=1, comment=NOTE))
        s.commit()


def stored(engine: sa.Engine, master_key_uri: str, cid: int) -> tuple[str, str | None]:
    """(parent practice, comment) opened by a brand-new KeyManager under the parent's practice."""
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        with engine.connect() as conn:
            r = conn.execute(
                sa.text(
                    "SELECT p.practice_id, c.comment FROM pp_consultations c "
                    "JOIN pp_patients p ON p.id = c.patient_id WHERE c.id = :i"
                ),
                {"i": cid},
            ).one()
        text = (
            None
            if r.comment is None
            else keys.decrypt(
                bytes(r.comment), tenant=r.practice_id, label="pp_consultations.comment"
            ).decode()
        )
        return r.practice_id, text
    finally:
        keys.close()


def test_orm_writes_and_reads_under_the_parents_practice(
    patients: None, engine: sa.Engine, master_key_uri: str
) -> None:
    assert stored(engine, master_key_uri, 10) == ("A", NOTE)
    with Session(engine) as s:
        c = s.get(Consultation, 10)
        assert c is not None and c.comment == NOTE
        c.comment = "modifié"
        s.commit()
    assert stored(engine, master_key_uri, 10) == ("A", "modifié")
    with Session(engine) as s:
        c = s.scalars(sa.select(Consultation).options(load_only(Consultation.comment))).one()
        assert c.comment == "modifié"
    with Session(engine) as s, carnet.tenant_scope("B"), pytest.raises(TenantMismatch):
        s.get(Consultation, 10)


@pytest.mark.parametrize("how", ["foreign_key", "relationship"])
def test_consultation_moved_to_a_patient_of_another_practice_is_resealed(
    patients: None, engine: sa.Engine, master_key_uri: str, how: str
) -> None:
    with Session(engine) as s:
        c = s.get(Consultation, 10)
        assert c is not None
        if how == "foreign_key":
            c.patient_id = 3
        else:
            c.patient = s.get(Patient, 3)  # type: ignore[assignment]
        s.commit()
    assert stored(engine, master_key_uri, 10) == ("B", NOTE)
    with Session(engine) as s:
        c = s.get(Consultation, 10)
        assert c is not None and c.comment == NOTE


def test_consultation_moved_within_the_practice_keeps_opening(
    patients: None, engine: sa.Engine, master_key_uri: str
) -> None:
    with Session(engine) as s:
        c = s.scalars(sa.select(Consultation).options(load_only(Consultation.id))).one()
        c.patient_id = 2
        s.commit()
    assert stored(engine, master_key_uri, 10) == ("A", NOTE)


def test_patient_practice_change_with_encrypted_children_is_refused(
    patients: None, engine: sa.Engine, master_key_uri: str
) -> None:
    with Session(engine) as s:
        p = s.get(Patient, 1)
        assert p is not None
        p.practice_id = "B"
        with pytest.raises(UnsupportedOperation):
            s.commit()
    with engine.begin() as conn, pytest.raises(UnsupportedOperation):
        conn.execute(Patient.__table__.update().values(practice_id="B"))
    assert stored(engine, master_key_uri, 10) == ("A", NOTE)
    # A patient without encrypted children may change practice.
    with Session(engine) as s:
        p = s.get(Patient, 2)
        assert p is not None
        p.practice_id = "B"
        s.commit()


def test_core_writes_take_the_parents_practice(
    patients: None, engine: sa.Engine, master_key_uri: str
) -> None:
    with engine.begin() as conn:
        conn.execute(consultations.insert(), {"id": 11, "patient_id": 3, "comment": "de B"})
    assert stored(engine, master_key_uri, 11) == ("B", "de B")
    with carnet.tenant_scope("A"), engine.begin() as conn, pytest.raises(TenantMismatch):
        conn.execute(consultations.insert(), {"id": 12, "patient_id": 3, "comment": "x"})
    with carnet.tenant_scope("A"), engine.begin() as conn:
        res = conn.execute(consultations.update().values(comment="réécrit"))
    assert res.rowcount == 1  # only A's consultation: B's is not touched
    assert stored(engine, master_key_uri, 10) == ("A", "réécrit")
    assert stored(engine, master_key_uri, 11) == ("B", "de B")


def test_a_relationship_named_as_the_tenant_fails_at_configuration() -> None:
    class Other(DeclarativeBase):
        pass

    class P(Other):
        __tablename__ = "pp_p"
        id: Mapped[int] = mapped_column(primary_key=True)

    class C(Other):
        __tablename__ = "pp_c"
        id: Mapped[int] = mapped_column(primary_key=True)
        p_id: Mapped[int] = mapped_column(sa.ForeignKey("pp_p.id"))
        p: Mapped[P] = relationship()
        note: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="p"))

    with pytest.raises(ConfigurationError, match="relationship"):
        configure_mappers()
    Other.registry.dispose()


# -- joined inheritance: the practice on the base table ---------------------------------


class JoinedBase(DeclarativeBase):
    pass


class Contact(JoinedBase):
    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(20))
    kind: Mapped[str] = mapped_column(sa.String(20))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "contact"}


class Client(Contact):
    __tablename__ = "clients"
    id: Mapped[int] = mapped_column(sa.ForeignKey("contacts.id"), primary_key=True)
    notes: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    summary: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text")
    )
    __mapper_args__ = {"polymorphic_identity": "client"}


def test_moved_joined_inheritance_row_is_resealed_for_its_new_practice(
    keys: carnet.KeyManager, engine: sa.Engine, master_key_uri: str
) -> None:
    JoinedBase.metadata.create_all(engine)
    with engine.connect() as conn:  # the move check sits on the base table
        (spec, _) = dbchecks.specs_for(Client.__table__, conn.dialect.name)
        assert spec.parent is not None and dbchecks.missing(conn, spec) == []
    with Session(engine) as s:
        s.add(Client(id=1, practice_id="p1", notes="first", summary=None))
        s.commit()
    with Session(engine) as s:
        c = s.get(Client, 1)
        assert c is not None
        c.practice_id = "p2"  # refused by carnet_m_* before the ORM emptied the values
        s.commit()
    other = carnet.KeyManager(engine, master_key=master_key_uri)
    with engine.connect() as conn:
        blob = conn.execute(sa.text("SELECT notes FROM clients WHERE id = 1")).scalar_one()
    label = Client.__table__.c.notes.type.field_label
    assert other.decrypt(bytes(blob), tenant="p2", label=label) == b"first"
    with Session(engine) as s:
        c = s.get(Client, 1)
        assert c is not None and (c.practice_id, c.notes, c.summary) == ("p2", "first", None)


# -- expire_after_update: an ORM UPDATE's new text is never copied onto objects ---------


def test_expire_after_update_expires_the_written_attribute_on_every_loaded_object(
    patients: None, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        s.add(Consultation(id=11, patient_id=3, comment="note of B"))
        s.commit()
    with Session(engine) as s:
        with carnet.tenant_scope("A"):
            a = s.get(Consultation, 10)
        with carnet.tenant_scope("B"):
            b = s.get(Consultation, 11)
        assert a is not None and b is not None
        assert "comment" in sa.inspect(a).dict and "comment" in sa.inspect(b).dict
        stmt = sa.update(Consultation).where(Consultation.id == 10).values(comment="rewritten")
        with carnet.tenant_scope("A"):
            s.execute(stmt, execution_options={"synchronize_session": "evaluate"})
        # "evaluate" would have copied the new text onto the object; expired
        # instead, on every object of the mapper, and only what was written.
        assert "comment" not in sa.inspect(a).dict and "comment" not in sa.inspect(b).dict
        assert sa.inspect(a).dict["patient_id"] == 1 and sa.inspect(b).dict["patient_id"] == 3
        with carnet.tenant_scope("A"):
            assert a.comment == "rewritten"
        with carnet.tenant_scope("B"):
            assert b.comment == "note of B"


def test_expire_after_update_leaves_objects_alone_without_synchronize_session(
    patients: None, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        with carnet.tenant_scope("A"):
            a = s.get(Consultation, 10)
            assert a is not None and a.comment == NOTE
            s.execute(
                sa.update(Consultation).where(Consultation.id == 10).values(comment="rewritten"),
                execution_options={"synchronize_session": False},
            )
        # The application asked for no synchronisation: the object keeps what it had.
        assert sa.inspect(a).dict["comment"] == NOTE
        s.expire(a)
        with carnet.tenant_scope("A"):
            assert a.comment == "rewritten"
