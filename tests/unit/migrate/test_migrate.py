"""carnet migrate on the legacy practice example, on SQLite, PostgreSQL and MariaDB.

Plan counts, the look-alike legacy note, tenant resolution through parent
tables, mixed-read then strict, expand/contract with Alembic, and no plaintext
in any output.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import carnet
from carnet import dbchecks, envelope
from carnet.errors import ConfigurationError, InvalidCiphertext
from carnet.migrate import build_plan, resolve, run_migration, verify
from carnet.migrate.cli import migrate
from carnet.migrate.run import checks_spec
from carnet.migrate.state import get as migration_state
from support.paths import ROOT

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from legacy_practice import app as legacy_app  # noqa: E402
from legacy_practice.generate import populate  # noqa: E402

TARGET = ["--table", "consultations", "--column", "comment", "--tenant", "patients.practice_id"]


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """No models: the legacy application's tables are made by each test."""
    return ()


@pytest.fixture
def legacy(engine: sa.Engine) -> sa.Engine:
    populate(engine, seed=7, practices_n=3, patients_n=40, consultations_n=300)
    return engine


def cli(db_url: str, master_key_uri: str, *args: str) -> Result:
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    return CliRunner().invoke(migrate, list(args), env=env, catch_exceptions=False)


def comments(engine: sa.Engine) -> dict[int, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, comment FROM consultations")).all())


def test_plan_counts_per_practice_and_reports_the_lookalike(
    legacy: sa.Engine, keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    before = comments(legacy)
    res = cli(db_url, master_key_uri, "plan", *TARGET, "--json")
    assert res.exit_code == 9, res.output  # not complete: a decision is needed
    plan = json.loads(res.stdout)
    nulls = sum(1 for v in before.values() if v is None)
    assert plan["totals"]["null"] == nulls
    assert plan["totals"]["prefixed_invalid"] == 1
    assert plan["samples"]["prefixed_invalid"] == [[3]]
    assert plan["to_encrypt"] == len(before) - nulls - 1
    assert sum(c["plaintext"] for c in plan["per_tenant"].values()) == plan["to_encrypt"]
    assert set(plan["per_tenant"]) == {"1", "2", "3"}
    assert plan["estimate_seconds"] >= 0
    assert comments(legacy) == before  # plan writes nothing

    # run without a decision leaves the look-alike in place and says so
    res = cli(db_url, master_key_uri, "run", *TARGET, "--json")
    assert res.exit_code == 9  # not complete
    out = json.loads(res.stdout)
    assert out["problems"] == {"prefixed_invalid": [[3]]}
    assert comments(legacy)[3] == before[3]
    res = cli(db_url, master_key_uri, "finish", *TARGET)
    assert res.exit_code == 9  # not complete
    assert migration_state(legacy, "consultations", "comment")["state"] == "running"

    # the operator looked at row 3 and decided it is a note: seal it
    res = cli(db_url, master_key_uri, "run", *TARGET, "--prefixed", "encrypt", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rewritten"] == 1
    res = cli(db_url, master_key_uri, "finish", *TARGET, "--json")
    assert res.exit_code == 0, res.output
    assert migration_state(legacy, "consultations", "comment")["state"] == "strict"

    strict = legacy_app.consultations("strict")
    for cid, text in before.items():
        assert legacy_app.read_comment(legacy, strict, cid) == text


def test_tenant_resolution_paths(legacy: sa.Engine, keys: carnet.KeyManager) -> None:
    discovered = resolve(legacy, "consultations", "comment", tenant="patients.practice_id")
    spelled = resolve(
        legacy,
        "consultations",
        "comment",
        tenant="patients.practice_id",
        via=["consultations.patient_id=patients.id"],
    )
    assert discovered.tenant == spelled.tenant
    assert str(discovered.tenant) == "patients.practice_id via consultations.patient_id=patients.id"
    with pytest.raises(ConfigurationError, match="no foreign-key path"):
        resolve(legacy, "practices", "name", tenant="patients.practice_id")
    with pytest.raises(ConfigurationError, match="no column"):
        resolve(legacy, "consultations", "comment", tenant="patients.nope")
    with pytest.raises(ConfigurationError, match="do not chain|lead from"):
        resolve(
            legacy,
            "consultations",
            "comment",
            tenant="practices.id",
            via=["consultations.patient_id=patients.id", "practices.id=patients.id"],
        )
    # three levels: the practice's own id, two joins up
    deep = resolve(legacy, "consultations", "comment", tenant="practices.id")
    assert len(deep.tenant.steps) == 2
    p = build_plan(keys, legacy, deep)
    assert set(p.per_tenant) == {"1", "2", "3"}


def test_ambiguous_path_and_orphans_are_reported(
    engine: sa.Engine, keys: carnet.KeyManager
) -> None:
    md = sa.MetaData()
    sa.Table("practices", md, sa.Column("id", sa.Integer, primary_key=True))
    sa.Table(
        "letters",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("sender_id", sa.Integer, sa.ForeignKey("practices.id")),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("practices.id"), nullable=True),
        sa.Column("body", sa.Text),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO practices (id) VALUES (1)"))
        conn.execute(
            sa.text(
                "INSERT INTO letters (id, sender_id, owner_id, body) VALUES "
                "(1, 1, 1, 'Cher confrère'), (2, 1, NULL, 'orpheline')"
            )
        )
    with pytest.raises(ConfigurationError, match="several foreign-key paths"):
        resolve(engine, "letters", "body", tenant="practices.id")
    t = resolve(
        engine, "letters", "body", tenant="practices.id", via=["letters.owner_id=practices.id"]
    )
    p = build_plan(keys, engine, t)
    assert p.totals["no_tenant"] == 1 and p.samples["no_tenant"] == [[2]]
    r = run_migration(keys, engine, t)
    assert r.problems == {"no_tenant": [[2]]} and r.report.rewritten == 1
    v = verify(keys, engine, t)
    assert not v.clean and v.totals["no_tenant"] == 1


def test_mixed_read_during_migration_then_strict(
    legacy: sa.Engine, keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    before = comments(legacy)
    for tenant in ("1", "2", "3"):
        keys.ensure_key(tenant)
    mixed = legacy_app.consultations("mixed")
    # legacy values read as they are, and are counted
    keys.reset_stats()
    assert legacy_app.read_comment(legacy, mixed, 10) == before[10]
    assert keys.stats()["legacy_plaintext_reads"] == 1
    # new writes are sealed, even before the migration touched the row
    legacy_app.write_comment(legacy, mixed, 11, "Note écrite pendant la migration.")
    assert comments(legacy)[11].startswith(envelope.TEXT_PREFIX)
    assert legacy_app.read_comment(legacy, mixed, 11) == "Note écrite pendant la migration."

    assert cli(db_url, master_key_uri, "run", *TARGET, "--prefixed", "encrypt").exit_code == 0
    keys.reset_stats()
    for cid in (10, 11, 12):
        legacy_app.read_comment(legacy, mixed, cid)
    assert keys.stats()["legacy_plaintext_reads"] == 0
    assert cli(db_url, master_key_uri, "finish", *TARGET).exit_code == 0

    strict = legacy_app.consultations("strict")
    assert legacy_app.read_comment(legacy, strict, 11) == "Note écrite pendant la migration."
    assert legacy_app.read_comment(legacy, strict, 12) == before[12]
    # finish installed the strict database checks: the database itself now refuses
    # plaintext from a forgotten writer, and a value sealed for another practice.
    spec = checks_spec(resolve(legacy, "consultations", "comment", tenant="patients.practice_id"))
    assert spec.parent is not None and spec.mode == "v2" and spec.storage == "text"
    with legacy.connect() as conn:
        assert dbchecks.missing(conn, spec) == []
        assert dbchecks.mode_installed(conn, spec) == "v2"
    with pytest.raises(InvalidCiphertext), legacy.begin() as conn:
        conn.exec_driver_sql("UPDATE consultations SET comment = 'Patiente anxieuse' WHERE id = 12")
    # Where someone dropped them, a plaintext slipped in is still an error at read,
    # never returned, and so is a value that merely carries the prefix.
    with legacy.begin() as conn:
        dbchecks.drop(conn, [spec])
    with legacy.begin() as conn:
        conn.execute(
            sa.text("UPDATE consultations SET comment = 'Patiente anxieuse' WHERE id = 12")
        )
        conn.execute(sa.text("UPDATE consultations SET comment = 'carnet:AAAA' WHERE id = 13"))
    for cid in (12, 13):
        with pytest.raises(InvalidCiphertext) as ei:
            legacy_app.read_comment(legacy, strict, cid)
        assert "anxieuse" not in str(ei.value) and "AAAA" not in str(ei.value)
    res = cli(db_url, master_key_uri, "verify", *TARGET, "--json")
    assert res.exit_code == 9  # not complete
    v = json.loads(res.stdout)
    assert v["totals"]["plaintext"] == 1 and v["totals"]["prefixed_invalid"] == 1


def test_expand_contract_with_alembic(
    legacy: sa.Engine,
    keys: carnet.KeyManager,
    db_url: str,
    master_key_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from alembic import command
    from alembic.config import Config

    before = comments(legacy)
    monkeypatch.setenv("CARNET_DATABASE_URL", db_url)
    cfg = Config(str(EXAMPLES / "legacy_practice" / "alembic.ini"))
    command.upgrade(cfg, "0001_expand_comment")
    into = [*TARGET, "--into", "comment_enc"]
    res = cli(db_url, master_key_uri, "plan", *into, "--json")
    assert json.loads(res.stdout)["totals"]["prefixed_invalid"] == 1
    res = cli(db_url, master_key_uri, "run", *into, "--prefixed", "encrypt", "--json")
    assert res.exit_code == 0, res.output
    # the contract step refuses while the new column is not recorded strict
    with pytest.raises(ConfigurationError, match="not recorded as strict"):
        command.upgrade(cfg, "0002_contract_comment")
    res = cli(db_url, master_key_uri, "finish", *into)
    assert res.exit_code == 0, res.output
    assert "drops comment" in res.output
    command.upgrade(cfg, "0002_contract_comment")
    legacy.dispose()

    md = sa.MetaData()
    sa.Table(
        "patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.Integer),
    )
    t = sa.Table(
        "consultations",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.Integer, sa.ForeignKey("patients.id")),
        sa.Column("comment", carnet.EncryptedText()),
    )
    cols = {c["name"] for c in sa.inspect(legacy).get_columns("consultations")}
    assert "comment_enc" not in cols and "comment" in cols
    # finish installed the new column's checks; contract moved them to its final name.
    with legacy.connect() as conn:
        names = dbchecks.installed(conn, "consultations")
        assert any(n.startswith("carnet_f2_consultations_comment") for n in names), names
        assert not any("comment_enc" in n for n in names), names
        spec = dbchecks.column_spec(
            conn,
            "consultations",
            "comment",
            tenant_column="practice_id",
            parent_fk="patient_id=patients.id",
        )
        assert dbchecks.missing(conn, spec) == []
    for cid in (1, 2, 3, 50, 299):
        assert legacy_app.read_comment(legacy, t, cid) == before[cid]
    # verify still works on the contracted (binary) column
    res = cli(db_url, master_key_uri, "verify", *TARGET, "--json")
    assert res.exit_code == 0, res.output


def test_no_plaintext_in_any_output(
    legacy: sa.Engine, keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    canary = "CANARI-SORTIE-7731 dépression sévère"
    with legacy.begin() as conn:
        conn.execute(sa.text("UPDATE consultations SET comment = :c WHERE id = 5"), {"c": canary})
        conn.execute(
            sa.text("UPDATE consultations SET comment = :c WHERE id = 6"), {"c": "carnet:" + canary}
        )
    outputs = []
    for args in (
        ["plan", *TARGET],
        ["plan", *TARGET, "--json"],
        ["run", *TARGET],
        ["verify", *TARGET],
        ["finish", *TARGET, "--json"],
        ["run", *TARGET, "--prefixed", "encrypt", "--json"],
        ["verify", *TARGET],
        ["compact", "--table", "consultations", "--json"],
    ):
        res = cli(db_url, master_key_uri, *args)
        outputs.append(res.output)
    text = "\n".join(outputs)
    assert "CANARI" not in text and "7731" not in text
    assert "prefixed_invalid" in text


def test_a_table_without_a_declared_primary_key_migrates_through_finish_with_pk(
    engine: sa.Engine, keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    # A legacy table with no PRIMARY KEY, only a unique id: --pk names it, and
    # plan, run, verify and finish all page by it.
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE notes_nopk (id INTEGER NOT NULL UNIQUE, practice_id VARCHAR(20), "
                "comment TEXT)"
            )
        )
        conn.execute(
            sa.text("INSERT INTO notes_nopk (id, practice_id, comment) VALUES (:i, :p, :c)"),
            [{"i": i, "p": f"p{i % 2}", "c": f"note sans clé {i}"} for i in range(1, 41)],
        )
    target = [
        "--table",
        "notes_nopk",
        "--column",
        "comment",
        "--tenant",
        "notes_nopk.practice_id",
        "--pk",
        "id",
    ]
    res = cli(db_url, master_key_uri, "run", *target, "--batch-size", "7", "--json")
    assert res.exit_code == 0, res.output
    res = cli(db_url, master_key_uri, "finish", *target, "--json")
    assert res.exit_code == 0, res.output
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, practice_id, comment FROM notes_nopk")).all()
    assert len(rows) == 40
    for i, practice, value in rows:
        assert value.startswith(envelope.TEXT_PREFIX)
        blob = envelope.from_text(value)
        assert keys.decrypt(blob, tenant=practice, label="notes_nopk.comment").decode() == (
            f"note sans clé {i}"
        )


def _seal_v1(keys: carnet.KeyManager, text: str, *, tenant: str, label: str) -> str:
    """The v1 text form of ``text`` under ``tenant``'s active key, framed by hand
    (docs/format.md): carnet no longer writes v1."""
    import os

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from carnet.keystore import wrap_context

    rec = keys.ensure_key(tenant)
    assert rec.wrapped_key is not None
    dek = keys.master_key.unwrap(rec.wrapped_key, wrap_context(tenant, rec.key_id))
    nonce = os.urandom(12)
    aad = envelope.associated_data(rec.key_id, label, tenant, version=1)
    blob = b"\x01" + rec.key_id + nonce + AESGCM(dek).encrypt(nonce, text.encode(), aad)
    return envelope.to_text(blob)


def test_expand_copies_v1_sealed_values_as_v2(
    legacy: sa.Engine,
    keys: carnet.KeyManager,
    db_url: str,
    master_key_uri: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from alembic import command
    from alembic.config import Config

    with legacy.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT c.id, p.practice_id, c.comment FROM consultations c "
                "JOIN patients p ON p.id = c.patient_id WHERE c.id <= 6 ORDER BY c.id"
            )
        ).all()
    # Sealed before the UPDATE's transaction: SQLite's key table shares its lock.
    planted = {
        cid: (str(practice), text)
        for cid, practice, text in rows
        if text is not None and not text.startswith("carnet:")
    }
    v1 = {
        cid: _seal_v1(keys, text, tenant=practice, label="consultations.comment")
        for cid, (practice, text) in planted.items()
    }
    with legacy.begin() as conn:
        for cid, value in v1.items():
            conn.execute(
                sa.text("UPDATE consultations SET comment = :v WHERE id = :i"),
                {"v": value, "i": cid},
            )
    assert planted
    monkeypatch.setenv("CARNET_DATABASE_URL", db_url)
    command.upgrade(
        Config(str(EXAMPLES / "legacy_practice" / "alembic.ini")), "0001_expand_comment"
    )
    into = [*TARGET, "--into", "comment_enc"]
    res = cli(db_url, master_key_uri, "run", *into, "--prefixed", "encrypt", "--json")
    assert res.exit_code == 0, res.output
    with legacy.connect() as conn:
        got = dict(
            conn.execute(sa.text("SELECT id, comment_enc FROM consultations WHERE id <= 6")).all()
        )
    for cid, (practice, text) in planted.items():
        blob = envelope.from_text(got[cid]) if isinstance(got[cid], str) else bytes(got[cid])
        # Copied as carnet writes today: v2, naming the row's practice, same note.
        assert envelope.is_current(blob) and envelope.tenant_of(blob) == practice
        opened = keys.decrypt(blob, tenant=practice, label="consultations.comment")
        assert opened.decode() == text
