"""Destroying a practice stops another running process from decrypting within its cache TTL."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

import carnet
from support.lifecycleutil import fill_notes, run_cli

READER = """
import sys, time
import sqlalchemy as sa
import carnet
from carnet import envelope
from carnet.errors import KeyDestroyed
url, mk = sys.argv[1:3]
keys = carnet.KeyManager(sa.create_engine(url), master_key=mk, cache_ttl=1.0)
with keys.engine.connect() as c:
    blob = bytes(c.execute(sa.text("SELECT body FROM notes WHERE id = 1")).scalar_one())
while True:
    try:
        keys.decrypt(blob, tenant="p1", label="notes.body")
        print("ok", time.time(), flush=True)
    except KeyDestroyed:
        print("destroyed", time.time(), flush=True)
        break
    time.sleep(0.05)
"""


def test_destroy_propagates_to_another_process(
    db_url: str, master_key_uri: str, tmp_path: Path
) -> None:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, 9)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    reader = subprocess.Popen(
        [sys.executable, str(script), db_url, master_key_uri],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert reader.stdout is not None
        assert reader.stdout.readline().startswith("ok")  # it holds the DEK in its cache
        t0 = time.time()
        r = run_cli(
            ["keys", "destroy", "--tenant", "p1", "--yes"], db_url=db_url, master_key=master_key_uri
        )
        assert r.returncode == 0, r.stderr
        t1 = time.time()
        out, _ = reader.communicate(timeout=30)
    finally:
        reader.kill()
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "destroyed"
    # Stopped within the TTL (1 s) of the destroy committing, plus polling slack.
    assert float(last[1]) - t1 < 1.0 + 0.5
    assert float(last[1]) > t0
    keys.close()
    engine.dispose()
