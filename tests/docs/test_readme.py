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
    # As written, in an empty directory: it makes its own key file.
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=tmp_path)
    key = tmp_path / "carnet-master.key"
    assert key.stat().st_mode & 0o077 == 0
    db = tmp_path / "clinic.db"
    raw = db.read_bytes()
    assert b"anxieuse" not in raw and "dépression".encode() not in raw
    with sqlite3.connect(db) as conn:
        ((practice, blob),) = conn.execute("SELECT practice_id, body FROM notes").fetchall()
    assert practice == "cabinet-lyon-3" and blob[0] == 2
    assert blob[23 : 23 + len(practice)] == practice.encode()  # the header names the practice
    assert len(blob) > envelope.overhead(practice)
    # Run again: the key file made the first time opens the first note.
    key_bytes = key.read_bytes()
    read_back = code.replace(
        "    s.commit()",
        "    s.commit()\nwith Session(engine) as s:\n"
        "    print([n.body for n in s.scalars(sa.select(Note).order_by(Note.id))])",
    )
    out = subprocess.run(
        [sys.executable, "-c", read_back], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert out.strip() == repr(["Patiente anxieuse, suivi dépression"] * 2)
    assert key.read_bytes() == key_bytes
