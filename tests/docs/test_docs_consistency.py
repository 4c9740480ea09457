"""What the docs say about the CLI is what the CLI prints, said the same way everywhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from carnet import lifecycle
from support.paths import ROOT

DOCS = ROOT / "docs"


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("`", ""))


def test_one_rule_for_the_previous_master_key() -> None:
    # The CLI's sentence, and the same rule in the two runbooks.
    rule = lifecycle.OLD_MASTER_RULE
    assert "until no backup you may restore predates this rotation" in rule
    for doc in ("cli.md", "operations.md"):
        text = _flat((DOCS / doc).read_text(encoding="utf-8"))
        assert "until no backup you may restore predates" in text, doc
        assert "needs it, as --previous-master-key" in text, doc
        assert "then delete it" in text, doc
    for path in [*DOCS.glob("*.md"), ROOT / "README.md", *(ROOT / "src").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "no longer needed" not in text, path
        assert "can be deleted" not in text, path


def test_migration_figure_lives_in_performance_md_only() -> None:
    migration = (DOCS / "migration.md").read_text(encoding="utf-8")
    assert "performance.md#migrate" in migration
    assert not re.search(r"\d[\d,]+ rows (sealed )?per second", migration)
    perf = (DOCS / "performance.md").read_text(encoding="utf-8")
    assert "migrate run: rows sealed per second" in perf


def test_lock_notice_is_documented_as_printed() -> None:
    text = _flat((DOCS / "cli.md").read_text(encoding="utf-8"))
    assert "waiting for a lock on the SQLite database held by another connection" in text
    assert f"a statement gives up after {lifecycle.SQLITE_LOCK_TIMEOUT:g}s" in text


def test_shell_completion_as_documented() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert "_CARNET_COMPLETE=bash_source carnet" in text
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        _CARNET_COMPLETE="bash_complete",
        COMP_WORDS="carnet keys r",
        COMP_CWORD="2",
    )
    r = subprocess.run(
        [sys.executable, "-m", "carnet"], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.stdout.split() == ["plain,reenable", "plain,retire", "plain,rotate"]
    env["_CARNET_COMPLETE"] = "bash_source"
    r = subprocess.run(
        [sys.executable, "-m", "carnet"], env=env, capture_output=True, text=True, timeout=60
    )
    assert "_carnet_completion" in r.stdout


def test_every_command_is_documented() -> None:
    # In cli.md, or in the guide of the feature that adds it (searchable.md, migration.md).
    from carnet.cli import cli

    text = "\n".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    for name in cli.commands:
        assert f"`carnet {name}" in text or f"carnet {name} " in text, name


def test_every_test_folder_is_a_tier_pytest_runs_and_the_docs_name() -> None:
    # A folder of tests missing from testpaths would never run under `make test`.
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    tiers = config["tool"]["pytest"]["ini_options"]["testpaths"]
    tests = ROOT / "tests"
    folders = {p.relative_to(tests).parts[0] for p in tests.rglob("test_*.py")}
    assert sorted(t.removeprefix("tests/") for t in tiers) == sorted(folders)
    table = (DOCS / "development.md").read_text(encoding="utf-8")
    for tier in tiers:
        assert f"| `{tier}/` |" in table, tier
    # The quick loop is the first tier, the fastest.
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(rf"^test-fast:.*\n\t\$\(BIN\)/pytest {re.escape(tiers[0])} ", makefile, re.M)


def test_every_module_is_on_the_map_and_none_is_over_900_lines() -> None:
    # docs/development.md's map is where a newcomer finds a concept: a module
    # missing from it, or grown past 900 lines, is a layout to fix.
    table = (DOCS / "development.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/]+(?:\.py|/))`", table))
    src = ROOT / "src" / "carnet"
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= 900, f"{rel}: {lines} lines"
        if rel.name in ("__init__.py", "__main__.py"):
            continue
        package = rel.parts[0] + "/" if len(rel.parts) > 1 else None
        assert rel.name in named or rel.as_posix() in named or package in named, rel
