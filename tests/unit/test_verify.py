"""One verification walk behind ``carnet verify`` and ``carnet migrate verify``.

Both front ends read the same table: a mix of sealed, NULL, plaintext,
tampered, other-practice, unknown-key, retired-key and crypto-shredded values,
rows without a practice, the practice on a parent table, and no declared
primary key (``--pk id``). They must agree on every count, on SQLite,
PostgreSQL and MariaDB.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import carnet
from carnet import envelope, lifecycle
from carnet import verify as vf
from carnet.errors import DatabaseError
from carnet.migrate import build_plan, resolve, run_migration
from carnet.migrate import verify as migrate_verify
from carnet.migrate.cli import migrate

SECRET = "PLANTED-verify-diabete-9c1"
LABEL = "consults.comment"


@dataclass(frozen=True)
class Case:
    """One row: its patient, what it stores, and what each front end must call it."""

    patient: int | None
    value: str | None
    migrate: str  # kind in carnet migrate verify's totals
    lifecycle: str  # "ok", "null", "plaintext", "destroyed", or the reason it fails


def _tables(engine: sa.Engine) -> tuple[sa.Table, sa.Table]:
    md = sa.MetaData()
    patients = sa.Table(
        "patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(20)),
    )
    # No PRIMARY KEY: only a unique id, named with pk=("id",) / --pk id.
    consults = sa.Table(
        "consults",
        md,
        sa.Column("id", sa.Integer, nullable=False, unique=True),
        sa.Column("patient_id", sa.Integer, sa.ForeignKey("patients.id")),
        sa.Column("comment", sa.Text),
    )
    md.create_all(engine)
    return patients, consults


def _mixed_table(engine: sa.Engine, keys: carnet.KeyManager) -> list[Case]:
    """Patients 1..5 of practices p0, p1, p2 (shredded below), '' and NULL; one consult per case."""
    patients, consults = _tables(engine)
    for t in ("p0", "p1", "p2"):
        keys.ensure_key(t)  # before any transaction: SQLite has one writer

    def seal(tenant: str, i: int) -> str:
        return envelope.to_text(keys.encrypt(f"{SECRET} {i}".encode(), tenant=tenant, label=LABEL))

    retired_kid = keys.ensure_key("p0").key_id
    under_retired = seal("p0", 0)
    keys.rotate("p0")  # p0 v2 seals everything else; v1 is retired below
    tampered = bytearray(envelope.from_text(seal("p0", 1)))
    tampered[-1] ^= 1
    # Well framed for patient 2's practice, under a key id carnet_keys does not have.
    unknown = (
        envelope.VERSION_BYTE
        + os.urandom(envelope.KEY_ID_SIZE)
        + envelope.label_tag(LABEL)
        + envelope.practice_field("p1")
        + os.urandom(40)
    )
    cases = [Case(1 + i % 2, seal(f"p{i % 2}", i), "sealed", "ok") for i in range(12)]
    cases += [
        Case(1, None, "null", "null"),
        Case(2, None, "null", "null"),
        Case(None, None, "null", "null"),
        Case(1, "Patiente anxieuse", "plaintext", "plaintext"),
        Case(2, "carnet de vaccination à jour", "plaintext", "plaintext"),
        Case(1, "", "plaintext", "plaintext"),
        Case(1, envelope.to_text(bytes(tampered)), "prefixed_invalid", "tampered_or_foreign"),
        Case(1, seal("p1", 99), "prefixed_invalid", "other_practice"),
        Case(2, envelope.to_text(unknown), "prefixed_invalid", "unknown_key"),
        Case(2, "carnet:@@not base64@@", "prefixed_invalid", "tampered_or_foreign"),
        Case(1, under_retired, "prefixed_invalid", "retired_key"),
        Case(3, seal("p2", 20), "shredded", "destroyed"),
        Case(3, seal("p2", 21), "shredded", "destroyed"),
        Case(3, None, "null", "null"),
        Case(None, "note sans patient", "no_tenant", "no_practice"),
        Case(5, seal("p0", 30), "no_tenant", "no_practice"),
        Case(4, "note d'un cabinet sans nom", "no_tenant", "no_practice"),
    ]
    with engine.begin() as conn:
        conn.execute(
            patients.insert(),
            [
                {"id": 1, "practice_id": "p0"},
                {"id": 2, "practice_id": "p1"},
                {"id": 3, "practice_id": "p2"},
                {"id": 4, "practice_id": ""},
                {"id": 5, "practice_id": None},
            ],
        )
        conn.execute(
            consults.insert(),
            [
                {"id": 100 + i, "patient_id": c.patient, "comment": c.value}
                for i, c in enumerate(cases)
            ],
        )
    keys.retire(retired_kid)
    keys.destroy("p2")
    return cases


def test_both_front_ends_agree_on_every_count(
    engine: sa.Engine, unconfigured_keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    cases = _mixed_table(engine, unconfigured_keys)
    unconfigured_keys.close()
    # A manager that never saw the keys before they were retired or destroyed,
    # as a verifying process would be.
    reader = carnet.KeyManager(engine, master_key=master_key_uri)
    pks = {c: [] for c in ("migrate", "lifecycle")}
    expected_m: dict[str, int] = dict.fromkeys(
        ("plaintext", "sealed", "null", "prefixed_invalid", "no_tenant", "shredded"), 0
    )
    expected_m["legacy_sealed"] = 0
    expected_l: dict[str, int] = {}
    for i, c in enumerate(cases):
        expected_m[c.migrate] += 1
        expected_l[c.lifecycle] = expected_l.get(c.lifecycle, 0) + 1
        if c.migrate not in ("sealed", "null", "shredded"):
            pks["migrate"].append([100 + i])
        if c.lifecycle not in ("ok", "null", "destroyed"):
            pks["lifecycle"].append([100 + i])

    target = resolve(engine, "consults", "comment", tenant="patients.practice_id", pk=["id"])
    v = migrate_verify(reader, engine, target, batch_size=4)
    assert v.totals == expected_m and not v.clean
    assert sorted(pk for s in v.samples.values() for pk in s) == pks["migrate"]
    assert set(v.samples) == {"plaintext", "prefixed_invalid", "no_tenant"}

    seen: list[int] = []
    rep = lifecycle.verify(
        reader,
        "consults",
        "comment",
        tenant_column="patients.practice_id",
        pk=["id"],
        batch_size=4,
        progress=seen.append,
    )
    assert sum(seen) == rep.rows == len(cases) and max(seen) == 4
    fails = {k: n for k, n in expected_l.items() if k not in ("ok", "null", "destroyed")}
    assert (rep.ok, rep.nulls, rep.plaintext, rep.destroyed) == (
        expected_l["ok"],
        expected_l["null"],
        expected_l["plaintext"],
        expected_l["destroyed"],
    )
    assert rep.reasons == fails and rep.failed == sum(fails.values())
    assert sorted(rep.failed_pks) == pks["lifecycle"]
    assert rep.practices["p2"] == {"ok": 0, "destroyed": 2, "failed": 0}
    assert rep.practices[""] == {"ok": 0, "destroyed": 0, "failed": 3}  # no practice

    # The two reports, count for count.
    t = v.totals
    assert rep.rows == sum(t.values())
    assert rep.ok == t["sealed"] and rep.nulls == t["null"] and rep.destroyed == t["shredded"]
    assert rep.plaintext == t["plaintext"] == rep.reasons["plaintext"]
    assert rep.reasons["no_practice"] == t["no_tenant"]
    assert rep.failed == t["plaintext"] + t["prefixed_invalid"] + t["no_tenant"]

    # With legacy plaintext allowed, only what does not open fails.
    allowed = lifecycle.verify(
        reader,
        "consults",
        "comment",
        tenant_column="patients.practice_id",
        pk=["id"],
        allow_plaintext=True,
    )
    assert allowed.failed == t["prefixed_invalid"] + t["no_tenant"]
    assert "plaintext" not in allowed.reasons and allowed.plaintext == t["plaintext"]

    # `carnet migrate verify` prints the same totals.
    res = CliRunner().invoke(
        migrate,
        ["verify", "--table", "consults", "--column", "comment"]
        + ["--tenant", "patients.practice_id", "--pk", "id", "--json"],
        env={"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri},
        catch_exceptions=False,
    )
    assert json.loads(res.stdout)["totals"] == t
    for out in (res.output, repr(rep.as_dict()), repr(v.as_dict())):
        assert SECRET not in out and "anxieuse" not in out
    reader.close()


def test_a_value_under_a_retired_key_fails_and_is_never_counted_shredded(
    engine: sa.Engine, unconfigured_keys: carnet.KeyManager, master_key_uri: str
) -> None:
    # The two used to disagree: the migration counted it crypto-shredded (a
    # KeyRetired is a KeyDestroyed), so `finish` recorded a column strict with
    # a note no one can read although its practice was never erased.
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(20)),
        sa.Column("body", sa.Text),
    )
    notes.create(engine)
    old = unconfigured_keys.ensure_key("p0").key_id
    stale = envelope.to_text(
        unconfigured_keys.encrypt(SECRET.encode(), tenant="p0", label="notes.body")
    )
    unconfigured_keys.rotate("p0")
    fresh = envelope.to_text(
        unconfigured_keys.encrypt(SECRET.encode(), tenant="p0", label="notes.body")
    )
    with engine.begin() as conn:
        conn.execute(
            notes.insert(),
            [
                {"id": 1, "practice_id": "p0", "body": stale},
                {"id": 2, "practice_id": "p0", "body": fresh},
            ],
        )
    unconfigured_keys.retire(old)
    unconfigured_keys.close()
    reader = carnet.KeyManager(engine, master_key=master_key_uri)
    target = resolve(engine, "notes", "body", tenant="practice_id")
    v = migrate_verify(reader, engine, target)
    assert (v.totals["shredded"], v.totals["prefixed_invalid"], v.clean) == (0, 1, False)
    assert v.samples == {"prefixed_invalid": [[1]]}
    assert build_plan(reader, engine, target).needs_decision
    # The backfill leaves it and says so, rather than skipping it in silence.
    assert run_migration(reader, engine, target).problems == {"prefixed_invalid": [[1]]}
    rep = lifecycle.verify(reader, "notes", "body", tenant_column="practice_id")
    assert (rep.failed, rep.reasons, rep.failed_pks, rep.destroyed) == (
        1,
        {"retired_key": 1},
        [[1]],
        0,
    )
    reader.close()


def test_a_row_without_a_practice_fails_however_its_value_looks(
    engine: sa.Engine, unconfigured_keys: carnet.KeyManager
) -> None:
    # `carnet verify --tenant-column` used to count plaintext in such a row as
    # plaintext, and a sealed value as an "error" of its key's practice; the
    # migration called both no_tenant. One answer now: no_practice.
    notes = sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(20)),
        sa.Column("body", sa.Text),
    )
    notes.create(engine)
    sealed = envelope.to_text(
        unconfigured_keys.encrypt(SECRET.encode(), tenant="p0", label="notes.body")
    )
    with engine.begin() as conn:
        conn.execute(
            notes.insert(),
            [
                {"id": 1, "practice_id": None, "body": "texte en clair"},
                {"id": 2, "practice_id": None, "body": sealed},
                {"id": 3, "practice_id": "p0", "body": sealed},
                {"id": 4, "practice_id": None, "body": None},
            ],
        )
    for allow in (False, True):
        rep = lifecycle.verify(
            unconfigured_keys, "notes", "body", tenant_column="practice_id", allow_plaintext=allow
        )
        assert (rep.ok, rep.nulls, rep.plaintext, rep.failed) == (1, 1, 0, 2)
        assert rep.reasons == {"no_practice": 2} and rep.failed_pks == [[1], [2]]
    # Without a practice column each value is opened as its key's practice.
    rep = lifecycle.verify(unconfigured_keys, "notes", "body", allow_plaintext=True)
    assert (rep.ok, rep.plaintext, rep.failed) == (2, 1, 0)
    v = migrate_verify(
        unconfigured_keys, engine, resolve(engine, "notes", "body", tenant="practice_id")
    )
    assert (v.totals["no_tenant"], v.totals["sealed"], v.totals["null"]) == (2, 1, 1)


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_a_read_error_is_a_carnet_error_without_the_value(
    engine: sa.Engine, unconfigured_keys: carnet.KeyManager
) -> None:
    # `carnet verify` read through the batch engine without the migration's
    # guard: a Latin-1 legacy note came back as the driver's error quoting it.
    sa.Table(
        "notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(20)),
        sa.Column("body", sa.Text),
    ).create(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO notes (id, practice_id, body) VALUES (1, 'p0', CAST(? AS TEXT))",
            ((SECRET + " r\u00e9sum\u00e9").encode("latin-1"),),
        )
    for call in (
        lambda: lifecycle.verify(unconfigured_keys, "notes", "body", tenant_column="practice_id"),
        lambda: migrate_verify(
            unconfigured_keys, engine, resolve(engine, "notes", "body", tenant="practice_id")
        ),
    ):
        with pytest.raises(DatabaseError) as ei:
            call()
        exc = ei.value
        assert exc.__cause__ is None and exc.__context__ is None
        assert SECRET not in str(exc) and SECRET not in repr(vars(exc))
        assert "notes.body" in str(exc) and "not valid UTF-8" in str(exc)


def test_one_classification_of_a_stored_value(unconfigured_keys: carnet.KeyManager) -> None:
    """The judgement itself, without a table: the row's practice, or the key's."""
    sealed = unconfigured_keys.encrypt(b"x", tenant="p0", label="t.c")
    unconfigured_keys.ensure_key("p1")
    by_key = vf.KeyPractices(unconfigured_keys)
    for value, tenant, kind, reason, practice in (
        (None, "p0", vf.NULL, None, "p0"),
        ("texte", "p0", vf.PLAINTEXT, None, "p0"),
        ("texte", None, vf.FAILED, vf.NO_PRACTICE, None),
        (sealed, "p0", vf.OK, None, "p0"),
        (envelope.to_text(sealed), "p0", vf.OK, None, "p0"),
        (memoryview(sealed), "p0", vf.OK, None, "p0"),
        (sealed, "p1", vf.FAILED, vf.OTHER_PRACTICE, "p1"),
        (sealed[:10], "p0", vf.FAILED, vf.TAMPERED, "p0"),
        ("carnet:%%%", "p0", vf.FAILED, vf.TAMPERED, "p0"),
    ):
        out = vf.classify(unconfigured_keys, value, label="t.c", tenant=tenant)
        assert (out.kind, out.reason, out.practice) == (kind, reason, practice), value
    # Opened as its key's practice: authentic, wherever it sits.
    out = vf.classify(unconfigured_keys, sealed, label="t.c", tenant=None, by_key=by_key)
    assert (out.kind, out.practice) == (vf.OK, "p0")
    out = vf.classify(unconfigured_keys, sealed, label="t.other", tenant=None, by_key=by_key)
    assert (out.kind, out.reason) == (vf.FAILED, vf.TAMPERED)
