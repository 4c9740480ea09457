"""The walkthrough of docs/migration.md, run command by command on every backend.

The commands are read from the document itself (between the walkthrough
markers), so the documentation cannot drift from what works. ``carnet`` lines
go through the real ``carnet`` click group, the generator through its own;
``# exits N`` comments give the expected exit code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from carnet import dbchecks
from support.paths import ROOT

sys.path.insert(0, str(ROOT / "examples"))

from legacy_practice import generate  # noqa: E402


def walkthrough() -> list[str]:
    text = (ROOT / "docs" / "migration.md").read_text(encoding="utf-8")
    block = text.split("<!-- walkthrough:start -->")[1].split("<!-- walkthrough:end -->")[0]
    return [line[2:] for line in block.splitlines() if line.startswith("$ ")]


def test_walkthrough_is_documented() -> None:
    cmds = walkthrough()
    assert any(c.startswith("carnet migrate finish") for c in cmds)
    assert any(c.startswith("carnet migrate compact") for c in cmds)


def test_documented_walkthrough_runs(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carnet.cli import cli

    monkeypatch.chdir(ROOT)
    env = {"PWD": str(tmp_path)}
    outputs: dict[str, str] = {}
    for line in walkthrough():
        cmd, _, comment = line.partition("#")
        m = re.search(r"exits (\d+)", comment)
        expected = int(m.group(1)) if m else 0
        words = shlex.split(cmd)
        if words[0] == "export":
            name, _, value = words[1].partition("=")
            # The database is the backend under test, not the document's SQLite file.
            env[name] = (
                db_url
                if name == "CARNET_DATABASE_URL"
                else os.path.expandvars(value.replace("$PWD", env["PWD"]))
            )
            continue
        words = [
            w.replace("$PWD", env["PWD"]).replace(
                "$CARNET_MASTER_KEY", env.get("CARNET_MASTER_KEY", "")
            )
            for w in words
        ]
        if words[0] == "python":
            assert words[1] == "examples/legacy_practice/generate.py"
            group, args = generate.main, words[2:]
        else:
            assert words[0] == "carnet"
            group, args = cli, words[1:]
        res = CliRunner().invoke(
            group, [*args, "--json"] if "migrate" in args else args, env=env, catch_exceptions=False
        )
        assert res.exit_code == expected, f"{line}\n{res.output}"
        outputs[" ".join(args[:2])] = res.stdout

    plan = json.loads(outputs["migrate plan"])
    assert plan["samples"]["prefixed_invalid"] == [[3]]
    finish = json.loads(outputs["migrate finish"])
    assert finish["clean"] and finish["totals"]["plaintext"] == 0
    assert "mixed_read" in finish["advice"]
    compact = json.loads(outputs["migrate compact"])
    assert compact["remaining"]
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            values = (
                conn.execute(sa.text("SELECT comment FROM consultations WHERE comment IS NOT NULL"))
                .scalars()
                .all()
            )
            state = conn.execute(sa.text("SELECT state FROM carnet_migrations")).scalar_one()
            # migrate finish installed the strict database checks of the migrated column.
            spec = dbchecks.column_spec(
                conn,
                "consultations",
                "comment",
                tenant_column="practice_id",
                parent_fk="patient_id=patients.id",
            )
            assert dbchecks.missing(conn, spec) == []
            assert dbchecks.mode_installed(conn, spec) == "v2"
    finally:
        engine.dispose()
    assert values and all(v.startswith("carnet:") for v in values)
    assert state == "strict"
