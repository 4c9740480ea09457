"""The README's quickstart, run as written (only the key path is the test's own)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

from carnet import envelope
from support.paths import ROOT

README = ROOT / "README.md"


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README lost its quickstart"
    code = blocks[0]
    assert 'master_key="file:///path/to/master.key"' in code
    key = tmp_path / "master.key"
    # The README's own set-up step, through the real command.
    subprocess.run(
        [sys.executable, "-m", "carnet", "master", "new", f"file://{key}"],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    code = code.replace("/path/to/master.key", str(key))
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=tmp_path)
    db = tmp_path / "clinic.db"
    raw = db.read_bytes()
    assert b"anxieuse" not in raw and "dépression".encode() not in raw
    with sqlite3.connect(db) as conn:
        ((practice, blob),) = conn.execute("SELECT practice_id, body FROM notes").fetchall()
    assert practice == "cabinet-lyon-3" and blob[0] == 2
    assert blob[23 : 23 + len(practice)] == practice.encode()  # the header names the practice
    assert len(blob) > envelope.overhead(practice)
    read_back = code.replace(
        "    s.commit()",
        "    s.commit()\nwith Session(engine) as s:\n"
        "    print(s.scalars(sa.select(Note)).all()[-1].body)",
    )
    out = subprocess.run(
        [sys.executable, "-c", read_back], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert out.strip() == "Patiente anxieuse, suivi dépression"
