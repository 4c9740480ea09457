"""Statement shapes the Python guard never sees, refused by the database itself.

Each test runs a write that would break the tenant invariant *around* carnet:
driver SQL (``exec_driver_sql``), a raw DBAPI cursor, the ``psql`` and
``mariadb`` clients, pandas. The database must refuse it with the check named
in carnet.dbchecks, and nothing of it may be written (every row re-read, byte
for byte). Where SQLAlchemy can build the same shape on a configured engine,
the error is carnet's (or the guard's), with no trace of the note anywhere
in it. Values are real values copied from other rows: no header is forged.
"""

from __future__ import annotations

import subprocess
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

import carnet
from carnet import dbchecks
from carnet.errors import (
    CarnetError,
    ConfigurationError,
    InvalidCiphertext,
    TenantMismatch,
    UnknownKey,
)
from support.dbutil import kind_of
from support.refusals import (
    SECRET,
    Base,
    Consultation,
    IntNote,
    Letter,
    MixedNote,
    Note,
    Patient,
    driver_sql,
    leaks,
    name,
    plain_notes,
    raw,
    refusal,
    snapshot,
    stored,
)

notes = cast(sa.Table, Note.__table__)
patients = cast(sa.Table, Patient.__table__)
consultations = cast(sa.Table, Consultation.__table__)
ERRORS = {"f": InvalidCiphertext, "p": TenantMismatch, "m": TenantMismatch, "k": UnknownKey}


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """This module's models, created by the shared ``keys``."""
    return (Base.metadata,)


@pytest.fixture(autouse=True)
def rows(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """The rows every test here starts from (each test of this module uses ``keys``)."""
    with Session(engine) as s:
        s.add_all(
            [
                Note(id=1, practice_id="p1", body=SECRET, tbody=SECRET),
                Note(id=2, practice_id="p2", body=SECRET + " B", tbody=SECRET + " B"),
                Note(id=3, practice_id="p1", body=None, tbody=None),
                Patient(id=1, practice_id="p1"),
                Patient(id=2, practice_id="p1"),
                Patient(id=3, practice_id="p2"),
                MixedNote(id=1, practice_id="p1", body=SECRET),
                MixedNote(id=2, practice_id="p2", body=SECRET + " B"),
            ]
        )
        s.flush()
        s.add_all(
            [
                Consultation(id=10, patient_id=1, body=SECRET),
                Consultation(id=11, patient_id=3, body=SECRET + " B"),
                Letter(id=1, practice_id="p1", letter=SECRET),
            ]
        )
        s.commit()


def opened(
    master_key_uri: str, engine: sa.Engine, table: str, column: str, rid: int, tenant: str
) -> str:
    """A stored value opened by a brand-new KeyManager under ``tenant``."""
    from carnet import envelope

    value = stored(engine, table, column, rid)
    if isinstance(value, str):
        value = envelope.from_text(value)
    fresh = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        return fresh.decrypt_text(value, tenant=tenant, label=f"{table}.{column}")
    finally:
        fresh.close()


def refused_raw(
    engine: sa.Engine, expect: str | set[str], sql: str, params: tuple[Any, ...] = ()
) -> set[str]:
    """``sql`` refused by check ``expect``, through driver SQL and a raw cursor; nothing written.

    ``expect``: a set when several checks refuse the value and which one the
    database runs first is its own business (a value cut short fails both
    the format and the practice check).
    """
    names = {expect} if isinstance(expect, str) else expect
    before = snapshot(engine)
    seen = set()
    for run in (driver_sql, raw):
        with pytest.raises(Exception) as ei:  # noqa: PT011 - the check's name is asserted
            run(engine, sql, params)
        got = refusal(ei.value)
        assert got in names, (run.__name__, got, ei.value)
        seen.add(got)
        if isinstance(ei.value, CarnetError):
            assert isinstance(ei.value, ERRORS[got.split("_")[1][0]])
            # carnet's error for driver SQL: the row and parameters are scrubbed too
            assert leaks(ei.value) == [], (run.__name__, sql)
        assert snapshot(engine) == before, run.__name__
    # the refused statement left nothing behind, and the engine still works
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1").scalar_one()
    return seen


def refused_sa(
    engine: sa.Engine,
    statement: Any,
    expect: str | set[Any] | None,
    *,
    secrets: tuple[str, ...] = (SECRET,),
) -> CarnetError:
    """``statement`` on the configured engine raises a CarnetError and writes nothing.

    ``expect``: the database check that must refuse it, or None when carnet's
    Python guard may refuse it first (its own CarnetError, no constraint).
    """
    before = snapshot(engine)
    with pytest.raises(CarnetError) as ei:
        with engine.begin() as conn:
            conn.execute(statement)
    err = ei.value
    if expect is not None:
        names = {expect} if isinstance(expect, str) else expect
        assert err.constraint in names, (err.constraint, type(err).__name__)
    if err.constraint is not None:
        assert isinstance(err, ERRORS[err.constraint.split("_")[1][0]])
    assert leaks(err, secrets) == []
    assert snapshot(engine) == before
    return err


# -- the checks are there -----------------------------------------------------------------


def test_checks_installed_by_create_all(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    d = engine.dialect.name
    with engine.connect() as conn:
        found = dbchecks.installed(conn, "notes")
        for col in ("body", "tbody"):
            for kind in ("f2", "p", "k"):
                n = name(kind, "notes", col)
                assert n in found or {n + "_i", n + "_u"} <= found, (d, n, found)
        for spec in dbchecks.specs_for(notes, d):
            assert dbchecks.missing(conn, spec) == []
        for model in (Consultation, Letter, MixedNote, IntNote):
            t = cast(sa.Table, model.__table__)
            for spec in dbchecks.specs_for(t, d):
                assert dbchecks.missing(conn, spec) == [], (t.name, spec)
        assert any(
            n.startswith("carnet_m_patients_consultations_body")
            for n in dbchecks.installed(conn, "patients")
        )
        assert any(
            n.startswith("carnet_m_docs_letters_letter") for n in dbchecks.installed(conn, "docs")
        )


# -- values that are not carnet values -----------------------------------------------------


def test_plaintext_into_binary_and_text_columns(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    refused_raw(
        engine,
        name("f2", "notes", "body"),
        "UPDATE notes SET body = ? WHERE id = 1",
        (SECRET.encode(),),
    )
    refused_raw(
        engine, name("f2", "notes", "tbody"), "UPDATE notes SET tbody = ? WHERE id = 1", (SECRET,)
    )
    refused_raw(
        engine,
        name("f2", "notes", "tbody"),
        f"INSERT INTO notes (id, practice_id, tbody) VALUES (40, 'p1', '{SECRET}')",
    )
    # SQLAlchemy, through a Table object that does not know the column is encrypted.
    refused_sa(
        engine,
        plain_notes.update().where(plain_notes.c.id == 1).values(body=SECRET.encode()),
        name("f2", "notes", "body"),
    )
    refused_sa(
        engine,
        plain_notes.insert().values(id=41, tbody=SECRET),
        name("f2", "notes", "tbody"),
    )


def test_truncated_value_and_unknown_version(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    real = stored(engine, "notes", "body", 1)  # practice p1, like row 3
    treal = stored(engine, "notes", "tbody", 1)
    f2 = name("f2", "notes", "body")
    cut = {f2, name("p", "notes", "body")}
    tcut = {name("f2", "notes", "tbody"), name("p", "notes", "tbody")}
    # cut inside the header: the frame itself is incomplete
    refused_raw(engine, cut, "UPDATE notes SET body = ? WHERE id = 3", (real[:20],))
    refused_raw(engine, tcut, "UPDATE notes SET tbody = ? WHERE id = 3", (treal[:40],))
    # version byte 0x07: a format carnet never wrote
    refused_raw(engine, f2, "UPDATE notes SET body = ? WHERE id = 3", (b"\x07" + real[1:],))
    refused_raw(
        engine,
        name("f2", "notes", "tbody"),
        "UPDATE notes SET tbody = ? WHERE id = 3",
        ("carnet:7:" + treal[len("carnet:2:") :],),
    )
    refused_sa(
        engine, plain_notes.update().where(plain_notes.c.id == 3).values(body=real[:20]), cut
    )
    refused_sa(
        engine,
        plain_notes.update().where(plain_notes.c.id == 3).values(body=b"\x07" + real[1:]),
        f2,
    )


# -- a value of another practice ------------------------------------------------------------


def test_copy_from_practice_a_into_practice_b(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    pb, pt = name("p", "notes", "body"), name("p", "notes", "tbody")
    refused_raw(
        engine,
        pb,
        "INSERT INTO notes (id, practice_id, body) SELECT 50, 'p2', body FROM notes WHERE id = 1",
    )
    refused_raw(
        engine,
        pt,
        "INSERT INTO notes (id, practice_id, tbody) SELECT 50, 'p2', tbody FROM notes WHERE id = 1",
    )
    sub = "(SELECT body FROM (SELECT body FROM notes WHERE id = 1) AS a)"
    tsub = "(SELECT tbody FROM (SELECT tbody FROM notes WHERE id = 1) AS a)"
    refused_raw(engine, pb, f"UPDATE notes SET body = {sub} WHERE id = 2")  # noqa: S608
    refused_raw(engine, pt, f"UPDATE notes SET tbody = {tsub} WHERE id = 2")  # noqa: S608
    if kind_of(engine.url) != "mariadb":  # MariaDB cannot read the table it updates
        refused_raw(
            engine, pb, "UPDATE notes SET body = (SELECT body FROM notes WHERE id = 1) WHERE id = 2"
        )
    refused_raw(
        engine, pb, "UPDATE notes SET body = ? WHERE id = 2", (stored(engine, "notes", "body", 1),)
    )
    # SQLAlchemy: the guard refuses the copy, or the database does
    n2 = notes.alias("n2")
    refused_sa(
        engine,
        notes.insert().from_select(
            ["id", "practice_id", "body"],
            sa.select(sa.literal(51), sa.literal("p2"), n2.c.body).where(n2.c.id == 1),
        ),
        None,
    )
    refused_sa(
        engine,
        plain_notes.update()
        .where(plain_notes.c.id == 2)
        .values(body=stored(engine, "notes", "body", 1)),
        pb,
    )
    refused_sa(
        engine,
        plain_notes.update()
        .where(plain_notes.c.id == 2)
        .values(tbody=stored(engine, "notes", "tbody", 1)),
        pt,
    )


def test_update_changing_only_the_practice(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    pb = {name("p", "notes", "body"), name("p", "notes", "tbody")}
    refused_raw(engine, pb, "UPDATE notes SET practice_id = 'p2' WHERE id = 1")
    refused_raw(engine, pb, "UPDATE notes SET practice_id = ? WHERE id = 1", ("p2",))
    # the row without a note may move
    driver_sql(engine, "UPDATE notes SET practice_id = 'p2' WHERE id = 3")
    driver_sql(engine, "UPDATE notes SET practice_id = 'p1' WHERE id = 3")
    refused_sa(engine, notes.update().where(notes.c.id == 1).values(practice_id="p2"), None)


def test_upsert_changing_only_the_practice(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    d = kind_of(engine.url)
    pb = {name("p", "notes", "body"), name("p", "notes", "tbody")}
    if d == "postgresql":
        sql = (
            "INSERT INTO notes (id, practice_id) VALUES (1, 'p2') "
            "ON CONFLICT (id) DO UPDATE SET practice_id = EXCLUDED.practice_id"
        )
        ins: Any = postgresql.insert(notes).values(id=1, practice_id="p2")
        stmt = ins.on_conflict_do_update(
            index_elements=["id"], set_={"practice_id": ins.excluded.practice_id}
        )
    elif d == "mariadb":
        sql = (
            "INSERT INTO notes (id, practice_id) VALUES (1, 'p2') "
            "ON DUPLICATE KEY UPDATE practice_id = VALUES(practice_id)"
        )
        ins = mysql.insert(notes).values(id=1, practice_id="p2")
        stmt = ins.on_duplicate_key_update(practice_id=ins.inserted.practice_id)
    else:
        sql = (
            "INSERT INTO notes (id, practice_id) VALUES (1, 'p2') "
            "ON CONFLICT(id) DO UPDATE SET practice_id = excluded.practice_id"
        )
        ins = sqlite.insert(notes).values(id=1, practice_id="p2")
        stmt = ins.on_conflict_do_update(
            index_elements=["id"], set_={"practice_id": ins.excluded.practice_id}
        )
    refused_raw(engine, pb, sql)
    refused_sa(engine, stmt, None)


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_writes_inside_a_cte(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    pb = name("p", "notes", "body")
    refused_raw(
        engine,
        pb,
        "WITH x AS (INSERT INTO notes (id, practice_id, body) "
        "SELECT 60, 'p2', body FROM notes WHERE id = 1 RETURNING id) SELECT id FROM x",
    )
    refused_raw(
        engine,
        {pb, name("p", "notes", "tbody")},
        "WITH x AS (UPDATE notes SET practice_id = 'p2' WHERE id = 1 RETURNING id) "
        "SELECT id FROM x",
    )
    refused_raw(
        engine,
        name("f2", "notes", "tbody"),
        f"WITH x AS (UPDATE notes SET tbody = '{SECRET}' WHERE id = 1 RETURNING id) "
        "SELECT id FROM x",
    )
    n2 = notes.alias("n2")
    copied = sa.select(n2.c.body).where(n2.c.id == 1).scalar_subquery()
    refused_sa(
        engine,
        sa.select(
            notes.insert()
            .values(id=61, practice_id="p2", body=copied)
            .returning(notes.c.id)
            .cte("x")
        ),
        None,
    )
    value_a = stored(engine, "notes", "body", 1)
    cte = (
        plain_notes.update()
        .where(plain_notes.c.id == 2)
        .values(body=value_a)
        .returning(plain_notes.c.id)
        .cte("u")
    )
    refused_sa(engine, sa.select(cte), pb)
    refused_sa(engine, sa.select(sa.literal(1)).add_cte(cte), pb)
    moved = (
        notes.update()
        .where(notes.c.id == 1)
        .values(practice_id="p2")
        .returning(notes.c.id)
        .cte("m")
    )
    refused_sa(engine, sa.select(sa.literal(1)).add_cte(moved), None)


# -- practice ids the database must compare exactly ---------------------------------------


@pytest.mark.parametrize("db_kind", ["mariadb"])
def test_mariadb_case_insensitive_collation(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    md = sa.MetaData()
    ci = sa.Table(
        "ci_notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", mysql.VARCHAR(64, collation="utf8mb4_general_ci")),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
    )
    md.create_all(engine)
    with engine.connect() as conn:
        assert name("p", "ci_notes", "body") in dbchecks.installed(conn, "ci_notes")
        # the column really folds case and trailing spaces
        assert (
            conn.exec_driver_sql(
                "SELECT 'CABINET-LYON' = 'cabinet-lyon' COLLATE utf8mb4_general_ci"
            ).scalar()
            == 1
        )
    lyon = keys.encrypt_text(SECRET, tenant="CABINET-LYON", label="ci_notes.body")
    p1 = keys.encrypt_text(SECRET, tenant="p1", label="ci_notes.body")
    driver_sql(
        engine,
        "INSERT INTO ci_notes (id, practice_id, body) VALUES (1, 'CABINET-LYON', ?)",
        (lyon,),
    )
    driver_sql(
        engine, "INSERT INTO ci_notes (id, practice_id) VALUES (2, 'cabinet-lyon'), (3, 'p1 ')"
    )
    pn = name("p", "ci_notes", "body")
    before = snapshot(engine, ["ci_notes"])
    for run in (driver_sql, raw):
        for rid, value in ((2, lyon), (3, p1)):
            with pytest.raises(Exception) as ei:  # noqa: PT011
                run(engine, "UPDATE ci_notes SET body = ? WHERE id = ?", (value, rid))
            assert refusal(ei.value) == pn
        with pytest.raises(Exception) as ei:  # noqa: PT011
            run(engine, "UPDATE ci_notes SET practice_id = 'cabinet-lyon' WHERE id = 1")
        assert refusal(ei.value) == pn
    assert snapshot(engine, ["ci_notes"]) == before
    # SQLAlchemy: the guard refuses the bare move, the database the copied value
    plain_ci = sa.Table(
        "ci_notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.LargeBinary),
    )
    for stmt in (
        ci.update().where(ci.c.id == 1).values(practice_id="CABINET-LYON "),
        plain_ci.update().where(plain_ci.c.id == 2).values(body=lyon),
    ):
        with engine.begin() as conn, pytest.raises(CarnetError) as te:
            conn.execute(stmt)
        assert te.value.constraint in (None, pn)
        assert leaks(te.value) == []
    assert snapshot(engine, ["ci_notes"]) == before


def test_integer_practice_column(
    keys: carnet.KeyManager, engine: sa.Engine, master_key_uri: str
) -> None:
    label = "int_notes.body"
    driver_sql(engine, "INSERT INTO int_notes (id, practice_id) VALUES (1, 7)")
    for sealed_for in ("007", " 7", "7 ", "+7"):
        value = keys.encrypt_text(SECRET, tenant=sealed_for, label=label)
        refused_raw(
            engine,
            name("p", "int_notes", "body"),
            "UPDATE int_notes SET body = ? WHERE id = 1",
            (value,),
        )
    good = keys.encrypt_text(SECRET, tenant="7", label=label)
    raw(engine, "UPDATE int_notes SET body = ? WHERE id = 1", (good,))
    assert opened(master_key_uri, engine, "int_notes", "body", 1, "7") == SECRET
    # and the ORM writes it under "7" too
    with Session(engine) as s:
        s.add(IntNote(id=2, practice_id=7, body=SECRET))
        s.commit()
    assert opened(master_key_uri, engine, "int_notes", "body", 2, "7") == SECRET


@pytest.mark.parametrize("ptype", [sa.CHAR(8), sa.Float()], ids=repr)
def test_practice_types_refused_at_configuration(
    keys: carnet.KeyManager, engine: sa.Engine, ptype: sa.types.TypeEngine[Any]
) -> None:
    md = sa.MetaData()
    t = sa.Table(
        "typed_notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", ptype),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
    )
    with pytest.raises(ConfigurationError):
        dbchecks.check_practice_type(t.c.practice_id)
    with pytest.raises(ConfigurationError):
        dbchecks.specs_for(t, engine.dialect.name)
    with pytest.raises(ConfigurationError):
        md.create_all(engine)
    # Refused before CREATE TABLE: no table is left without its checks.
    assert not sa.inspect(engine).has_table("typed_notes")


# -- the practice on another row -------------------------------------------------------------


def test_parent_path(keys: carnet.KeyManager, engine: sa.Engine, master_key_uri: str) -> None:
    m = name("m", "patients", "consultations_body")
    p = name("p", "consultations", "body")
    # a patient moved while a consultation holds a note sealed for its practice
    refused_raw(engine, m, "UPDATE patients SET practice_id = 'p2' WHERE id = 1")
    # a consultation moved to a patient of another practice, not re-sealed
    # (the key check also refuses it: which one reports is checked at the end)
    pk = {p, name("k", "consultations", "body")}
    seen = refused_raw(engine, pk, "UPDATE consultations SET patient_id = 3 WHERE id = 10")
    seen |= refused_raw(
        engine,
        pk,
        "INSERT INTO consultations (id, patient_id, body) "
        "SELECT 12, 3, body FROM consultations WHERE id = 10",
    )
    # a patient without notes may move
    driver_sql(engine, "UPDATE patients SET practice_id = 'p2' WHERE id = 2")
    refused_sa(
        engine,
        patients.update().where(patients.c.id == 1).values(practice_id="p2"),
        {m, None},
    )
    cons = consultations
    refused_sa(engine, cons.update().where(cons.c.id == 10).values(patient_id=3), {*pk, None})
    # the ORM's own move re-seals the note for the new patient's practice
    with Session(engine) as s:
        c = s.get(Consultation, 10)
        assert c is not None
        c.patient_id = 3
        s.commit()
    assert opened(master_key_uri, engine, "consultations", "body", 10, "p2") == SECRET
    # joined inheritance: the base row's practice cannot change under the subclass's note
    refused_raw(
        engine,
        name("m", "docs", "letters_letter"),
        "UPDATE docs SET practice_id = 'p2' WHERE id = 1",
    )
    driver_sql(engine, "INSERT INTO docs (id, kind, practice_id) VALUES (2, 'letter', 'p2')")
    seen |= refused_raw(
        engine,
        {name("p", "letters", "letter"), name("k", "letters", "letter")},
        "INSERT INTO letters (id, letter) SELECT 2, letter FROM letters WHERE id = 1",
    )
    # Reported by the practice check (TenantMismatch), not the key check.
    assert not [n for n in seen if n.startswith("carnet_k_")]


# -- a key that is not the practice's ----------------------------------------------------------


def test_key_not_of_the_practice(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    k = name("k", "notes", "body")
    # a value sealed for p9, whose keys are then gone from the key table
    value = keys.encrypt_text(SECRET, tenant="p9", label="notes.body")
    tvalue = keys.encrypt_text(SECRET, tenant="p9", label="notes.tbody")
    raw(engine, "DELETE FROM carnet_keys WHERE tenant = 'p9'")
    from carnet import envelope

    refused_raw(
        engine, k, "INSERT INTO notes (id, practice_id, body) VALUES (70, 'p9', ?)", (value,)
    )
    refused_raw(
        engine,
        name("k", "notes", "tbody"),
        "INSERT INTO notes (id, practice_id, tbody) VALUES (70, 'p9', ?)",
        (envelope.to_text(tvalue),),
    )
    # p1's own value, after p1's key rows were deleted
    raw(engine, "DELETE FROM carnet_keys WHERE tenant = 'p1'")
    refused_raw(
        engine, k, "UPDATE notes SET body = ? WHERE id = 3", (stored(engine, "notes", "body", 1),)
    )
    err = refused_sa(
        engine, plain_notes.insert().values(id=71, body=value), {k, name("p", "notes", "body")}
    )
    assert err.constraint == name("p", "notes", "body")  # no practice given: the row's is NULL


# -- code that does not know the column is encrypted -------------------------------------------


def test_second_table_object_without_practice_column(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    """A ``Table`` for ``notes`` declared elsewhere: no practice column, plain types."""
    value_b = stored(engine, "notes", "body", 2)
    tvalue_b = stored(engine, "notes", "tbody", 2)
    t = plain_notes
    for stmt, expect in (
        (t.update().where(t.c.id == 1).values(body=value_b), name("p", "notes", "body")),
        (t.update().where(t.c.id == 1).values(tbody=tvalue_b), name("p", "notes", "tbody")),
        (t.update().where(t.c.id == 1).values(body=SECRET.encode()), name("f2", "notes", "body")),
        (t.update().where(t.c.id == 1).values(tbody=SECRET), name("f2", "notes", "tbody")),
        (t.insert().values(id=80, body=value_b), name("p", "notes", "body")),  # practice NULL
    ):
        refused_sa(engine, stmt, expect)
    # executemany: one bad row refuses the whole statement
    before = snapshot(engine)
    with pytest.raises(CarnetError) as ei, engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 81, "tbody": None}, {"id": 82, "tbody": SECRET}])
    assert ei.value.constraint == name("f2", "notes", "tbody")
    assert leaks(ei.value) == []
    assert snapshot(engine) == before


@pytest.mark.parametrize("db_kind", ["mariadb"])
def test_mariadb_multi_table_update(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    md = sa.MetaData()
    stash = sa.Table(
        "stash",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("body", sa.LargeBinary),
        sa.Column("tbody", sa.Text),
    )
    md.create_all(engine)
    driver_sql(
        engine, "INSERT INTO stash (id, body, tbody) SELECT id, body, tbody FROM notes WHERE id = 1"
    )
    driver_sql(
        engine, "INSERT INTO stash (id, body, tbody) VALUES (9, ?, ?)", (SECRET.encode(), SECRET)
    )
    pb, pt = name("p", "notes", "body"), name("p", "notes", "tbody")
    refused_raw(
        engine,
        pb,
        "UPDATE notes, stash SET notes.body = stash.body WHERE notes.id = 2 AND stash.id = 1",
    )
    refused_raw(
        engine,
        pt,
        "UPDATE notes JOIN stash ON stash.id = 1 SET notes.tbody = stash.tbody WHERE notes.id = 2",
    )
    refused_raw(
        engine,
        name("f2", "notes", "body"),
        "UPDATE notes, stash SET notes.body = stash.body WHERE notes.id = 2 AND stash.id = 9",
    )
    refused_raw(
        engine,
        {pb, pt},
        "UPDATE notes, stash SET notes.practice_id = 'p2', stash.id = 3 "
        "WHERE notes.id = 1 AND stash.id = 1",
    )
    # SQLAlchemy renders the same multi-table UPDATE for MariaDB
    refused_sa(
        engine,
        plain_notes.update()
        .values({plain_notes.c.body: stash.c.body})
        .where(plain_notes.c.id == 2, stash.c.id == 1, stash.c.id != plain_notes.c.id),
        pb,
    )
    refused_sa(
        engine,
        notes.update()
        .values({notes.c.body: stash.c.body})
        .where(notes.c.id == 2, stash.c.id == 1, stash.c.id != notes.c.id),
        {pb, None},
    )


# -- other clients: psql, mariadb, pandas --------------------------------------------------------


def _client(engine: sa.Engine, sql: str) -> subprocess.CompletedProcess[str]:
    url = make_url(str(engine.url))
    kind = kind_of(url)
    host = url.host or "127.0.0.1"
    if kind == "postgresql":
        cmd = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", str(url.port or 5432)]
        cmd += ["-U", url.username or "postgres", "-d", str(url.database), "-c", sql]
    elif kind == "mariadb":
        cmd = ["mariadb", "-h", host, "-P", str(url.port or 3306), f"-u{url.username or 'root'}"]
        cmd += [str(url.database), "-e", sql]
    else:
        cmd = ["sqlite3", str(url.database), sql]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603


@pytest.mark.parametrize(
    "db_kind",
    [
        "postgresql",
        "mariadb",
        pytest.param(
            "sqlite", marks=pytest.mark.skipif("not __import__('shutil').which('sqlite3')")
        ),
    ],
)
def test_command_line_clients(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    pb, pt = name("p", "notes", "body"), name("p", "notes", "tbody")
    mysql_sub = kind_of(engine.url) == "mariadb"
    sub = (
        "(SELECT body FROM (SELECT body FROM notes WHERE id = 1) AS a)"
        if mysql_sub
        else "(SELECT body FROM notes WHERE id = 1)"
    )
    cases = [
        (f"UPDATE notes SET tbody = '{SECRET}' WHERE id = 1", name("f2", "notes", "tbody")),
        (
            f"INSERT INTO notes (id, practice_id, tbody) VALUES (90, 'p1', '{SECRET}')",
            name("f2", "notes", "tbody"),
        ),
        (f"UPDATE notes SET body = {sub} WHERE id = 2", pb),  # noqa: S608
        (
            "INSERT INTO notes (id, practice_id, tbody) "
            "SELECT 91, 'p2', tbody FROM notes WHERE id = 1",
            pt,
        ),
        ("UPDATE notes SET practice_id = 'p2' WHERE id = 1", {pb, pt}),
        (
            "UPDATE patients SET practice_id = 'p2' WHERE id = 1",
            name("m", "patients", "consultations_body"),
        ),
    ]
    before = snapshot(engine)
    for sql, expect in cases:
        names = {expect} if isinstance(expect, str) else expect
        done = _client(engine, sql)
        assert done.returncode != 0, sql
        assert any(n in done.stderr for n in names), (sql, done.stderr[-300:])
        assert snapshot(engine) == before, sql
    # the clients work: a harmless write goes through
    assert _client(engine, "UPDATE notes SET practice_id = 'p2' WHERE id = 3").returncode == 0


def _carnet_error(exc: BaseException) -> CarnetError:
    """The CarnetError ``exc`` is or wraps (pandas wraps some errors in its own)."""
    e: BaseException | None = exc
    while e is not None and not isinstance(e, CarnetError):
        e = e.__cause__ or e.__context__
    assert e is not None, repr(exc)
    return e


def test_pandas_to_sql_plaintext_refused(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    pd = pytest.importorskip("pandas")
    before = snapshot(engine)
    binary = {"body": sa.LargeBinary()}  # pandas would send bytes as VARCHAR
    frames = [
        (
            pd.DataFrame({"id": [100], "practice_id": ["p1"], "tbody": [SECRET]}),
            None,
            name("f2", "notes", "tbody"),
        ),
        (
            pd.DataFrame({"id": [100], "practice_id": ["p1"], "body": [SECRET.encode()]}),
            binary,
            name("f2", "notes", "body"),
        ),
        (
            pd.DataFrame(
                {"id": [100], "practice_id": ["p2"], "body": [stored(engine, "notes", "body", 1)]}
            ),
            binary,
            name("p", "notes", "body"),
        ),
        (
            pd.DataFrame(
                {"id": [100], "practice_id": ["p2"], "tbody": [stored(engine, "notes", "tbody", 1)]}
            ),
            None,
            name("p", "notes", "tbody"),
        ),
    ]
    for df, dtype, expect in frames:
        with pytest.raises(Exception) as ei:  # noqa: PT011 - carnet's error is looked for below
            df.to_sql("notes", engine, if_exists="append", index=False, dtype=dtype)
        err = _carnet_error(ei.value)
        assert err.constraint == expect
        assert leaks(err) == []
        assert snapshot(engine) == before
    # a plain DBAPI connection: pandas' SQLite fallback path, no SQLAlchemy at all
    if kind_of(engine.url) == "sqlite":
        import sqlite3

        dbapi = sqlite3.connect(str(engine.url.database))
        try:
            with pytest.raises(Exception) as de:  # noqa: PT011 - pandas.errors.DatabaseError
                frames[0][0].to_sql("notes", dbapi, if_exists="append", index=False)
            assert isinstance(de.value.__cause__, sqlite3.IntegrityError)
            assert dbchecks.check_of(de.value.__cause__) == name("f2", "notes", "tbody")
        finally:
            dbapi.close()
        assert snapshot(engine) == before


def test_pandas_to_sql_with_encrypted_dtype(
    keys: carnet.KeyManager, engine: sa.Engine, master_key_uri: str
) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {"id": [101, 102], "practice_id": ["p1", "p1"], "body": [SECRET, SECRET + " 2"]}
    )
    try:
        with carnet.tenant_scope("p1"):
            df.to_sql(
                "notes",
                engine,
                if_exists="append",
                index=False,
                dtype={"body": carnet.EncryptedText(tenant="practice_id")},
            )
    except CarnetError as err:
        assert leaks(err) == []
        pytest.xfail(
            f"to_sql with an EncryptedText dtype refused by carnet: {type(err).__name__}: {err}"
        )
    value = stored(engine, "notes", "body", 101)
    assert isinstance(value, bytes) and value[:1] == b"\x02"
    assert SECRET.encode() not in value
    assert opened(master_key_uri, engine, "notes", "body", 101, "p1") == SECRET
    assert opened(master_key_uri, engine, "notes", "body", 102, "p1") == SECRET + " 2"
    # the scope never overrides the row's practice: a p2 row inside a p1 scope is refused
    df2 = pd.DataFrame({"id": [103], "practice_id": ["p2"], "body": [SECRET]})
    before = snapshot(engine)
    with carnet.tenant_scope("p1"), pytest.raises(TenantMismatch) as ei:
        df2.to_sql(
            "notes",
            engine,
            if_exists="append",
            index=False,
            dtype={"body": carnet.EncryptedText(tenant="practice_id")},
        )
    assert leaks(ei.value) == []
    assert snapshot(engine) == before


# -- types that wrap EncryptedText -------------------------------------------------------------


class WrappedText(sa.types.TypeDecorator[str]):
    """An application's own type around EncryptedText."""

    impl = carnet.EncryptedText
    cache_ok = True


def test_with_variant_and_type_decorator(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    d = kind_of(engine.url)
    md = sa.MetaData()
    variant = sa.Table(
        "variant_notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column(
            "body", sa.Text().with_variant(carnet.EncryptedText(tenant="practice_id"), "postgresql")
        ),
    )
    wrapped = sa.Table(
        "wrapped_notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("body", WrappedText(tenant="practice_id")),
    )
    md.create_all(engine)
    assert [c.column for c in dbchecks.specs_for(wrapped, engine.dialect.name)] == ["body"]
    vspecs = [c.column for c in dbchecks.specs_for(variant, engine.dialect.name)]
    assert vspecs == (["body"] if d == "postgresql" else [])
    with engine.connect() as conn:
        vchecks = dbchecks.installed(conn, "variant_notes")
        wchecks = dbchecks.installed(conn, "wrapped_notes")
    for kind in ("f2", "p", "k"):
        n = name(kind, "wrapped_notes", "body")
        assert n in wchecks or {n + "_i", n + "_u"} <= wchecks, (kind, wchecks)
    plaintext = SECRET.encode() if d == "postgresql" else SECRET
    if d == "postgresql":
        assert name("f2", "variant_notes", "body") in vchecks
        refused_raw_table(
            engine,
            "variant_notes",
            name("f2", "variant_notes", "body"),
            "INSERT INTO variant_notes (id, practice_id, body) VALUES (1, 'p1', ?)",
            (plaintext,),
        )
    else:
        assert vchecks == set()
        driver_sql(
            engine,
            "INSERT INTO variant_notes (id, practice_id, body) VALUES (1, 'p1', ?)",
            (plaintext,),
        )
    refused_raw_table(
        engine,
        "wrapped_notes",
        name("f2", "wrapped_notes", "body"),
        "INSERT INTO wrapped_notes (id, practice_id, body) VALUES (1, 'p1', ?)",
        (SECRET.encode(),),
    )
    # Another table's value, for another practice: its label tag and its
    # practice are both wrong; whichever check the database runs first refuses.
    refused_raw_table(
        engine,
        "wrapped_notes",
        {name("p", "wrapped_notes", "body"), name("f2", "wrapped_notes", "body")},
        "INSERT INTO wrapped_notes (id, practice_id, body) VALUES (1, 'p2', ?)",
        (stored(engine, "notes", "body", 1),),
    )


def refused_raw_table(
    engine: sa.Engine, table: str, expect: str | set[str], sql: str, params: tuple[Any, ...]
) -> None:
    before = snapshot(engine, [table])
    for run in (driver_sql, raw):
        with pytest.raises(Exception) as ei:  # noqa: PT011 - the check's name is asserted
            run(engine, sql, params)
        assert refusal(ei.value) in ({expect} if isinstance(expect, str) else expect)
    assert snapshot(engine, [table]) == before


# -- traps ------------------------------------------------------------------------------------


def test_null_practice_with_a_value(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    value = stored(engine, "notes", "body", 1)
    refused_raw(
        engine, name("p", "notes", "body"), "INSERT INTO notes (id, body) VALUES (110, ?)", (value,)
    )
    refused_raw(
        engine,
        {name("p", "notes", "body"), name("p", "notes", "tbody")},
        "UPDATE notes SET practice_id = NULL WHERE id = 1",
    )
    refused_sa(engine, plain_notes.insert().values(id=110, body=value), name("p", "notes", "body"))
    # NULL practice, NULL value: nothing to check
    driver_sql(engine, "INSERT INTO notes (id) VALUES (111)")


def test_mixed_read_column(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    fm = name("fm", "mixed_notes", "body")
    p = name("p", "mixed_notes", "body")
    with engine.connect() as conn:
        found = dbchecks.installed(conn, "mixed_notes")
    assert fm in found or fm + "_i" in found, found
    # legacy plaintext is accepted in this phase
    driver_sql(
        engine, "INSERT INTO mixed_notes (id, practice_id, body) VALUES (3, 'p1', 'legacy text')"
    )
    # another practice's v2 value is not
    value_a = stored(engine, "mixed_notes", "body", 1)
    assert value_a.startswith("carnet:2:")
    refused_raw(engine, p, "UPDATE mixed_notes SET body = ? WHERE id = 2", (value_a,))
    refused_raw(engine, p, "UPDATE mixed_notes SET practice_id = 'p2' WHERE id = 1")
    # values that claim carnet's prefix but are not carnet values (a "carnet:2:"
    # head also fails the practice check: either may report it)
    refused_raw(
        engine, {fm, p}, "UPDATE mixed_notes SET body = 'carnet:2:not-a-value' WHERE id = 3"
    )
    refused_raw(engine, fm, "UPDATE mixed_notes SET body = 'carnet:9:not-a-value' WHERE id = 3")


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_sqlite_ignore_check_constraints_does_not_switch_checks_off(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    import sqlite3

    before = snapshot(engine)
    conn = sqlite3.connect(str(engine.url.database))
    try:
        conn.execute("PRAGMA ignore_check_constraints = 1")
        assert conn.execute("PRAGMA ignore_check_constraints").fetchone()[0] == 1
        for sql, params, expect in (
            ("UPDATE notes SET tbody = ? WHERE id = 1", (SECRET,), name("f2", "notes", "tbody")),
            (
                "UPDATE notes SET body = (SELECT body FROM notes WHERE id = 1) WHERE id = 2",
                (),
                name("p", "notes", "body"),
            ),
            (
                "UPDATE notes SET practice_id = 'p2' WHERE id = 1",
                (),
                {name("p", "notes", "body"), name("p", "notes", "tbody")},
            ),
        ):
            with pytest.raises(sqlite3.IntegrityError) as ei:
                conn.execute(sql, params)
            assert dbchecks.check_of(ei.value) in ({expect} if isinstance(expect, str) else expect)
            conn.rollback()
    finally:
        conn.close()
    assert snapshot(engine) == before


@pytest.mark.parametrize("db_kind", ["mariadb"])
def test_mariadb_check_constraint_checks_off(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """Documented weakness: a session may switch CHECK constraints off; the triggers still run."""
    value_p9 = keys.encrypt_text(SECRET, tenant="p9", label="notes.body")
    raw(engine, "DELETE FROM carnet_keys WHERE tenant = 'p9'")
    dbapi = engine.raw_connection()
    try:
        cur = dbapi.cursor()
        cur.execute("SET SESSION check_constraint_checks = 0")
        # the key check is a trigger: still refused
        with pytest.raises(Exception) as ei:  # noqa: PT011
            cur.execute(
                "INSERT INTO notes (id, practice_id, body) VALUES (120, 'p9', %s)", (value_p9,)
            )
        assert dbchecks.check_of(ei.value) == name("k", "notes", "body")
        dbapi.rollback()
        # the parent-path checks are triggers: still refused
        with pytest.raises(Exception) as ei:  # noqa: PT011
            cur.execute("UPDATE patients SET practice_id = 'p2' WHERE id = 1")
        assert dbchecks.check_of(ei.value) == name("m", "patients", "consultations_body")
        dbapi.rollback()
        # the format and practice checks are CHECK constraints: off in this session
        cur.execute("UPDATE notes SET tbody = %s WHERE id = 3", (SECRET,))
        cur.execute(
            "UPDATE notes SET body = (SELECT body FROM (SELECT body FROM notes WHERE id = 2) a) "
            "WHERE id = 3"
        )
        dbapi.commit()
        cur.close()
    finally:
        dbapi.close()
    assert stored(engine, "notes", "tbody", 3) == SECRET
    assert stored(engine, "notes", "body", 3) == stored(engine, "notes", "body", 2)
