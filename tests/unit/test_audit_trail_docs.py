"""docs/audit.md's example writes a trail that verifies, as its comments say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.paths import ROOT


def test_the_docs_example_writes_a_verified_trail(tmp_path: Path) -> None:
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
    assert "trail: 2 record(s), chain verified" in out.stdout
    # The example's notes never reach the log, the JSON lines included.
    assert "note 1" not in out.stderr
