"""carnet.dbchecks.drop and install over checks already there, on every database."""

from __future__ import annotations

import sqlalchemy as sa

import carnet
from carnet import dbchecks


def _tables() -> tuple[sa.Table, sa.Table]:
    md = sa.MetaData()
    notes = sa.Table(
        "notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
    )
    sa.Table(
        "patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
    )
    visits = sa.Table(
        "visits",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.ForeignKey("patients.id")),
        sa.Column("comment", carnet.EncryptedText(storage="text")),
    )
    return notes, visits


def test_drop_removes_installed_checks_and_install_replaces_them(
    engine: sa.Engine, master_key_uri: str
) -> None:
    # The key table first, so that the key checks (PostgreSQL: a trigger and
    # its function) are installed too.
    carnet.KeyManager(engine, master_key=master_key_uri).create_schema()
    notes, visits = _tables()
    notes.metadata.create_all(engine)
    parent = dbchecks.Parent(
        fk="patient_id", table="patients", schema=None, key="id", practice="practice_id"
    )
    vspec = dbchecks.ColumnSpec("visits", None, "comment", "text", parent=parent)
    with engine.begin() as conn:
        nspecs = dbchecks.specs_for(notes, conn.dialect.name)
        assert dbchecks.installed(conn, "notes")  # created with the table
        made = dbchecks.install(conn, nspecs)  # again, over the ones there
        made += dbchecks.install(conn, [vspec])  # a parent's triggers and functions
        assert any(n.startswith("carnet_k_notes_body") for n in made)
        assert dbchecks.missing(conn, nspecs[0]) == []
        assert dbchecks.missing(conn, vspec) == []
        dbchecks.install(conn, [vspec])
        dbchecks.drop(conn, [*nspecs, vspec])
        assert dbchecks.installed(conn, "notes") == set()
        assert dbchecks.installed(conn, "visits") == set()
        assert dbchecks.installed(conn, "patients") == set()
        assert dbchecks.missing(conn, nspecs[0]) != []
