"""The CLI in-process (CliRunner) and as a real subprocess: output, JSON, exit codes, no leaks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

import carnet
from carnet.cli import cli
from support.lifecycleutil import SECRET, fill_notes, run_cli


@pytest.fixture
def setup(db_url: str, master_key_uri: str) -> tuple[str, str]:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, 60)
    keys.close()
    engine.dispose()
    return db_url, master_key_uri


def _run(setup: tuple[str, str], *args: str, input: str | None = None):  # type: ignore[no-untyped-def]
    url, mk = setup
    res = CliRunner().invoke(
        cli, list(args), env={"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": mk}, input=input
    )
    assert SECRET not in res.output
    return res


def test_inprocess_lifecycle_and_exit_codes(setup: tuple[str, str], tmp_path: Path) -> None:
    r = _run(setup, "init")
    assert r.exit_code == 0, r.output
    r = _run(setup, "status", "--json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert {(c["table"], c["column"]) for c in st["columns"]} == {
        ("notes", "body"),
        ("notes", "summary"),
    }
    r = _run(setup, "keys", "list", "--json")
    old = [k["key_id"] for k in json.loads(r.stdout) if k["tenant"] == "p0"][0]
    assert _run(setup, "keys", "rotate", "--all").exit_code == 0
    r = _run(setup, "keys", "retire", old)
    assert r.exit_code == 5 and "notes.body" in r.output
    for col in ("body", "summary"):
        r = _run(setup, "reencrypt", "--table", "notes", "--column", col, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["rewritten"] == 60
    assert _run(setup, "keys", "retire", old).exit_code == 0
    r = _run(setup, "verify", "--table", "notes", "--column", "body", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] == 60
    # destroy: wrong confirmation aborts, right one shreds; verify then reports the
    # shredded rows as destroyed, not as failures (exit 0)
    r = _run(setup, "keys", "destroy", "--tenant", "p2", input="p1\n")
    assert r.exit_code == 6
    r = _run(setup, "keys", "destroy", "--tenant", "p2", input="p2\n")
    assert r.exit_code == 0, r.output
    r = _run(setup, "verify", "--table", "notes", "--column", "body", "--json")
    rep = json.loads(r.stdout)
    assert r.exit_code == 0, r.output
    assert (rep["destroyed"], rep["failed"], rep["reasons"]) == (20, 0, {})
    assert rep["practices"]["p2"] == {"ok": 0, "destroyed": 20, "failed": 0}


def test_bad_input_one_line_errors(setup: tuple[str, str], tmp_path: Path) -> None:
    url, mk = setup
    cases = [
        (["verify", "--table", "nope", "--column", "body"], {}, 2),
        (["verify", "--table", "notes", "--column", "nope"], {}, 2),
        (["verify", "--table", "notes", "--column", "practice_id"], {}, 2),
        (["keys", "retire", "xyz"], {}, 2),
        (["status"], {"CARNET_DATABASE_URL": "nonsense://"}, 2),
        (["status"], {"CARNET_MASTER_KEY": "file://" + str(tmp_path / "missing.key")}, 3),
        (["status"], {"CARNET_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:1/x"}, 4),
    ]
    other = "file://" + str(tmp_path / "other.key")
    carnet.create_master_key(other).close()
    cases.append((["status"], {"CARNET_MASTER_KEY": other}, 3))
    for args, env, code in cases:
        res = CliRunner().invoke(
            cli, args, env={"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": mk, **env}
        )
        assert res.exit_code == code, (args, env, res.output)
        assert "Traceback" not in res.output
        assert res.output.strip().count("\n") == 0, res.output
        assert SECRET not in res.output


def test_subprocess_reencrypt_verify_status(setup: tuple[str, str]) -> None:
    url, mk = setup
    assert run_cli(["keys", "rotate", "--tenant", "p1"], db_url=url, master_key=mk).returncode == 0
    r = run_cli(
        [
            "reencrypt",
            "--table",
            "notes",
            "--column",
            "body",
            "--workers",
            "2",
            "--batch-size",
            "7",
            "--json",
        ],
        db_url=url,
        master_key=mk,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rewritten"] == 20
    r = run_cli(["status", "--table", "notes", "--column", "body"], db_url=url, master_key=mk)
    assert r.returncode == 0 and "0 not on the active key" in r.stdout
    r = run_cli(["verify", "--table", "notes", "--column", "nope"], db_url=url, master_key=mk)
    assert r.returncode == 2 and r.stderr.startswith("carnet: error:")
    assert "Traceback" not in r.stderr
    for res in (r,):
        assert SECRET not in res.stdout + res.stderr
