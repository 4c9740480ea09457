"""``carnet keys list``, ``retire`` and ``destroy`` with blind-index roots in the key table.

Beside tests/unit/test_searchable_keys.py, which tests the roots in-process.
"""

from __future__ import annotations

import pytest

import carnet
from carnet import lifecycle
from carnet.errors import KeyDestroyed
from support.lifecycleutil import run_cli


def test_status_and_cli_with_index_roots(unconfigured_keys: carnet.KeyManager, db_url: str) -> None:
    # Only an index root at first: checking the master key must still unwrap it.
    old = unconfigured_keys.index_roots("p1")[0]
    assert lifecycle.check_master_key(unconfigured_keys)
    unconfigured_keys.ensure_key("p1")
    rec = unconfigured_keys.rotate_index_root("p1")
    report = lifecycle.status(unconfigured_keys, columns=[])
    (p1,) = report.tenants
    assert p1.active_version == 1
    assert sorted((k["kind"], k["version"], k["state"]) for k in p1.keys) == [
        ("data", 1, "active"),
        ("index", 1, "inactive"),
        ("index", 2, "active"),
    ]
    mk = unconfigured_keys.master_key.uri
    listed = run_cli(["keys", "list", "--json"], db_url=db_url, master_key=mk)
    assert listed.returncode == 0, listed.stderr
    assert '"kind": "index"' in listed.stdout
    retired = run_cli(["keys", "retire", old.key_id.hex(), "--yes"], db_url=db_url, master_key=mk)
    assert retired.returncode == 0, retired.stderr
    fresh = carnet.KeyManager(unconfigured_keys.engine, master_key=mk)
    assert [r.key_id for r in fresh.index_roots("p1")] == [rec.key_id]
    gone = run_cli(["keys", "destroy", "--tenant", "p1", "--yes"], db_url=db_url, master_key=mk)
    assert gone.returncode == 0, gone.stderr
    assert {r.state for r in fresh.list_keys("p1")} == {"destroyed"}
    fresh.clear_cache()
    with pytest.raises(KeyDestroyed):
        fresh.index_roots("p1")
