"""docs/audit.md's example, run as written: a budget stops a bulk read, the
trail records who read what and verifies, and no note reaches the log."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.paths import ROOT


def test_the_docs_example_stops_a_bulk_read_and_writes_a_verified_trail(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    # The budget stops the bulk read, and says whose.
    assert "stopped: principal 'dr.martin'" in out.stdout
    assert "dr.martin cabinet-lyon-3 notes.body 40" in out.stdout
    assert "by principal 'dr.bernard'" in out.stderr  # the INFO event line
    # The trail holds the reads and its chain verifies.
    assert "trail: 2 record(s), chain verified" in out.stdout
    # The example's notes never reach the log, the JSON lines included.
    assert "note 1" not in out.stderr
