"""``carnet checks install / status / drop`` on every backend, as a subprocess.

A table made without its checks (as an older carnet, or a schema tool,
leaves it) gets them from ``install``; the mode follows the data; a bad row
makes ``install`` refuse with the count and the ``carnet verify`` pointer;
``drop`` asks first.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from carnet import dbchecks, envelope
from carnet.errors import TenantMismatch
from support.lifecycleutil import SECRET, fill_notes, notes_table, run_cli


def _spec(engine: sa.Engine, column: str = "body") -> dbchecks.ColumnSpec:
    table = notes_table(sa.MetaData())
    (spec,) = [s for s in dbchecks.specs_for(table, engine.dialect.name) if s.column == column]
    return spec


def _strip(engine: sa.Engine) -> None:
    """The notes table as a schema tool leaves it: no carnet check."""
    table = notes_table(sa.MetaData())
    with engine.begin() as conn:
        dbchecks.drop(conn, dbchecks.specs_for(table, engine.dialect.name))
        assert dbchecks.installed(conn, "notes") == set()


@pytest.fixture
def notes(db_url: str, master_key_uri: str) -> tuple[str, str, sa.Engine, carnet.KeyManager]:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, 9)
    _strip(engine)
    yield db_url, master_key_uri, engine, keys
    keys.close()
    engine.dispose()


def cli(url: str, mk: str, *args: str, input: str | None = None) -> tuple[int, str, str]:
    r = run_cli(list(args), db_url=url, master_key=mk, input=input)
    assert SECRET not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout, r.stderr


def test_install_by_table_then_status_then_drop(notes) -> None:  # type: ignore[no-untyped-def]
    url, mk, engine, _ = notes
    args = ["--table", "notes", "--column", "body", "--tenant-column", "practice_id"]
    code, out, err = cli(url, mk, "checks", "status", *args, "--json")
    assert code == 1, err
    rep = json.loads(out)
    assert rep["ok"] is False and rep["columns"][0]["missing"]
    assert "carnet checks install --table notes --column body" in rep["columns"][0]["fix"]

    code, out, err = cli(url, mk, "checks", "install", *args, "--json")
    assert code == 0, err
    (row,) = json.loads(out)["installed"]
    assert row["mode"] == "v2" and row["census"]["v2"] == 9
    with engine.connect() as conn:
        assert dbchecks.missing(conn, _spec(engine)) == []
        assert dbchecks.mode_installed(conn, _spec(engine)) == "v2"
    code, out, err = cli(url, mk, "checks", "status", *args)
    assert code == 0, out + err
    assert "notes.body: ok, mode v2" in out

    # The database now refuses a value sealed for another practice, from any client.
    other = _other_practice_value(engine)
    with engine.connect() as conn, pytest.raises((sa.exc.DBAPIError, TenantMismatch)):
        conn.exec_driver_sql(f"UPDATE notes SET body = {_ph(engine)} WHERE id = 0", (other,))

    code, out, err = cli(url, mk, "checks", "drop", *args, input="n\n")
    assert code == 6, err
    with engine.connect() as conn:
        assert dbchecks.missing(conn, _spec(engine)) == []
    code, out, err = cli(url, mk, "checks", "drop", *args, "--yes", "--json")
    assert code == 0, err
    assert json.loads(out) == {"dropped": [{"column": "body", "table": "notes"}]}
    with engine.connect() as conn:
        assert dbchecks.missing(conn, _spec(engine)) != []


def _ph(engine: sa.Engine) -> str:
    return "?" if engine.dialect.name == "sqlite" else "%s"


def _other_practice_value(engine: sa.Engine) -> bytes:
    with engine.connect() as conn:
        return bytes(conn.exec_driver_sql("SELECT body FROM notes WHERE id = 1").scalar_one())


def test_install_with_app_covers_every_declared_column(notes, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, mk, engine, _ = notes
    app = tmp_path / "checks_app_models.py"
    app.write_text(
        "import sqlalchemy as sa\n"
        "from support.lifecycleutil import notes_table\n"
        "metadata = sa.MetaData()\n"
        "notes_table(metadata)\n"
    )
    r = run_cli(
        ["checks", "install", "--app", "checks_app_models:metadata", "--json"],
        db_url=url,
        master_key=mk,
        extra_env={"PYTHONPATH": _pythonpath(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    got = {(x["column"], x["mode"]) for x in json.loads(r.stdout)["installed"]}
    assert got == {("body", "v2"), ("summary", "v2")}
    with engine.connect() as conn:
        for col in ("body", "summary"):
            assert dbchecks.missing(conn, _spec(engine, col)) == []


def _pythonpath(extra: Path) -> str:
    import os

    from support.paths import ROOT

    return os.pathsep.join([str(extra), str(ROOT / "src"), str(ROOT / "tests")])


def test_mode_follows_the_data(notes) -> None:  # type: ignore[no-untyped-def]
    url, mk, engine, keys = notes
    # One v1 value (as an older carnet sealed it): v1 mode, and the hint to reencrypt.
    v1 = _v1_value(keys)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET summary = :v WHERE id = 3"), {"v": v1})
    args = ["--table", "notes", "--column", "summary", "--tenant-column", "practice_id"]
    code, out, err = cli(url, mk, "checks", "install", *args)
    assert code == 0, err
    assert "mode v1" in out and "carnet reencrypt --table notes --column summary" in out
    with engine.connect() as conn:
        assert dbchecks.mode_installed(conn, _spec(engine, "summary")) == "v1"
    # v1 while every value is v2 again: status says the mode is weaker than the data allows.
    fresh = envelope.to_text(keys.encrypt(b"x", tenant="p0", label="notes.summary"))
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET summary = :v WHERE id = 3"), {"v": fresh})
    code, out, err = cli(url, mk, "checks", "status", *args)
    assert code == 1 and "mode v1 while the data allows v2" in out, out
    assert "--mode v2" in out

    # Plaintext on a column that is not mixed-read: refused, with the count and verify.
    with engine.begin() as conn:
        dbchecks.drop(conn, [_spec(engine, "summary")])
        conn.execute(sa.text("UPDATE notes SET summary = 'plain words' WHERE id = 4"))
    code, out, err = cli(url, mk, "checks", "install", *args)
    assert code == 2, err
    assert "1 row(s)" in err and "carnet verify --table notes --column summary" in err
    # The same column in a migration's mixed-read phase: mixed mode.
    code, out, err = cli(url, mk, "checks", "install", *args, "--mixed-read")
    assert code == 0, err
    assert "mode mixed" in out
    with engine.connect() as conn:
        assert dbchecks.mode_installed(conn, _spec(engine, "summary")) == "mixed"


def _v1_value(keys: carnet.KeyManager) -> str:
    """A v1 text value: the v2 one reframed as v1 would be (what the format check looks at)."""
    v2 = keys.encrypt(b"x" * 40, tenant="p0", label="notes.summary")
    body = v2[1 + envelope.KEY_ID_SIZE + 2 + len(b"p0") :]
    import base64

    v1 = bytes([1]) + v2[1 : 1 + envelope.KEY_ID_SIZE] + body
    return "carnet:" + base64.b64encode(v1).decode()


def test_install_refuses_a_value_of_another_practice(notes) -> None:  # type: ignore[no-untyped-def]
    url, mk, engine, _ = notes
    other = _other_practice_value(engine)  # sealed for p1
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE notes SET body = :v WHERE id = 0"), {"v": other})
    args = ["--table", "notes", "--column", "body", "--tenant-column", "practice_id"]
    code, out, err = cli(url, mk, "checks", "install", *args)
    assert code == 2
    assert "1 row(s)" in err and "--tenant-column practice_id" in err
    with engine.connect() as conn:
        assert dbchecks.installed(conn, "notes") == set()


def test_usage_errors(notes) -> None:  # type: ignore[no-untyped-def]
    url, mk, _, _ = notes
    code, _, err = cli(url, mk, "checks", "install")
    assert code == 2 and "--app" in err
    code, _, err = cli(url, mk, "checks", "install", "--table", "notes")
    assert code == 2
    code, out, err = cli(url, mk, "checks", "install", "--table", "nope", "--column", "x", "--json")
    assert code == 2 and json.loads(out)["error"]["code"] == 2


def test_reencrypt_tightens_v1_checks_once_no_v1_value_is_left(notes) -> None:  # type: ignore[no-untyped-def]
    url, mk, engine, keys = notes
    spec = _spec(engine, "summary")
    fake_v1 = _v1_value(keys)  # framed as v1: what the format check looks at
    with engine.begin() as conn:
        dbchecks.install(conn, [replace(spec, mode="v1")])
        conn.execute(sa.text("UPDATE notes SET summary = :v WHERE id = 3"), {"v": fake_v1})
        # A v1 value left: tighten refuses.
        assert dbchecks.tighten(conn, "notes", "summary") is False
        assert dbchecks.mode_installed(conn, spec) == "v1"
        conn.execute(sa.text("UPDATE notes SET summary = NULL WHERE id = 3"))
    # The whole pass of `carnet reencrypt`, every value v2: the check becomes f2.
    code, out, err = cli(url, mk, "reencrypt", "--table", "notes", "--column", "summary")
    assert code == 0, err
    with engine.connect() as conn:
        assert dbchecks.mode_installed(conn, spec) == "v2"
        assert dbchecks.missing(conn, spec) == []
    # and a v1 value is now refused by the database.
    with pytest.raises((sa.exc.DBAPIError, carnet.errors.InvalidCiphertext)), engine.begin() as c:
        c.exec_driver_sql(f"UPDATE notes SET summary = {_ph(engine)} WHERE id = 4", (fake_v1,))
