"""One contract for every command: the same fault gives the same exit code, one error line.

The commands are enumerated from the click tree itself, so a command added
later is run through the same faults (and fails ``test_every_command_is_listed``
until it says how it is run). Each fault is real: no master key configured,
a master key file that does not exist, a database URL whose driver is not
installed, a database server that does not answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import carnet
from carnet.cli import cli
from carnet.exitcodes import (
    EXIT_ABORTED,
    EXIT_DATABASE,
    EXIT_INTERNAL,
    EXIT_MASTER_KEY,
    EXIT_USAGE,
)
from support.dbutil import drop_checks
from support.lifecycleutil import SECRET, fill_notes, notes_table, run_cli
from support.paths import EXAMPLES

TARGET = ["--table", "notes", "--column", "body"]

INDEX = "legacy_practice.app:MigratingPatient.phone_bidx"  # a real blind index
MIGRATE_TARGET = ["--table", "notes", "--column", "summary", "--tenant", "practice_id"]

# Minimal arguments of every leaf command, and whether it needs the master key.
# "{tmp}" is replaced by the test's temporary directory.
COMMANDS: dict[tuple[str, ...], tuple[list[str], bool]] = {
    ("init",): ([], True),
    ("master", "rotate"): (["--to", "file://{tmp}/new.key"], True),
    ("status",): ([], True),
    ("keys", "list"): ([], True),
    ("keys", "rotate"): (["--all"], True),
    ("keys", "retire"): (["00" * 16], True),
    ("keys", "destroy"): (["--tenant", "p0", "--yes"], True),
    ("keys", "reenable"): (["--tenant", "p0", "--yes"], True),
    ("reencrypt",): (TARGET, True),
    ("verify",): (TARGET, True),
    ("doctor",): ([], True),
    ("export",): (["--tenant", "p0", "--table", "notes", "--out", "{tmp}/p0.jsonl"], True),
    ("reindex",): (["--app-dir", str(EXAMPLES), "--index", INDEX, "--all-tenants"], True),
    ("migrate", "plan"): (MIGRATE_TARGET, True),
    ("migrate", "run"): (MIGRATE_TARGET, True),
    ("migrate", "verify"): (MIGRATE_TARGET, True),
    ("migrate", "finish"): (MIGRATE_TARGET, True),
    ("migrate", "compact"): (["--table", "notes"], False),
    ("migrate", "scaffold"): (
        [*MIGRATE_TARGET, "--into", "summary_enc", "--out", "{tmp}/scaffold"],
        False,
    ),
    ("checks", "install"): ([*TARGET, "--tenant-column", "practice_id"], False),
    ("checks", "status"): ([], False),
    ("checks", "drop"): ([*TARGET, "--yes"], False),
    ("audit", "report"): ([], False),
    ("audit", "verify"): ([], True),
    ("audit", "prune"): (["--before", "2000-01-01", "--yes"], True),
    ("decoys", "plant"): ([*TARGET, "--practice", "p0"], True),
    ("decoys", "list"): ([], False),
    ("decoys", "remove"): (["--all", "--yes"], False),
}

# Leaf commands outside the fault matrix, and why.
NOT_IN_MATRIX = {
    # Its own SQLite database and key in a temporary directory: it reads no
    # configuration, so none of these faults can reach it.
    ("demo",): "self-contained",
    # Takes a key URI to create and no database or configured master key: its
    # one fault (a key it cannot create) is test_master_new_missing_directory.
    ("master", "new"): "creates a key, reads no configuration",
}

MISSING_DRIVER = "postgresql+pg8000://carnet@127.0.0.1:1/x"
UNREACHABLE = "postgresql+psycopg://carnet@127.0.0.1:1/x"


def _leaves(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, cmd in sorted(group.commands.items()):
        if isinstance(cmd, click.Group):
            yield from _leaves(cmd, (*path, name))
        else:
            yield (*path, name)


LEAVES = list(_leaves(cli))


def _has_json(path: tuple[str, ...]) -> bool:
    cmd: Any = cli
    for name in path:
        cmd = cmd.commands[name]
    return any(p.name == "as_json" for p in cmd.params)


def test_every_command_is_listed() -> None:
    assert set(LEAVES) == set(COMMANDS) | set(NOT_IN_MATRIX), (
        "a command was added or removed: list it in COMMANDS (or NOT_IN_MATRIX, saying why)"
    )


@pytest.fixture
def deployment(db_url: str, master_key_uri: str) -> tuple[str, str]:
    """carnet's tables and 30 sealed notes in a fresh database."""
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, 30)
    keys.close()
    engine.dispose()
    return db_url, master_key_uri


def _invoke(args: list[str], env: dict[str, str | None], input: str | None = None) -> Result:
    base: dict[str, str | None] = {
        "CARNET_DATABASE_URL": None,
        "CARNET_MASTER_KEY": None,
        "CARNET_PREVIOUS_MASTER_KEYS": None,
        "CARNET_DEBUG": None,
    }
    return CliRunner().invoke(cli, args, env={**base, **env}, input=input)


def _check_error(
    res: Result, code: int, as_json: bool, report: bool = False
) -> dict[str, Any] | None:
    """``report``: the command prints its findings on stdout (doctor), the error too."""
    out = res.stdout + res.stderr
    assert res.exit_code == code, out
    assert res.stderr.startswith("carnet: error:"), res.stderr
    assert res.stderr.count("\n") == 1, res.stderr  # one line
    assert "Traceback" not in out and "Usage:" not in out, out
    assert "\nError:" not in "\n" + out, out  # click's own error prefix
    assert "Aborted!" not in out and SECRET not in out
    if not as_json:
        assert report or res.stdout == "", res.stdout
        return None
    doc = json.loads(res.stdout)  # one object, nothing else on stdout
    assert doc["error"]["code"] == code, doc
    assert doc["error"]["message"] == res.stderr.removeprefix("carnet: error: ").strip()
    return dict(doc)


FAULTS = ["no_master_key", "master_key_missing", "driver_missing", "database_unreachable"]


# Faults do not depend on the backend: the matrix runs on SQLite, a real
# database file (test_cli_ops and test_cli cover the commands on every backend).
# A master-key fault only for the commands that use a master key.
FAULT_CASES = [
    (path, fault)
    for path in sorted(COMMANDS)
    for fault in FAULTS
    if COMMANDS[path][1] or fault not in ("no_master_key", "master_key_missing")
]


@pytest.mark.parametrize("db_kind", ["sqlite"])
@pytest.mark.parametrize(
    ("path", "fault"), FAULT_CASES, ids=[f"{' '.join(p)}-{f}" for p, f in FAULT_CASES]
)
def test_same_fault_same_exit_code_everywhere(
    path: tuple[str, ...], fault: str, deployment: tuple[str, str], tmp_path: Path
) -> None:
    url, mk = deployment
    args, needs_key = COMMANDS[path]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env: dict[str, str | None]
    if fault == "no_master_key":
        env, code = {"CARNET_DATABASE_URL": url}, EXIT_USAGE
    elif fault == "master_key_missing":
        missing = "file://" + str(tmp_path / "nowhere" / "master.key")
        env, code = {"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": missing}, EXIT_MASTER_KEY
    elif fault == "driver_missing":
        env, code = {"CARNET_DATABASE_URL": MISSING_DRIVER, "CARNET_MASTER_KEY": mk}, EXIT_USAGE
    else:
        env, code = {"CARNET_DATABASE_URL": UNREACHABLE, "CARNET_MASTER_KEY": mk}, EXIT_DATABASE
    res = _invoke([*path, *args], env)
    # doctor prints its checks (the failing one with its fix), then the error line
    report = path == ("doctor",)
    _check_error(res, code, as_json=False, report=report)
    if fault == "no_master_key" and path != ("doctor",):
        # doctor reports it as its master_key check, with its fix
        assert res.stderr == (
            "carnet: error: no master key: set CARNET_MASTER_KEY or pass --master-key\n"
        )
    if _has_json(path):
        _check_error(_invoke([*path, *args, "--json"], env), code, as_json=True, report=report)


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_options_given_to_migrate_itself_too(deployment: tuple[str, str]) -> None:
    # carnet migrate's own --database-url: the same factory, the same code
    url, mk = deployment
    args = ["migrate", "plan", "--database-url", MISSING_DRIVER, *MIGRATE_TARGET]
    res = _invoke(args, {"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": mk})
    _check_error(res, EXIT_USAGE, as_json=False)
    assert "not installed (pg8000)" in res.stderr


def test_master_new_missing_directory(tmp_path: Path) -> None:
    uri = "file://" + str(tmp_path / "missing-dir" / "k")
    res = _invoke(["master", "new", uri], {})
    _check_error(res, EXIT_MASTER_KEY, as_json=False)
    assert "cannot create the master key" in res.stderr
    doc = _check_error(_invoke(["master", "new", uri, "--json"], {}), EXIT_MASTER_KEY, True)
    assert doc is not None and doc["error"]["kind"] == "MasterKeyUnavailable"
    # the same, as the installed program
    r = run_cli(["master", "new", uri], db_url="sqlite://")
    assert r.returncode == EXIT_MASTER_KEY and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("carnet: error: cannot create the master key")


def test_usage_errors_are_one_line_with_the_same_prefix() -> None:
    for args in (["status", "--bogus"], ["migrate", "run"], ["keys", "nope"], ["reindex"]):
        res = _invoke(args, {})
        _check_error(res, EXIT_USAGE, as_json=False)
        assert "--help'" in res.stderr  # where to look
    doc = _check_error(_invoke(["migrate", "run", "--json"], {}), EXIT_USAGE, as_json=True)
    assert doc is not None and doc["error"]["kind"] == "UsageError"


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_confirmation_at_end_of_input_is_aborted(deployment: tuple[str, str]) -> None:
    url, mk = deployment
    env: dict[str, str | None] = {"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": mk}
    assert _invoke(["keys", "destroy", "--tenant", "p1", "--yes"], env).exit_code == 0
    for args in (
        ["keys", "destroy", "--tenant", "p0"],
        ["keys", "retire", "00" * 16, "--force"],  # a yes/no question, not a typed id
        ["keys", "reenable", "--tenant", "p1"],
    ):
        for as_json in (False, True):
            res = _invoke(args + (["--json"] if as_json else []), env, input="")
            assert res.exit_code == EXIT_ABORTED, res.stdout + res.stderr
            assert res.stderr.rstrip().endswith(
                "carnet: error: aborted: no answer on standard input (pass --yes to confirm)"
            ), res.stderr
            assert "Aborted!" not in res.stderr and "Traceback" not in res.stderr
            if as_json:
                assert json.loads(res.stdout)["error"]["code"] == EXIT_ABORTED
    # nothing was destroyed
    res = _invoke(["keys", "list", "--tenant", "p0", "--json"], env)
    assert res.exit_code == 0 and {k["state"] for k in json.loads(res.stdout)} == {"active"}
    # a wrong answer is refused the same way, with its own message
    res = _invoke(["keys", "destroy", "--tenant", "p0"], env, input="p1\n")
    assert res.exit_code == EXIT_ABORTED and "did not match" in res.stderr
    # and as the installed program, stdin closed
    r = run_cli(["keys", "destroy", "--tenant", "p0"], db_url=url, master_key=mk, input="")
    assert r.returncode == EXIT_ABORTED and "Aborted!" not in r.stderr, r.stderr
    assert "no answer on standard input" in r.stderr


@pytest.mark.parametrize("db_kind", ["sqlite", "mariadb"])
def test_hidden_aliases_still_work(deployment: tuple[str, str], tmp_path: Path) -> None:
    url, mk = deployment
    env: dict[str, str | None] = {"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": mk}
    for path in (("master", "rotate"), ("reencrypt",), ("verify",), ("reindex",)):
        help_text = _invoke([*path, "--help"], env).stdout
        assert "--batch-size" in help_text and "--batch " not in help_text, help_text
    assert _invoke(["keys", "rotate", "--all"], env).exit_code == 0
    old = _invoke(["reencrypt", *TARGET, "--batch", "7", "--json"], env)
    assert old.exit_code == 0, old.stderr
    assert json.loads(old.stdout)["rewritten"] == 30
    new = _invoke(["verify", *TARGET, "--batch-size", "7", "--json"], env)
    assert new.exit_code == 0 and json.loads(new.stdout)["ok"] == 30, new.stderr
    new_key = "file://" + str(tmp_path / "new.key")
    assert _invoke(["master", "new", new_key], env).exit_code == 0
    rot = _invoke(["master", "rotate", "--to", new_key, "--batch", "1", "--json"], env)
    assert rot.exit_code == 0 and json.loads(rot.stdout)["rewrapped"] > 0, rot.stderr
    bad = _invoke(["verify", *TARGET, "--batch", "0"], {**env, "CARNET_MASTER_KEY": new_key})
    _check_error(bad, EXIT_USAGE, as_json=False)


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_an_unexpected_exception_is_one_line_without_its_message(
    deployment: tuple[str, str], tmp_path: Path
) -> None:
    """An application module that raises on import: its text (here a planted
    note) never shows; CARNET_DEBUG=1 shows the traceback to whoever asks."""
    url, mk = deployment
    (tmp_path / "brokenapp.py").write_text(f"raise RuntimeError({SECRET!r})\n")
    args = ["reindex", "--index", "brokenapp:Patient.phone_bidx", "--all-tenants"]
    args += ["--app-dir", str(tmp_path)]
    env: dict[str, str | None] = {"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": mk}
    res = _invoke(args, env)
    _check_error(res, EXIT_INTERNAL, as_json=False)
    assert res.stderr == (
        "carnet: error: internal error (RuntimeError); rerun with CARNET_DEBUG=1 for the "
        "traceback\n"
    )
    r = run_cli(args, db_url=url, master_key=mk, extra_env={"CARNET_DEBUG": "1"})
    assert r.returncode == EXIT_INTERNAL and "Traceback" in r.stderr, r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("carnet: error: internal error")


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_migrate_not_complete_is_its_own_code(deployment: tuple[str, str]) -> None:
    """Exit 9, never 3 (the master key's code): a plaintext row is left to migrate."""
    url, mk = deployment
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        # The column's checks refuse plaintext: planted with them dropped, as
        # rows left from before a migration would be.
        drop_checks(conn, notes_table(sa.MetaData()))
        conn.execute(sa.text("UPDATE notes SET summary = 'plain text' WHERE id = 0"))
    engine.dispose()
    env: dict[str, str | None] = {"CARNET_DATABASE_URL": url, "CARNET_MASTER_KEY": mk}
    res = _invoke(["migrate", "verify", *MIGRATE_TARGET, "--json"], env)
    assert res.exit_code == 9, res.stdout + res.stderr
    assert json.loads(res.stdout)["totals"]["plaintext"] == 1


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_the_engine_factory_hides_parameters(db_url: str) -> None:
    """Every engine of the command line: a failed statement never prints its parameters."""
    from carnet._engines import make_engine

    engine = make_engine(db_url)
    try:
        with pytest.raises(sa.exc.DBAPIError) as ei, engine.connect() as conn:
            conn.execute(sa.text("SELECT * FROM no_such_table WHERE x = :v"), {"v": SECRET})
        assert SECRET not in str(ei.value)
    finally:
        engine.dispose()


def test_an_argument_that_is_not_utf8_is_a_usage_error(tmp_path: Path) -> None:
    # Real bytes on a real command line: Python turns them into lone surrogates.
    import os
    import subprocess
    import sys

    carnet_bin = os.path.join(os.path.dirname(sys.executable), "carnet")
    done = subprocess.run(
        [carnet_bin.encode(), b"keys", b"list", b"--database-url", b"sqlite:////tmp/\xff.db"],
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == EXIT_USAGE
    assert done.stderr.decode() == "carnet: error: argument 4 is not valid UTF-8\n"


FORGED = "p1\nkey 0123 p2 destroyed\x1b[31m"
FORGED_SHOWN = "p1\\nkey 0123 p2 destroyed\\x1b[31m"


def test_printable_escapes_what_could_forge_or_recolour_a_line() -> None:
    from carnet._cli import printable

    assert printable(FORGED) == FORGED_SHOWN
    assert printable("a\rb\tc\x00d\x7fe\x85f\x9bg") == "a\\rb\\tc\\x00d\\x7fe\\x85f\\x9bg"
    assert printable("x\u2028y\u2029z") == "x\\u2028y\\u2029z"
    bidi = "".join(chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)])
    assert printable(bidi) == "".join(f"\\u{c:04x}" for c in map(ord, bidi))
    # Ordinary text, accents and other scripts included, is left as it is.
    assert printable("Cabinet Étoile — 診療所 \\ ok") == "Cabinet Étoile — 診療所 \\ ok"


def test_a_practice_id_from_the_database_cannot_forge_output_lines(
    db_url: str, master_key_uri: str
) -> None:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    keys.ensure_key(FORGED)
    keys.ensure_key("p2")
    keys.close()
    engine.dispose()
    env: dict[str, str | None] = {
        "CARNET_DATABASE_URL": db_url,
        "CARNET_MASTER_KEY": master_key_uri,
    }
    for args in (["keys", "list"], ["status"]):
        res = _invoke(args, env)
        assert res.exit_code == 0, res.stdout + res.stderr
        out = res.stdout + res.stderr
        assert "\x1b" not in out, out
        assert FORGED_SHOWN in res.stdout, res.stdout
        for line in out.splitlines():
            assert not line.startswith("key 0123"), out  # no line forged by the id
        if args == ["keys", "list"]:
            assert len(res.stdout.splitlines()) == 3, res.stdout  # header and two keys
    # --json carries the exact id, escaped by JSON itself.
    res = _invoke(["keys", "list", "--json"], env)
    assert FORGED in {k["tenant"] for k in json.loads(res.stdout)}
    assert "\x1b" not in res.stdout
