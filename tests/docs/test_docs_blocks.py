"""Every Python block of docs/ runs as written.

The blocks of one document run in order, in one fresh interpreter, in an
empty directory: a later block may use what an earlier one defined, as a
reader following the page would. A block that needs a service the tests
cannot start here (a KMS key, a second database, Alembic's own runner) is
preceded by ``<!-- illustrative: why -->`` and skipped; ``<!-- example: … -->``
blocks are installed and run by the test named beside them. Both are counted,
and the count printed, so a growing number of skipped blocks shows.
docs/searchable.md has its own test (tests/docs/test_searchable_docs.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import ROOT

DOCS = ROOT / "docs"
OWN_TEST = {"searchable.md"}

BLOCK = re.compile(
    r"(?:<!--\s*(?P<mark>illustrative|example)(?P<why>[^>]*)-->\s*\n)?"
    r"```python[^\n]*\n(?P<code>.*?)```",
    re.S,
)


def blocks(doc: Path) -> list[tuple[str | None, str]]:
    return [
        (m.group("mark"), m.group("code")) for m in BLOCK.finditer(doc.read_text(encoding="utf-8"))
    ]


DOC_FILES = sorted(p for p in DOCS.glob("*.md") if p.name not in OWN_TEST)


@pytest.mark.parametrize(
    "doc", [p for p in DOC_FILES if any(m is None for m, _ in blocks(p))], ids=lambda p: p.name
)
def test_python_blocks_run(doc: Path, tmp_path: Path) -> None:
    code = "\n\n".join(c for mark, c in blocks(doc) if mark is None)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"{doc.name}:\n{r.stderr[-3000:]}"


def test_skipped_blocks_are_marked_and_counted(capsys: pytest.CaptureFixture[str]) -> None:
    counts = {"run": 0, "illustrative": 0, "example": 0}
    for doc in DOC_FILES:
        text = doc.read_text(encoding="utf-8")
        for mark, _ in blocks(doc):
            counts["run" if mark is None else mark] += 1
        # Every ```python fence is seen by the pattern (none hides from this test).
        assert text.count("```python") == len(blocks(doc)), doc.name
    with capsys.disabled():
        print(
            f"\ndocs/ Python blocks: {counts['run']} run, {counts['illustrative']} "
            f"illustrative (skipped), {counts['example']} run by their own test"
        )
    assert counts["run"] >= 6
    assert counts["illustrative"] <= 8  # each needs a reason in its marker


def test_quickstart_first_block_alone(tmp_path: Path) -> None:
    # The first block is what a reader pastes first: it must stand alone.
    (first,) = [c for _, c in blocks(DOCS / "quickstart.md")[:1]]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", first],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "carnet-master.key").exists() and (tmp_path / "clinic.db").exists()
