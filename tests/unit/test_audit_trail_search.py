"""A blind-index search is recorded: principal, practice, index, counts and matched rows."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
import carnet.transforms as tr
from carnet.audit import Auditor, AuditTrail, principal_scope
from carnet.cli import cli

PHONE = "06 12 34 56 78"


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "audit_patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str | None] = mapped_column(sa.String(64))
    patient_ref: Mapped[str | None] = mapped_column(sa.String(32))
    phone: Mapped[str | None] = mapped_column(
        carnet.EncryptedString(32, tenant="practice_id"),
        info={"carnet_audit_rows": "patient_ref"},
    )
    phone_bidx = carnet.BlindIndex("phone", transform=tr.phone_fr, bits=16)


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """This module's models, created by the shared ``keys``."""
    return (Base.metadata,)


@pytest.fixture
def patients(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """Three patients: PAT-1 and PAT-3 share a phone number, in two practices."""
    with Session(engine) as s:
        s.add_all(
            [
                Patient(practice_id="p1", patient_ref="PAT-1", phone=PHONE),
                Patient(practice_id="p1", patient_ref="PAT-2", phone="07 00 00 00 01"),
                Patient(practice_id="p2", patient_ref="PAT-3", phone=PHONE),
            ]
        )
        s.commit()


def test_search_and_named_row_column_answer_row(
    keys: carnet.KeyManager, patients: None, engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    # rows=False for the trail: the column itself asks, naming the patient reference.
    trail = AuditTrail(keys, background=False)
    Auditor(trail=trail).install(keys)
    with principal_scope("dr.search"), Session(engine) as s:
        found = carnet.search(s, Patient.phone_bidx, PHONE, tenant="p1")
        assert [p.patient_ref for p in found] == ["PAT-1"]
    assert trail.flush()
    recs = list(trail.store.walk())
    searches = [r for r in recs if r["kind"] == "search"]
    assert len(searches) == 1
    s0 = searches[0]
    detail = json.loads(str(s0["detail"]))
    assert (s0["principal"], s0["practice"], s0["field"]) == ("dr.search", "p1", "phone_bidx")
    assert detail["matches"] == 1 and detail["candidates"] >= 1 and detail["rows"] == ["PAT-1"]
    dump = json.dumps(recs, default=str)
    assert "12 34" not in dump and "0612345678" not in dump
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "PAT-1", "--json"], env=env)
    assert res.exit_code == 0, res.output
    hows = {r["how"] for r in json.loads(res.output)["readers"]}
    assert hows == {"search", "read"}  # the search, and the ORM load of the matched row
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "PAT-3", "--json"], env=env)
    assert json.loads(res.output)["readers"] == []
