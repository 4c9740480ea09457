"""`carnet doctor` run with the previous master key after a rotation: its fix configures the
new master key and never advises rotating back to the old one."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import carnet
from support.lifecycleutil import fill_notes, run_cli


def doctor(url: str, mk: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    r = run_cli(["doctor", "--json"], db_url=url, master_key=mk, extra_env=env)
    text = run_cli(["doctor"], db_url=url, master_key=mk, extra_env=env)
    assert text.returncode == r.returncode and "Traceback" not in r.stderr + text.stderr
    return r.returncode, json.loads(r.stdout), text.stdout


class _Stop(Exception):
    pass


def _deploy(db_url: str, mk: str) -> None:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=mk)
    keys.create_schema()
    fill_notes(engine, keys, 30)
    keys.close()
    engine.dispose()
    assert run_cli(["init"], db_url=db_url, master_key=mk).returncode == 0


def _new_master(tmp_path: Path, db_url: str) -> str:
    new = "file://" + str(tmp_path / "master-2.key")
    assert run_cli(["master", "new", new], db_url=db_url).returncode == 0
    return new


def test_finished_rotation_run_with_the_old_master_key(
    db_url: str, master_key_uri: str, tmp_path: Path
) -> None:
    old = master_key_uri
    _deploy(db_url, old)
    new = _new_master(tmp_path, db_url)
    r = run_cli(["master", "rotate", "--to", new], db_url=db_url, master_key=old)
    assert r.returncode == 0, r.stderr
    back = f"rotate --to {old}"
    # The old key alone (an environment not updated after the rotation).
    code, rep, text = doctor(db_url, old)
    assert code == 3, text
    assert back not in text and back not in str(rep)
    assert f"set CARNET_MASTER_KEY={new}" in text
    # The old key as master, the new one as previous: it works, and says which to configure.
    code, rep, text = doctor(db_url, old, env={"CARNET_PREVIOUS_MASTER_KEYS": new})
    assert code == 0, text
    assert back not in text and back not in str(rep)
    prev = [c for c in rep["checks"] if c["name"] == "previous_master_keys"][0]
    assert prev["status"] == "warn" and f"set CARNET_MASTER_KEY={new}" in prev["fix"]
    # Configured the right way round, nothing to fix.
    code, rep, text = doctor(db_url, new, env={"CARNET_PREVIOUS_MASTER_KEYS": old})
    assert code == 0, text
    prev = [c for c in rep["checks"] if c["name"] == "previous_master_keys"][0]
    assert prev["status"] == "ok" and prev["details"] == {"uri": old, "keys": 0}


def test_interrupted_rotation_run_with_the_old_master_key(
    db_url: str, master_key_uri: str, tmp_path: Path
) -> None:
    old = master_key_uri
    _deploy(db_url, old)
    new = _new_master(tmp_path, db_url)
    time.sleep(1.1)  # MariaDB's DATETIME keeps whole seconds: the rewrap must be later
    keys = carnet.KeyManager(db_url, master_key=old)
    try:

        def stop(_: int) -> None:
            raise _Stop  # the process dies after its first committed batch

        try:
            keys.rewrap(new, batch_size=1, progress=stop)
        except _Stop:
            pass
        under = {r.master_key_uri for r in keys.list_keys()}
    finally:
        keys.close()
        keys.engine.dispose()
    assert under == {old, new}
    back = f"rotate --to {old}"
    for env in ({}, {"CARNET_PREVIOUS_MASTER_KEYS": new}):
        code, rep, text = doctor(db_url, old, env=env)
        assert back not in text and back not in str(rep), text
        assert f"set CARNET_MASTER_KEY={new}" in text
        assert f"finish carnet master rotate --to {new}" in text
    # Configured the right way round: finish the rotation towards the new key.
    code, rep, text = doctor(db_url, new, env={"CARNET_PREVIOUS_MASTER_KEYS": old})
    assert code == 0, text
    assert f"finish carnet master rotate --to {new}" in text
