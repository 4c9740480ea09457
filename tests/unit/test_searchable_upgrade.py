"""The documented upgrade of a carnet_keys table made before key kinds, run as written."""

from __future__ import annotations

import os
import re

import pytest
import sqlalchemy as sa

import carnet
from carnet.errors import ConfigurationError
from carnet.keystore import utcnow
from support.paths import ROOT
from support.schemas import old_keys_table

FORMAT_MD = ROOT / "docs" / "format.md"


def _statements(backend: str) -> list[str]:
    text = FORMAT_MD.read_text(encoding="utf-8")
    blocks = re.findall(r"```sql\n-- upgrade: (\w+)\n(.*?)```", text, re.S)
    body = dict(blocks)[backend]
    return [s.strip() for s in body.split(";") if s.strip()]


def test_documented_upgrade(engine: sa.Engine, master_key_uri: str) -> None:
    backend = "mariadb" if engine.dialect.name in ("mysql", "mariadb") else engine.dialect.name
    old_md = sa.MetaData()
    old = old_keys_table(old_md)
    old_md.create_all(engine)
    # A data key made the old way, through the provider, with the old wrap context.
    mk = carnet.open_master_key(master_key_uri)
    key_id = os.urandom(16)
    secret = os.urandom(32)
    now = utcnow()
    wrapped = mk.wrap(secret, {"tenant": "p1", "key_id": key_id.hex()})
    with engine.begin() as conn:
        conn.execute(
            old.insert().values(
                key_id=key_id.hex(), tenant="p1", version=1, state="active", active_tenant="p1",
                master_key_uri=mk.uri, wrapped_key=wrapped, created_at=now, updated_at=now,
            )
        )  # fmt: skip
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    with engine.begin() as conn:
        for stmt in _statements(backend):
            if stmt.startswith("-- here:"):
                keys.metadata.create_all(conn)
                stmt = stmt.split("\n", 1)[1]
            conn.exec_driver_sql(stmt)
    blob = keys.encrypt(b"kept", tenant="p1", label="l")
    assert blob[1:17] == key_id  # the existing key stayed the active data key
    assert keys.decrypt(blob, tenant="p1", label="l") == b"kept"
    assert len(keys.index_roots("p1")) == 1
    assert {(r.kind, r.version) for r in keys.list_keys("p1")} == {("data", 1), ("index", 1)}
    keys.rotate("p1")
    keys.rotate_index_root("p1")
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(
            keys.table.insert().values(
                key_id=os.urandom(16).hex(), tenant="p1", version=9, state="active", kind="index",
                active_tenant="p1", master_key_uri=mk.uri, wrapped_key=b"x", created_at=now,
                updated_at=now,
            )
        )  # fmt: skip
    mk.close()
    keys.close()


def test_an_old_table_serves_data_keys_until_create_schema_upgrades_it(
    engine: sa.Engine, master_key_uri: str
) -> None:
    old_md = sa.MetaData()
    old = old_keys_table(old_md)
    old_md.create_all(engine)
    mk = carnet.open_master_key(master_key_uri)
    now = utcnow()
    ids = [os.urandom(16) for _ in range(2)]
    with engine.begin() as conn:
        for i, (tenant, state) in enumerate((("p1", "inactive"), ("p1", "active"))):
            conn.execute(
                old.insert().values(
                    key_id=ids[i].hex(), tenant=tenant, version=i + 1, state=state,
                    active_tenant=tenant if state == "active" else None, master_key_uri=mk.uri,
                    wrapped_key=mk.wrap(os.urandom(32), {"tenant": tenant, "key_id": ids[i].hex()}),
                    created_at=now, updated_at=now,
                )
            )  # fmt: skip
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    # Before the upgrade: data keys work as before, blind-index roots ask for it.
    before = keys.encrypt(b"x", tenant="p1", label="l")
    assert before[1:17] == ids[1]
    keys.encrypt(b"y", tenant="p2", label="l")  # a new practice's first key, old shape
    with pytest.raises(ConfigurationError, match="carnet init"):
        keys.index_roots("p1")
    with pytest.raises(ConfigurationError, match="carnet init"):
        keys.rotate_index_root("p1")
    keys.create_schema()
    keys.create_schema()  # a second run changes nothing
    assert keys.encrypt(b"x", tenant="p1", label="l")[1:17] == ids[1]
    assert len(keys.index_roots("p1")) == 1
    assert keys.decrypt(before, tenant="p1", label="l") == b"x"
    assert [(r.kind, r.version) for r in keys.list_keys("p2")] == [("data", 1)]
    assert sorted((r.kind, r.version, r.state) for r in keys.list_keys("p1")) == [
        ("data", 1, "inactive"),
        ("data", 2, "active"),
        ("index", 1, "active"),
    ]
    keys.rotate("p1")
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(
            keys.table.insert().values(
                key_id=os.urandom(16).hex(), tenant="p1", version=9, state="active", kind="data",
                active_tenant="p1", master_key_uri=mk.uri, wrapped_key=b"x", created_at=now,
                updated_at=now,
            )
        )  # fmt: skip
    mk.close()
    keys.close()
