"""carnet.dbchecks: names of the checks, which columns are encrypted, a refusal to an error."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from typing import Any

import pymysql  # type: ignore[import-untyped]
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

import carnet
from carnet import dbchecks
from carnet.errors import (
    CarnetError,
    ConfigurationError,
    InvalidCiphertext,
    TenantMismatch,
    UnknownKey,
)

DIALECTS = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),
    "mysql": mysql.dialect(),
}
NAME = re.compile(r"[a-z0-9_]{1,63}")


class Wrapped(sa.types.TypeDecorator[str]):
    impl = carnet.EncryptedText
    cache_ok = True


class Outer(sa.types.TypeDecorator[str]):
    """A TypeDecorator over a variant: the variant is looked through too."""

    impl = sa.Text
    cache_ok = True


# -- names ----------------------------------------------------------------------------------


def test_short_names_are_spelled_out() -> None:
    assert dbchecks.check_name("f2", "notes", "body") == "carnet_f2_notes_body"
    assert dbchecks.check_name("p", "notes", "body") == "carnet_p_notes_body"
    assert dbchecks.check_name("m", "patients", "consultations_body") == (
        "carnet_m_patients_consultations_body"
    )


@pytest.mark.parametrize(
    ("table", "column"),
    [
        ("t" * 63, "c" * 63),
        ("consultations_de_suivi_psychiatrique_ambulatoire", "compte_rendu_detaille"),
        ("Notes", "Body"),
        ("notes médicales", "corps"),
        ("notes-2024", "body"),
    ],
)
@pytest.mark.parametrize("kind", ["f2", "f1", "fm", "p", "k", "m"])
def test_long_or_odd_names_are_hashed_deterministically(kind: str, table: str, column: str) -> None:
    n = dbchecks.check_name(kind, table, column)
    assert len(n) <= 60  # room for the _i / _u suffix of a trigger
    assert NAME.fullmatch(n + "_i")
    assert n == dbchecks.check_name(kind, table, column)
    assert n.startswith(f"carnet_{kind}_")
    # a refusal naming it is recognised
    assert dbchecks.check_of(sqlite3.IntegrityError(n)) == n
    # two tables that differ only past the cut, or only in case, do not share names
    assert n != dbchecks.check_name(kind, table + "x", column)
    assert n != dbchecks.check_name(kind, table.swapcase(), column) or table == table.swapcase()


def _specs() -> Iterator[dbchecks.ColumnSpec]:
    long_t = "consultations_de_suivi_psychiatrique_ambulatoire_et_hospitalier"
    long_c = "compte_rendu_detaille_de_la_consultation"
    for storage in ("binary", "text"):
        for mode in dbchecks.MODES:
            yield dbchecks.ColumnSpec(
                long_t, None, long_c, storage, practice="practice_id", mode=mode
            )
            yield dbchecks.ColumnSpec(
                long_t,
                None,
                long_c,
                storage,
                parent=dbchecks.Parent(
                    "patient_id", "patients_" + long_t, None, "id", "practice_id"
                ),
                mode=mode,
            )


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_every_object_name_fits_every_database(dialect: str) -> None:
    for spec in _specs():
        for keys in (None, "carnet_keys"):
            objs = dbchecks.ddl_objects(spec, DIALECTS[dialect], keys_table=keys)
            assert objs
            for obj in objs:
                assert NAME.fullmatch(obj.name), obj.name
                assert len(obj.name) <= 63
            again = dbchecks.ddl_objects(spec, DIALECTS[dialect], keys_table=keys)
            assert [o.create for o in again] == [o.create for o in objs]


def test_parent_move_check_named_after_parent_and_child() -> None:
    spec = dbchecks.ColumnSpec(
        "consultations",
        None,
        "body",
        "binary",
        parent=dbchecks.Parent("patient_id", "patients", None, "id", "practice_id"),
    )
    assert spec.name("m") == "carnet_m_patients_consultations_body"
    assert spec.name("p") == "carnet_p_consultations_body"
    assert spec.name("f") == "carnet_f2_consultations_body"
    assert dbchecks.replace(spec, mode="mixed").name("f") == "carnet_fm_consultations_body"


def test_unsupported_dialect_is_refused() -> None:
    from sqlalchemy.dialects import mssql

    spec = dbchecks.ColumnSpec("notes", None, "body", "binary", practice="practice_id")
    with pytest.raises(ConfigurationError):
        dbchecks.ddl_objects(spec, mssql.dialect())


# -- encrypted_type --------------------------------------------------------------------------


def test_encrypted_type_sees_through_wrappers() -> None:
    enc = carnet.EncryptedText(tenant="practice_id")
    assert dbchecks.encrypted_type(enc) is enc
    col: sa.Column[str] = sa.Column("body", enc)
    assert dbchecks.encrypted_type(col) is enc
    wrapped = Wrapped(tenant="practice_id")
    found = dbchecks.encrypted_type(wrapped)
    assert isinstance(found, carnet.EncryptedText) and found.tenant == "practice_id"
    for d in (None, "sqlite", "postgresql", "mysql"):
        assert dbchecks.is_encrypted(wrapped, d)
        assert dbchecks.is_encrypted(sa.Column("b", Wrapped(tenant="p")), d)


def test_encrypted_type_with_variant_per_dialect() -> None:
    enc = carnet.EncryptedText(tenant="practice_id")
    pg_only = sa.Text().with_variant(enc, "postgresql")
    assert dbchecks.encrypted_type(pg_only, "postgresql") is enc
    for d in (None, "sqlite", "mysql", "mariadb"):
        assert dbchecks.encrypted_type(pg_only, d) is None
    # a variant inside a TypeDecorator
    outer = Outer()
    outer.impl = sa.Text().with_variant(enc, "mysql")  # type: ignore[assignment]
    assert dbchecks.encrypted_type(outer, "mysql") is enc
    assert dbchecks.encrypted_type(outer, "sqlite") is None


def test_encrypted_type_variant_of_encrypted_text() -> None:
    """The other way round: encrypted everywhere except SQLite."""
    not_sqlite = carnet.EncryptedText(tenant="practice_id").with_variant(sa.Text(), "sqlite")
    assert dbchecks.encrypted_type(not_sqlite, "postgresql") is not None
    assert dbchecks.encrypted_type(not_sqlite) is not None
    assert dbchecks.encrypted_type(not_sqlite, "sqlite") is None


def test_encrypted_type_of_searchable_and_plain_types() -> None:
    assert dbchecks.is_encrypted(carnet.EncryptedString(64, tenant="practice_id"))
    for typ in (sa.Text(), sa.LargeBinary(), sa.String(10), sa.Integer(), Outer()):
        assert dbchecks.encrypted_type(typ) is None
        assert dbchecks.encrypted_type(sa.Column("x", typ)) is None
    for obj in (None, "body", 3, object()):
        assert dbchecks.encrypted_type(obj) is None


def test_specs_for_table_kinds() -> None:
    md = sa.MetaData()
    t = sa.Table(
        "notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
        sa.Column(
            "tbody", carnet.EncryptedText(tenant="practice_id", storage="text", mixed_read=True)
        ),
        sa.Column(
            "v", sa.Text().with_variant(carnet.EncryptedText(tenant="practice_id"), "postgresql")
        ),
        sa.Column("plain", sa.Text),
    )
    got = {s.column: s for s in dbchecks.specs_for(t, "sqlite")}
    assert set(got) == {"body", "tbody"}
    assert got["body"].storage == "binary" and got["body"].mode == "v2"
    assert got["tbody"].storage == "text" and got["tbody"].mode == "mixed"
    assert got["body"].practice == "practice_id"
    assert {s.column for s in dbchecks.specs_for(t, "postgresql")} == {"body", "tbody", "v"}
    off = sa.Table(
        "off",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
        info={"carnet_checks": False},
    )
    assert dbchecks.specs_for(off, "sqlite") == []


@pytest.mark.parametrize(
    "ptype",
    [
        sa.CHAR(8),
        sa.NCHAR(8),
        sa.Float(),
        sa.Double(),
        sa.Numeric(10, 2),
        sa.Date(),
        sa.DateTime(),
        sa.Uuid(),
    ],
    ids=repr,
)
def test_practice_types_refused(ptype: sa.types.TypeEngine[Any]) -> None:
    t = sa.Table(
        "t",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", ptype),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
    )
    with pytest.raises(ConfigurationError) as ei:
        dbchecks.check_practice_type(t.c.practice_id)
    assert "t.practice_id" in str(ei.value)
    for d in ("sqlite", "postgresql", "mysql"):
        with pytest.raises(ConfigurationError):
            dbchecks.specs_for(t, d)


@pytest.mark.parametrize(
    "ptype",
    [
        sa.String(64),
        sa.Unicode(64),
        sa.Text(),
        sa.Integer(),
        sa.BigInteger(),
        sa.SmallInteger(),
        sa.Enum("a", "b"),
    ],
    ids=repr,
)
def test_practice_types_accepted(ptype: sa.types.TypeEngine[Any]) -> None:
    col: sa.Column[Any] = sa.Column("practice_id", ptype)
    sa.Table("t", sa.MetaData(), col)
    dbchecks.check_practice_type(col)


# -- a refusal to carnet's error ------------------------------------------------------------


def test_check_of_driver_messages() -> None:
    # SQLite's RAISE(ABORT, name) and MariaDB's SIGNAL: the message is the name
    assert dbchecks.check_of(sqlite3.IntegrityError("carnet_p_notes_body")) == "carnet_p_notes_body"
    assert (
        dbchecks.check_of(pymysql.err.OperationalError(1644, "carnet_k_notes_body"))
        == "carnet_k_notes_body"
    )
    # MariaDB's CHECK constraint: the message names it in backquotes
    msg = "CONSTRAINT `carnet_f2_notes_tbody` failed for `carnet_t_x`.`notes`"
    assert dbchecks.check_of(pymysql.err.IntegrityError(4025, msg)) == "carnet_f2_notes_tbody"
    # not carnet's
    for exc in (
        sqlite3.IntegrityError("UNIQUE constraint failed: notes.id"),
        pymysql.err.IntegrityError(4025, "CONSTRAINT `notes_chk_1` failed for `d`.`notes`"),
        sqlite3.IntegrityError("carnet_x_notes_body"),
        ValueError(),
        RuntimeError(3),
    ):
        assert dbchecks.check_of(exc) is None


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("carnet_f2_notes_body", InvalidCiphertext),
        ("carnet_f1_notes_body", InvalidCiphertext),
        ("carnet_fm_notes_body", InvalidCiphertext),
        ("carnet_p_notes_body", TenantMismatch),
        ("carnet_m_patients_consultations_body", TenantMismatch),
        ("carnet_k_notes_body", UnknownKey),
    ],
)
def test_error_for(name: str, cls: type[CarnetError]) -> None:
    err = dbchecks.error_for(name)
    assert type(err) is cls
    assert err.constraint == name
    assert name in str(err)
    assert "nothing of the statement was written" in str(err)
    hashed = dbchecks.check_name(name.split("_")[1], "t" * 70, "c")
    assert dbchecks.error_for(hashed).constraint == hashed


def test_scrub_keeps_only_the_name() -> None:
    exc = sqlite3.IntegrityError(
        'new row violates "carnet_f2_notes_tbody"', "Failing row contains (1, p1, secret)"
    )
    dbchecks.scrub(exc, "carnet_f2_notes_tbody")
    assert exc.args == ("refused by carnet_f2_notes_tbody",)


# -- on the databases: names as installed ---------------------------------------------------


def test_long_names_installed_and_reported(engine: sa.Engine) -> None:
    long_t = "consultations_de_suivi_psychiatrique_ambulatoire"
    long_c = "compte_rendu_detaille_de_la_seance"
    md = sa.MetaData()
    sa.Table(
        long_t,
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column(long_c, carnet.EncryptedText(tenant="practice_id", storage="text")),
    )
    md.create_all(engine)
    f2 = dbchecks.check_name("f2", long_t, long_c)
    assert len(f2) <= 60 and f2 != f"carnet_f2_{long_t}_{long_c}"
    with engine.connect() as conn:
        names = dbchecks.installed(conn, long_t)
    assert f2 in names or {f2 + "_i", f2 + "_u"} <= names, names
    assert all(len(n) <= 63 for n in names)
    dbapi = engine.raw_connection()
    try:
        cur = dbapi.cursor()
        sql = f"INSERT INTO {long_t} (id, practice_id, {long_c}) VALUES (1, 'p1', 'plain')"  # noqa: S608
        with pytest.raises(Exception) as ei:  # noqa: PT011 - the driver's own class
            cur.execute(sql)
        assert dbchecks.check_of(ei.value) == f2
        dbapi.rollback()
    finally:
        dbapi.close()
    # created again (another database, same model): the same names
    with engine.begin() as conn:
        specs = dbchecks.specs_for(md.tables[long_t], conn.dialect.name)
        made = dbchecks.install(conn, specs, keys_table=None)
    assert f2 in made or f2 + "_i" in made
    with engine.connect() as conn:
        assert dbchecks.installed(conn, long_t) == names
