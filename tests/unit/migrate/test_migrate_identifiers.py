"""The example's patients' identifiers (names, phones, birth dates) migrated online.

On each backend, the legacy example goes through its identifier branch:
expand (Alembic 0003), ``carnet migrate run --into ... --index ...`` column by
column, ``verify`` / ``finish --index``, contract (0004), ``compact``. Lookups
by phone, by name and by birth date are checked at every stage: before any
row is migrated (clear legacy columns only), half-way (some sealed, not yet
indexed), after, and after the contract. The application writes and edits
patients during the migration. At the end the raw files (SQLite file and WAL;
PostgreSQL heap and TOAST of ``patients``; the InnoDB ``.ibd`` file) hold no
patient's name, phone number or birth date.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

import carnet
from carnet.cli import cli as carnet_cli
from carnet.migrate import compact, resolve, run_migration
from support.identifiers import (
    IDENTIFIERS,
    STEPS,
    M,
    alembic_upgrade,
    index_args,
    legacy_app,
    legacy_rows,
    migrate,
    populate,
    target_args,
)
from support.paths import ROOT


def check_lookups(engine: sa.Engine, model: type[Any], expected: dict[int, Any]) -> int:
    """Every patient found by phone (spelt otherwise), by name (other case), by birth date."""
    checks = 0
    with Session(engine) as s:
        for pid, (practice, last, first, birth, phone) in expected.items():
            if phone is not None:
                digits = phone.replace(" ", "")
                got = legacy_app.find_patients(s, model, "phone_bidx", digits, practice)
                assert pid in {p.id for p in got}, (pid, "phone")
                assert all(legacy_app.identifiers(p)[3] is not None for p in got)
            got = legacy_app.find_patients(
                s, model, "name_bidx", (first.lower(), last.upper()), practice
            )
            assert pid in {p.id for p in got}, (pid, "name")
            got = legacy_app.find_patients(s, model, "birth_date_bidx", birth, practice)
            assert pid in {p.id for p in got}, (pid, "birth date")
            # Exact: no other practice's rows, no hash collision let through.
            assert all(str(p.practice_id) == practice for p in got)
            assert all(legacy_app.identifiers(p)[2] == birth for p in got)
            checks += 3
    return checks


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """No models: the legacy application's tables are made by each test."""
    return ()


def test_identifiers_migrate_online_and_stay_findable(
    engine: sa.Engine, db_url: str, db_kind: str, master_key_uri: str, keys: Any
) -> None:
    if db_kind == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    populate(engine, seed=7, practices_n=3, patients_n=40, consultations_n=60, lookalike=False)
    expected = legacy_rows(engine)
    alembic_upgrade(db_url, "0003_expand_identifiers")
    Migrating = legacy_app.patient_model("migrating")  # noqa: N806 - a class

    # Before any row is sealed: every lookup answers from the clear columns.
    assert check_lookups(engine, Migrating, expected) > 0

    # The application, deployed in its migrating phase, edits and adds patients.
    with Session(engine) as s:
        p5 = s.get(Migrating, 5)
        p5.phone_enc, p5.phone = "01 99 00 77 66", None
        s.add(
            Migrating(
                id=1001, practice_id=2, last_name_enc="Ménard", first_name_enc="Zoé",
                birth_date_enc=dt.date(1990, 7, 14), phone_enc="06 39 98 55 44",
            )
        )  # fmt: skip
        s.commit()
    expected[5] = (*expected[5][:4], "01 99 00 77 66")
    expected[1001] = ("2", "Ménard", "Zoé", dt.date(1990, 7, 14), "06 39 98 55 44")

    # Half-way: phones sealed (and indexed), the rest still clear.
    legacy, new, index = STEPS[0]
    res = migrate(db_url, master_key_uri, "run", *target_args(legacy, new), "--batch-size",
                  "7", "--json", *index_args(index))  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    # Patient 5 was written by the application: its sealed value was kept.
    assert out["scanned"] == 41 and out["conflicts"] == 0
    assert out["indexes"][0]["missing"] == 0
    assert check_lookups(engine, Migrating, expected) > 0

    # A column sealed but not yet indexed is still found through its sealed value.
    legacy, new, index = STEPS[1]
    res = migrate(db_url, master_key_uri, "run", *target_args(legacy, new), "--batch-size", "9")
    assert res.exit_code == 0, res.output
    assert check_lookups(engine, Migrating, expected) > 0
    # finish refuses a column whose blind index is not complete yet.
    legacy, new, index = STEPS[2]
    res = migrate(db_url, master_key_uri, "run", *target_args(legacy, new))
    assert res.exit_code == 0, res.output
    res = migrate(db_url, master_key_uri, "finish", *target_args(legacy, new), "--json",
                  *index_args(index))  # fmt: skip
    assert res.exit_code == 9, res.output  # not complete
    assert json.loads(res.stdout)["indexes_missing"][f"{M}.name_bidx"] == 40
    assert check_lookups(engine, Migrating, expected) > 0

    for legacy, new, index in STEPS:
        res = migrate(db_url, master_key_uri, "run", *target_args(legacy, new), "--json",
                      *index_args(index))  # fmt: skip
        assert res.exit_code == 0, res.output
        res = migrate(db_url, master_key_uri, "finish", *target_args(legacy, new), "--json",
                      *index_args(index))  # fmt: skip
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["totals"]["plaintext"] == 0

    # Every row is indexed: the lookup without the fallback finds everyone.
    with Session(engine) as s:
        for pid, (practice, _last, _first, _birth, phone) in expected.items():
            if phone is not None:
                got = carnet.search(s, Migrating.phone_bidx, phone, tenant=practice)
                assert [p.id for p in got] == [pid] or pid in {p.id for p in got}

    # The comments too, so that no clear column of the example holds identifiers.
    comment = resolve(engine, "consultations", "comment", tenant="patients.practice_id")
    assert run_migration(keys, engine, comment, prefixed="encrypt").complete

    alembic_upgrade(db_url, "0004_contract_identifiers")
    Patient = legacy_app.patient_model("encrypted")  # noqa: N806 - a class
    cols = {c["name"] for c in sa.inspect(engine).get_columns("patients")}
    assert not any(c.endswith("_enc") for c in cols)
    assert check_lookups(engine, Patient, expected) > 0
    with Session(engine) as s:
        for pid, (practice, last, first, birth, phone) in expected.items():
            p = s.get(Patient, pid)
            assert (str(p.practice_id), p.last_name, p.first_name, p.birth_date, p.phone) == (
                practice, last, first, birth, phone
            )  # fmt: skip

    engine.dispose()
    if db_kind == "postgresql":
        compact(engine, "patients", full=True)
        compact(engine, "consultations", full=True)
    else:
        compact(engine, "patients")
        compact(engine, "consultations")
    engine.dispose()
    files = raw_files(engine, db_kind, db_url)
    probes = identifier_probes(engine, db_kind, expected)
    # Every patient is looked for, and most of their names too.
    assert {pid for ids in probes.values() for pid in ids} == set(expected)
    names = {v[1] for v in expected.values()} | {v[2] for v in expected.values()}
    probed = {p.decode("utf-8", "replace") for p in probes}
    assert len(names & probed) >= 0.75 * len(names)
    found = {p: ids for p, ids in probes.items() if any(p in f.read_bytes() for f in files)}
    assert found == {}, f"{len(found)} identifier value(s) in the raw files"
    # A scan that reads nothing cannot pass: it sees carnet's ciphertext headers.
    key_ids = [r.key_id for r in keys.list_keys() if r.kind == "data"]
    assert any(k in f.read_bytes() for f in files for k in key_ids)


# -- the raw-file scan -----------------------------------------------------------------------


def raw_files(engine: sa.Engine, db_kind: str, db_url: str) -> list[Path]:
    if db_kind == "sqlite":
        path = Path(sa.make_url(db_url).database or "")
        return [p for p in (path, Path(f"{path}-wal"), Path(f"{path}-journal")) if p.exists()]
    if db_kind == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("CHECKPOINT"))  # so that the pages reach the files
            ddir = Path(conn.execute(sa.text("SELECT current_setting('data_directory')")).scalar())
            rels = conn.execute(
                sa.text(
                    "SELECT pg_relation_filepath(c.oid), pg_relation_filepath(c.reltoastrelid) "
                    "FROM pg_class c WHERE c.oid = 'patients'::regclass"
                )
            ).one()
        files = [ddir / r for r in rels if r]
        if not all(f.exists() for f in files):
            pytest.skip("PostgreSQL's data directory is not readable from the test process")
        return files
    with engine.connect() as conn:
        datadir = Path(conn.execute(sa.text("SELECT @@datadir")).scalar_one())
        db = conn.execute(sa.text("SELECT DATABASE()")).scalar_one()
        conn.execute(sa.text("FLUSH TABLES patients FOR EXPORT"))  # pages to the .ibd file
        conn.execute(sa.text("UNLOCK TABLES"))
    ibd = datadir / db / "patients.ibd"
    if not ibd.exists():
        pytest.skip("the .ibd file is not readable (innodb_file_per_table off or no access)")
    return [ibd]


def clear_text(engine: sa.Engine) -> str:
    """What the example keeps in clear (practices' names and cities, reasons, carnet's tables).

    The identifier columns themselves are not part of it: they are what is
    looked for (clear before the migration, gone after the contract).
    """
    parts: list[str] = []
    with engine.connect() as conn:
        for table in sa.inspect(conn).get_table_names():
            for row in conn.execute(sa.text(f"SELECT * FROM {table}")):  # noqa: S608 - reflected
                parts.extend(
                    v for k, v in row._mapping.items()
                    if isinstance(v, str) and not (table == "patients" and k in IDENTIFIERS)
                )  # fmt: skip
        if engine.dialect.name == "sqlite":
            parts.extend(
                str(r[0]) for r in conn.exec_driver_sql("SELECT sql FROM sqlite_master") if r[0]
            )
    return "\n".join(parts)


def identifier_probes(
    engine: sa.Engine, db_kind: str, expected: dict[int, Any]
) -> dict[bytes, list[int]]:
    """Each value's stored encodings: text, and the backend's binary date where it is distinctive.

    A value that also sits in a clear column (a practice named after a
    family, "Cabinet médical Martin") proves nothing and is left out; so are
    values under 4 bytes, which random ciphertext would match by chance.
    SQLite stores a DATE as its ISO text. MariaDB packs one in 3 bytes, which
    any page of a file this size holds by chance: not probed as binary there.
    """
    clear = clear_text(engine)
    probes: dict[bytes, list[int]] = {}

    def add(raw: bytes, pid: int, text: str | None = None) -> None:
        if (text is not None and text in clear) or len(raw) < 4:
            return
        probes.setdefault(raw, []).append(pid)

    for pid, (_practice, last, first, birth, phone) in expected.items():
        add(last.encode(), pid, last)
        add(first.encode(), pid, first)
        if phone is not None:
            add(phone.encode(), pid, phone)
            add(phone.replace(" ", "").encode(), pid, phone.replace(" ", ""))
        add(birth.isoformat().encode(), pid, birth.isoformat())
        if db_kind == "postgresql":
            # DATE: int32 days since 2000-01-01, little-endian on this machine's
            # pages. Small day numbers look like any small integer of a tuple
            # header or an id: only distinctive ones are probed.
            days = (birth - dt.date(2000, 1, 1)).days
            if abs(days) >= 1000:
                add(struct.pack("<i", days), pid)
    return probes


def test_a_planted_identifier_is_found_by_the_same_scan(
    engine: sa.Engine, db_url: str, db_kind: str
) -> None:
    # Positive control on a database that was never migrated.
    populate(engine, seed=7, practices_n=2, patients_n=10, consultations_n=0, lookalike=False)
    expected = legacy_rows(engine)
    engine.dispose()
    files = raw_files(engine, db_kind, db_url)
    probes = identifier_probes(engine, db_kind, expected)
    found = {p for p in probes if any(p in f.read_bytes() for f in files)}
    phones = {v[4].encode() for v in expected.values() if v[4] is not None}
    assert phones & set(probes) <= found and phones & found
    if db_kind != "mariadb":  # MariaDB stores DATE in 3 bytes: not probed as text
        dates = {v[3].isoformat().encode() for v in expected.values()} & set(probes)
        if db_kind == "postgresql":
            dates = {
                struct.pack("<i", (v[3] - dt.date(2000, 1, 1)).days) for v in expected.values()
            } & set(probes)
        assert dates and dates <= found


def test_migrate_refuses_a_date_column_in_place(
    engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    populate(engine, seed=7, practices_n=1, patients_n=3, consultations_n=0, lookalike=False)
    res = migrate(db_url, master_key_uri, "plan", "--table", "patients", "--column",
                  "birth_date", "--tenant", "practice_id")  # fmt: skip
    assert res.exit_code == 2  # a configuration error, as in every command
    assert res.stderr.startswith("carnet: error:")
    assert "DATE column" in res.output and "--into" in res.output


def documented_identifier_commands() -> list[str]:
    text = (ROOT / "docs" / "migration.md").read_text(encoding="utf-8")
    block = text.split("<!-- identifiers:start -->")[1].split("<!-- identifiers:end -->")[0]
    return [line[2:] for line in block.splitlines() if line.startswith("$ ")]


def test_documented_identifier_commands_run(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/migration.md's identifier commands, as written, on each backend."""
    import re
    import shlex

    from alembic import command
    from alembic.config import Config
    from legacy_practice import generate

    monkeypatch.chdir(ROOT)
    env = {"PWD": str(tmp_path)}
    for line in documented_identifier_commands():
        cmd, _, comment = line.partition("#")
        m = re.search(r"exits (\d+)", comment)
        expected = int(m.group(1)) if m else 0
        words = shlex.split(cmd)
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = db_url if name == "CARNET_DATABASE_URL" else value.replace(
                "$PWD", env["PWD"])  # fmt: skip
            continue
        words = [w.replace("$CARNET_MASTER_KEY", env.get("CARNET_MASTER_KEY", "")) for w in words]
        if words[0] == "alembic":
            assert words[1:3] == ["-c", "examples/legacy_practice/alembic.ini"]
            assert words[3] == "upgrade"
            monkeypatch.setenv("CARNET_DATABASE_URL", db_url)
            command.upgrade(Config(str(ROOT / words[2])), words[4])
            continue
        if words[0] == "python":
            group, args = generate.main, words[2:]
        else:
            assert words[0] == "carnet"
            group, args = carnet_cli, words[1:]
        res = CliRunner().invoke(group, args, env=env, catch_exceptions=False)
        assert res.exit_code == expected, f"{line}\n{res.output}"

    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=env["CARNET_MASTER_KEY"])
    carnet.configure(keys)
    try:
        Patient = legacy_app.patient_model("encrypted")  # noqa: N806 - a class
        cols = {c["name"] for c in sa.inspect(engine).get_columns("patients")}
        assert {"phone", "birth_date", "phone_bidx"} <= cols
        assert not any(c.endswith("_enc") for c in cols)
        with Session(engine) as s:
            patients = s.scalars(sa.select(Patient)).all()
            assert len(patients) == 40
            for p in patients:
                assert isinstance(p.birth_date, dt.date) and p.last_name
                got = legacy_app.find_patients(
                    s, Patient, "birth_date_bidx", p.birth_date.isoformat(), str(p.practice_id)
                )
                assert p.id in {q.id for q in got}
        with engine.connect() as conn:
            states = conn.execute(sa.text("SELECT column_name, state FROM carnet_migrations")).all()
        assert sorted(states) == [
            ("birth_date", "strict"), ("first_name", "strict"), ("last_name", "strict"),
            ("phone", "strict"),
        ]  # fmt: skip
    finally:
        carnet.configure(None)
        keys.close()
        engine.dispose()


def test_expand_into_a_text_column_and_values_that_would_not_fit(
    engine: sa.Engine, db_url: str, master_key_uri: str, keys: Any
) -> None:
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from carnet.migrate.alembic import add_encrypted_column

    md = sa.MetaData()
    people = sa.Table(
        "people", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(20)),
        sa.Column("phone", sa.String(20)),
    )  # fmt: skip
    md.create_all(engine)
    phones = {i: f"01 99 00 {i:02d} {i:02d}" for i in range(1, 8)}
    with engine.begin() as conn:
        conn.execute(people.insert(), [{"id": i, "practice_id": "p1", "phone": v}
                                       for i, v in phones.items()])  # fmt: skip
        ops = Operations(MigrationContext.configure(conn))
        add_encrypted_column(
            "people", "phone_txt", carnet.EncryptedString(20, storage="text"), op=ops
        )
        # Too narrow for any sealed phone: 100 characters, a 14-byte phone of
        # practice "p1" needs 103 (EncryptedString columns are sized for the
        # longest practice id, so a narrow column is a plain VARCHAR here).
        ops.add_column("people", sa.Column("phone_tiny", sa.String(100)))

    def cmd(*args: str) -> Any:
        return migrate(db_url, master_key_uri, *args, "--table", "people", "--column", "phone",
                       "--tenant", "practice_id", "--json")  # fmt: skip

    res = cmd("run", "--into", "phone_txt")
    assert res.exit_code == 0, res.output
    res = cmd("finish", "--into", "phone_txt")
    assert res.exit_code == 0, res.output
    sealed = sa.Table(
        "people", sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("phone_txt", carnet.EncryptedString(20, storage="text", label="people.phone")),
    )  # fmt: skip
    with engine.connect() as conn, carnet.tenant_scope("p1"):
        got = dict(conn.execute(sa.select(sealed.c.id, sealed.c.phone_txt)).all())
    assert got == phones
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT phone_txt FROM people")).scalars().all()
    assert all(v.startswith("carnet:") for v in raw)

    plan = json.loads(cmd("plan", "--into", "phone_tiny").stdout)
    assert plan["ciphertext_too_long"] == 7
    res = cmd("run", "--into", "phone_tiny")
    assert res.exit_code == 9  # not complete
    out = json.loads(res.stdout)
    assert sorted(out["problems"]["too_long"]) == [[i] for i in phones]
    for v in phones.values():
        assert v not in res.output and v.replace(" ", "") not in res.output
