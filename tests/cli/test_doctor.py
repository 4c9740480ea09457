"""`carnet doctor`: each finding, its fix and its exit code, as a subprocess on every backend."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import carnet
from support.lifecycleutil import SECRET, fill_notes, notes_table, run_cli


def doctor(
    url: str, mk: str | None, *args: str, env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    r = run_cli(["doctor", "--json", *args], db_url=url, master_key=mk, extra_env=env)
    assert SECRET not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    text = run_cli(["doctor", *args], db_url=url, master_key=mk, extra_env=env)
    assert text.returncode == r.returncode
    assert SECRET not in text.stdout + text.stderr
    return r.returncode, json.loads(r.stdout), text.stdout


def by_name(rep: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [c for c in rep["checks"] if c["name"] == name]


@pytest.fixture
def deployed(db_url: str, master_key_uri: str) -> tuple[str, str]:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, 30)
    keys.close()
    engine.dispose()
    assert run_cli(["init"], db_url=db_url, master_key=master_key_uri).returncode == 0
    return db_url, master_key_uri


def test_healthy_deployment(deployed: tuple[str, str]) -> None:
    url, mk = deployed
    code, rep, text = doctor(url, mk)
    assert code == 0, text
    names = [c["name"] for c in rep["checks"]]
    assert names[:3] == ["database", "carnet_tables", "master_key"]
    assert all(c["status"] != "fail" for c in rep["checks"])
    cols = {c["details"]["column"] for c in by_name(rep, "encrypted_columns")}
    assert cols == {"body", "summary"}
    assert by_name(rep, "master_key")[0]["details"] == {"tried": 3, "total": 3}
    assert ("sqlite_journal" in names) == url.startswith("sqlite")
    assert "0 problems" in text


def test_no_carnet_tables_says_run_init(db_url: str, master_key_uri: str) -> None:
    code, rep, text = doctor(db_url, master_key_uri)
    assert code == 2
    assert rep["stopped_after"] == "carnet_tables"
    assert "fix: run carnet init" in text


def test_unreachable_database_and_missing_driver(tmp_path: Path, master_key_uri: str) -> None:
    code, rep, _ = doctor("postgresql+psycopg://u@127.0.0.1:1/x", master_key_uri)
    assert code == 4 and rep["checks"][0]["status"] == "fail"
    code, rep, text = doctor("mssql+pyodbc://u@127.0.0.1/x", master_key_uri)
    assert code == 2 and "not installed" in text


def test_master_key_findings(deployed: tuple[str, str], tmp_path: Path) -> None:
    url, mk = deployed
    # Rotated: the old master key, given as previous, no longer wraps anything.
    new = "file://" + str(tmp_path / "m2.key")
    assert run_cli(["master", "new", new], db_url=url).returncode == 0
    assert run_cli(["master", "rotate", "--to", new], db_url=url, master_key=mk).returncode == 0
    code, rep, text = doctor(url, new, env={"CARNET_PREVIOUS_MASTER_KEYS": mk})
    assert code == 0, text
    prev = by_name(rep, "previous_master_keys")[0]
    assert prev["details"] == {"uri": mk, "keys": 0}
    assert "keep it until no backup you may restore predates this rotation" in prev["message"]
    # The old master key configured alone: the keys it no longer wraps fail.
    code, rep, text = doctor(url, mk)
    assert code == 3 and f"under {new}" in text
    # The configured key file is gone: name the key that wraps the data keys,
    # never advise creating a new one.
    Path(new[len("file://") :]).unlink()
    code, rep, text = doctor(url, new)
    assert code == 3
    assert "carnet master new" not in text and f"3 under {new}" in text


def test_all_unwraps_every_key(deployed: tuple[str, str]) -> None:
    url, mk = deployed
    for p in range(8):
        assert (
            run_cli(
                ["keys", "rotate", "--tenant", f"x{p}", "--create"], db_url=url, master_key=mk
            ).returncode
            == 0
        )
    _, rep, _ = doctor(url, mk)
    assert by_name(rep, "master_key")[0]["details"] == {"tried": 5, "total": 11}
    _, rep, _ = doctor(url, mk, "--all")
    assert by_name(rep, "master_key")[0]["details"] == {"tried": 11, "total": 11}


def test_plaintext_left_is_reported(deployed: tuple[str, str]) -> None:
    url, mk = deployed
    engine = sa.create_engine(url)
    # A column in a migration's mixed-read phase: recorded running by `carnet migrate`,
    # its format check in mode "mixed" (legacy plaintext accepted until finish).
    _mixed_read_phase(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET summary = 'reste en clair' WHERE id < 4"))
    engine.dispose()
    code, rep, text = doctor(url, mk)
    assert code == 0
    summary = [c for c in by_name(rep, "encrypted_columns") if c["details"]["column"] == "summary"]
    assert summary[0]["status"] == "warn" and summary[0]["details"]["plaintext"] == 4
    assert "carnet migrate run --table notes --column summary" in text
    assert "reste en clair" not in text + json.dumps(rep)


def _mixed_read_phase(engine: sa.Engine) -> None:
    from carnet import dbchecks
    from carnet.migrate import state

    state.record(
        engine,
        {
            "table": "notes",
            "column": "summary",
            "source": "summary",
            "mode": "in-place",
            "label": "notes.summary",
            "tenant": "notes.practice_id",
        },
        state.RUNNING,
    )
    spec = dbchecks.ColumnSpec("notes", None, "summary", "text")
    with engine.begin() as conn:
        dbchecks.set_format_mode(conn, spec, "mixed")


APP = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
import carnet

engine = sa.create_engine({url!r}, echo={echo!r})


@sa.event.listens_for(engine, "connect")
def _pragmas(dbapi_conn, record):
    if engine.dialect.name == "sqlite":
        dbapi_conn.execute("PRAGMA secure_delete={secure}")


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    summary: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text"))


class Letter(Base):
    __tablename__ = "letters"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    text: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
"""


def _app(tmp_path: Path, name: str, url: str, echo: Any, secure: str) -> dict[str, str]:
    (tmp_path / f"{name}.py").write_text(APP.format(url=url, echo=echo, secure=secure))
    return {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_app_declared_columns_and_engine_settings(
    deployed: tuple[str, str], tmp_path: Path
) -> None:
    url, mk = deployed
    env = _app(tmp_path, "clinic_debug", url, "debug", "OFF")
    code, rep, text = doctor(url, mk, "--app", "clinic_debug:Base", env=env)
    # letters.text is declared but absent: the first failure, a configuration error.
    assert code == 2, text
    assert by_name(rep, "declared_columns")[0]["details"]["missing"] == ["letters.text"]
    engine_checks = by_name(rep, "app_engine")
    assert any(c["status"] == "fail" and "echo='debug'" in c["message"] for c in engine_checks)
    if url.startswith("sqlite"):
        assert any("secure_delete off" in c["message"] for c in engine_checks)
    # Create the table (with its database checks, as create_all makes them), quiet
    # the engine: the declared empty column is found.
    engine = sa.create_engine(url)
    md = sa.MetaData()
    sa.Table(
        "letters",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("text", carnet.EncryptedText(tenant="practice_id")),
    )
    md.create_all(engine)
    engine.dispose()
    env = _app(tmp_path, "clinic_quiet", url, False, "ON")
    code, rep, text = doctor(url, mk, "--app", "clinic_quiet:Base", env=env)
    assert code == 0, text
    cols = {
        c["details"]["table"] + "." + c["details"]["column"]
        for c in by_name(rep, "encrypted_columns")
    }
    assert cols == {"notes.body", "notes.summary", "letters.text"}
    code, rep, text = doctor(url, mk, "--app", "nowhere:Base", env=env)
    assert code == 2 and "cannot import" in text


# -- the database's own checks -------------------------------------------------------------


def _drop_by_hand(url: str, name: str, how: str = "drop") -> None:
    """What a user with DDL rights can do, through the database, not through carnet."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            d = engine.dialect.name
            if how == "disable":
                conn.exec_driver_sql(f"ALTER TABLE notes DISABLE TRIGGER {name}")
            elif how == "not_valid":
                conn.exec_driver_sql(f"ALTER TABLE notes DROP CONSTRAINT {name}")
                conn.exec_driver_sql(
                    f"ALTER TABLE notes ADD CONSTRAINT {name} CHECK (body IS NOT NULL) NOT VALID"
                )
            elif d == "sqlite":
                conn.exec_driver_sql(f"DROP TRIGGER {name}_i")
                conn.exec_driver_sql(f"DROP TRIGGER {name}_u")
            else:
                conn.exec_driver_sql(f"ALTER TABLE notes DROP CONSTRAINT {name}")
    finally:
        engine.dispose()


def _run_fix(url: str, mk: str, fix: str) -> None:
    assert fix.startswith("carnet checks install ")
    r = run_cli(fix.split()[1:], db_url=url, master_key=mk)
    assert r.returncode == 0, r.stderr


def test_a_dropped_check_fails_with_the_command_that_restores_it(deployed: tuple[str, str]) -> None:
    url, mk = deployed
    code, rep, _ = doctor(url, mk)
    assert code == 0
    found = by_name(rep, "database_checks")
    assert {c["details"]["column"] for c in found} == {"body", "summary"}
    assert all(c["status"] == "ok" for c in found)

    _drop_by_hand(url, "carnet_f2_notes_body")
    code, rep, text = doctor(url, mk)
    assert code == 2, text
    (bad,) = [c for c in by_name(rep, "database_checks") if c["status"] == "fail"]
    assert "notes.body" in bad["message"] and "carnet_f2_notes_body" in bad["message"]
    assert bad["fix"] == "carnet checks install --table notes --column body --mode v2"
    assert "fix: carnet checks install --table notes --column body" in text
    assert rep["error"]["kind"] == "CheckFailed"

    _run_fix(url, mk, bad["fix"])
    code, rep, text = doctor(url, mk)
    assert code == 0, text
    assert all(c["status"] == "ok" for c in by_name(rep, "database_checks"))


@pytest.mark.parametrize("how", ["disable", "not_valid"])
def test_postgresql_disabled_trigger_and_not_valid_constraint(
    deployed: tuple[str, str], how: str
) -> None:
    url, mk = deployed
    if not url.startswith("postgresql"):
        pytest.skip("PostgreSQL's DISABLE TRIGGER and NOT VALID")
    # The key check is a trigger (it reads carnet_keys); the format check a constraint.
    name = "carnet_k_notes_body" if how == "disable" else "carnet_f2_notes_body"
    _drop_by_hand(url, name, how)
    if how == "disable":
        # The key check is known with the practice column: verify names it (as
        # doctor --app does).
        args = ["verify", "--table", "notes", "--column", "body"]
        args += ["--tenant-column", "practice_id", "--json"]
        r = run_cli(args, db_url=url, master_key=mk)
        assert r.returncode == 1, r.stdout + r.stderr
        chk = json.loads(r.stdout)["checks"]
        assert chk["disabled"] == [name] and not chk["ok"]
        _run_fix(url, mk, chk["fix"])
        r = run_cli(args, db_url=url, master_key=mk)
        assert r.returncode == 0, r.stdout + r.stderr
        return
    code, rep, text = doctor(url, mk)
    assert code == 2, text
    (bad,) = [c for c in by_name(rep, "database_checks") if c["status"] == "fail"]
    assert f"disabled or NOT VALID: {name}" in bad["message"]
    _run_fix(url, mk, bad["fix"])
    code, rep, text = doctor(url, mk)
    assert code == 0, text


def test_v1_checks_while_every_value_is_v2_is_a_failure(deployed: tuple[str, str]) -> None:
    from dataclasses import replace

    from carnet import dbchecks

    url, mk = deployed
    engine = sa.create_engine(url)
    try:
        (spec,) = [
            s
            for s in dbchecks.specs_for(notes_table(sa.MetaData()), engine.dialect.name)
            if s.column == "summary"
        ]
        with engine.begin() as conn:
            dbchecks.set_format_mode(conn, spec, "v1")
    finally:
        engine.dispose()
    code, rep, text = doctor(url, mk)
    assert code == 2, text
    (bad,) = [c for c in by_name(rep, "database_checks") if c["status"] == "fail"]
    assert "mode v1 while its data allows v2" in bad["message"]
    assert bad["fix"].endswith("--mode v2")
    _run_fix(url, mk, bad["fix"])
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert dbchecks.mode_installed(conn, spec) == "v2"
            assert dbchecks.missing(conn, replace(spec, mode="v2")) == []
    finally:
        engine.dispose()
    assert doctor(url, mk)[0] == 0


def test_a_rotation_rolled_back_in_the_key_table_fails(deployed: tuple[str, str]) -> None:
    url, mk = deployed
    code, rep, _ = doctor(url, mk)
    assert code == 0
    assert [c["status"] for c in by_name(rep, "key_table")] == ["ok"]
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=mk)
    tenant = keys.store.tenants()[0]
    keys.rotate(tenant)
    t = keys.store.table
    with engine.begin() as conn:
        # Back to version 1: the newest key made inactive, the old one active again.
        conn.execute(
            t.update()
            .where(t.c.tenant == tenant, t.c.version == 2)
            .values(state="inactive", active_tenant=None)
        )
        conn.execute(
            t.update()
            .where(t.c.tenant == tenant, t.c.version == 1)
            .values(state="active", active_tenant=tenant)
        )
    keys.close()
    engine.dispose()
    code, rep, text = doctor(url, mk)
    assert code == 1, text
    found = by_name(rep, "key_table")
    assert [c["status"] for c in found] == ["fail"], found
    assert "rolled back" in found[0]["message"] and repr(tenant) in found[0]["message"]
    assert found[0]["details"] == {"tenant": tenant}
    assert f"carnet keys list --tenant {tenant}" in found[0]["fix"]
    assert f"carnet keys rotate --tenant {tenant}" in found[0]["fix"]
    assert "[FAIL] key_table:" in text and "fix: inspect the keys: carnet keys list" in text


def test_a_retired_key_given_back_a_state_fails_with_the_keys_list_fix(
    deployed: tuple[str, str],
) -> None:
    url, mk = deployed
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=mk)
    tenant = keys.store.tenants()[0]
    first = next(r for r in keys.iter_keys() if r.tenant == tenant and r.version == 1)
    keys.rotate(tenant)
    keys.retire(first.key_id)
    t = keys.store.table
    with engine.begin() as conn:
        conn.execute(t.update().where(t.c.key_id == first.key_id.hex()).values(state="inactive"))
    keys.close()
    engine.dispose()
    code, rep, text = doctor(url, mk)
    assert code == 1, text
    found = by_name(rep, "key_table")
    assert [c["status"] for c in found] == ["fail"], found
    assert "no key material" in found[0]["message"]
    assert found[0]["fix"] == f"inspect the keys: carnet keys list --tenant {tenant}"
