"""A backup restored after ``carnet master rotate``: ``from_env`` and the CLI opening it.

Beside tests/unit/test_from_env.py, which reads the variables in-process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from carnet.errors import CarnetError
from support.lifecycleutil import SECRET, fill_notes, notes_table, read_notes, run_cli


def _copy_database(src_url: str, dst_url: str, master_key: str) -> None:
    """A backup: the key table and the notes, row for row, in another database."""
    dst_keys = carnet.KeyManager(dst_url, master_key=master_key)
    dst_keys.create_schema()
    md = sa.MetaData()
    notes = notes_table(md)
    src, dst = sa.create_engine(src_url), sa.create_engine(dst_url)
    try:
        md.create_all(dst)
        raw = sa.MetaData()  # the stored bytes, as a dump has them
        for name in ("carnet_keys", notes.name):
            table = sa.Table(name, raw, autoload_with=src)
            with src.connect() as c:
                rows = [dict(r) for r in c.execute(sa.select(table)).mappings()]
            with dst.begin() as c:
                c.execute(sa.insert(table), rows)
    finally:
        dst_keys.close()
        src.dispose()
        dst.dispose()


def test_backup_restored_after_a_cli_master_rotation(
    db_url: str, fresh_db_url_factory: Callable[[], str], master_key_uri: str, tmp_path: Path
) -> None:
    old = master_key_uri
    keys = carnet.KeyManager(db_url, master_key=old)
    keys.create_schema()
    engine = sa.create_engine(db_url)
    fill_notes(engine, keys, 30)
    expected = read_notes(engine, keys)
    keys.close()
    engine.dispose()
    backup = fresh_db_url_factory()
    _copy_database(db_url, backup, old)

    new = "file://" + str(tmp_path / "master-2.key")
    r = run_cli(["master", "new", new], db_url=db_url)
    assert r.returncode == 0, r.stderr
    r = run_cli(["master", "rotate", "--to", new, "--json"], db_url=db_url, master_key=old)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rewrapped"] == 3

    # The restored backup's data keys are wrapped under the old master key: the
    # new one alone opens none of them, from_env or CLI alike.
    env = {"CARNET_DATABASE_URL": backup, "CARNET_MASTER_KEY": new}
    alone = carnet.KeyManager.from_env(environ=env)
    restored = sa.create_engine(backup)
    try:
        with pytest.raises(CarnetError):
            read_notes(restored, alone)
    finally:
        alone.close()
    r = run_cli(["verify", "--table", "notes", "--column", "body"], db_url=backup, master_key=new)
    assert r.returncode != 0

    # With CARNET_PREVIOUS_MASTER_KEYS, both open it: the CLI's verify and the
    # application's manager, to the text written before the rotation.
    env["CARNET_PREVIOUS_MASTER_KEYS"] = f" {old} ,"
    r = run_cli(
        ["verify", "--table", "notes", "--column", "body", "--json"],
        db_url=backup,
        master_key=new,
        extra_env={"CARNET_PREVIOUS_MASTER_KEYS": env["CARNET_PREVIOUS_MASTER_KEYS"]},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] == 30
    assert SECRET not in r.stdout + r.stderr
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        app_keys = carnet.KeyManager.from_env()
    try:
        assert read_notes(restored, app_keys) == expected
    finally:
        app_keys.close()
        restored.dispose()

    # The live database, rotated, opens under the new master key alone.
    live = carnet.KeyManager.from_env(
        environ={"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": new}
    )
    engine = sa.create_engine(db_url)
    try:
        assert read_notes(engine, live) == expected
    finally:
        live.close()
        engine.dispose()
