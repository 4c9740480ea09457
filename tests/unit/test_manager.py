"""KeyManager against real databases: key creation, races, rotation, shredding, rewrap, cache."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from carnet.errors import (
    ConfigurationError,
    KeyDestroyed,
    KeyRetired,
    MasterKeyMismatch,
    MasterKeyUnavailable,
    TenantMismatch,
    UnknownKey,
)
from carnet.keystore import utcnow


def test_first_key_is_created_lazily_once(unconfigured_keys: carnet.KeyManager) -> None:
    assert unconfigured_keys.list_keys() == []
    blob = unconfigured_keys.encrypt(b"hello", tenant="p1", label="t.c")
    blob2 = unconfigured_keys.encrypt(b"hello", tenant="p1", label="t.c")
    recs = unconfigured_keys.list_keys()
    assert len(recs) == 1 and recs[0].state == "active" and recs[0].version == 1
    assert blob[1:17] == blob2[1:17] == recs[0].key_id
    assert blob != blob2  # fresh nonce each time
    assert unconfigured_keys.decrypt(blob, tenant="p1", label="t.c") == b"hello"


def test_values_do_not_open_for_another_tenant_or_label(
    unconfigured_keys: carnet.KeyManager,
) -> None:
    blob = unconfigured_keys.encrypt(b"secret", tenant="p1", label="t.c")
    unconfigured_keys.ensure_key("p2")
    with pytest.raises(TenantMismatch):
        unconfigured_keys.decrypt(blob, tenant="p2", label="t.c")
    with pytest.raises(carnet.errors.InvalidCiphertext):
        unconfigured_keys.decrypt(blob, tenant="p1", label="t.other")


def test_rotate_keeps_old_values_readable(unconfigured_keys: carnet.KeyManager) -> None:
    old = unconfigured_keys.encrypt(b"before", tenant="p1", label="l")
    rec = unconfigured_keys.rotate("p1")
    assert rec.version == 2 and rec.state == "active"
    new = unconfigured_keys.encrypt(b"after", tenant="p1", label="l")
    assert new[1:17] == rec.key_id != old[1:17]
    states = {r.version: r.state for r in unconfigured_keys.list_keys("p1")}
    assert states == {1: "inactive", 2: "active"}
    # Another process (a fresh manager, cold cache) reads both.
    other = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    assert other.decrypt(old, tenant="p1", label="l") == b"before"
    assert other.decrypt(new, tenant="p1", label="l") == b"after"


def test_exactly_one_active_key_is_enforced_by_the_database(
    unconfigured_keys: carnet.KeyManager,
) -> None:
    unconfigured_keys.ensure_key("p1")
    t = unconfigured_keys.table
    now = utcnow()
    with pytest.raises(sa.exc.IntegrityError), unconfigured_keys.engine.begin() as conn:
        conn.execute(
            t.insert().values(
                key_id=os.urandom(16).hex(),
                tenant="p1",
                version=2,
                state="active",
                active_tenant="p1",
                master_key_uri=unconfigured_keys.master_key.uri,
                wrapped_key=b"x" * 60,
                created_at=now,
                updated_at=now,
            )
        )


def _race_worker(
    url: str, master: str, tenant: str, barrier: mp.synchronize.Barrier, out: mp.Queue
) -> None:  # type: ignore[name-defined]
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=master)
    barrier.wait()
    try:
        out.put(keys.ensure_key(tenant).key_id.hex())
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(f"error: {type(exc).__name__}: {exc}")
    engine.dispose()


def test_concurrent_first_key_creation_yields_one_key(
    unconfigured_keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    ctx = mp.get_context("fork")
    n = 6
    for tenant in ("race-a", "race-b", "race-c"):
        barrier = ctx.Barrier(n)
        out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        procs = [
            ctx.Process(target=_race_worker, args=(db_url, master_key_uri, tenant, barrier, out))
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert not [r for r in results if r.startswith("error")], results
        active = [r for r in unconfigured_keys.list_keys(tenant) if r.state == "active"]
        assert len(unconfigured_keys.list_keys(tenant)) == 1 and len(active) == 1
        assert set(results) == {active[0].key_id.hex()}


def test_destroy_shreds_every_version(unconfigured_keys: carnet.KeyManager) -> None:
    v1 = unconfigured_keys.encrypt(b"one", tenant="gone", label="l")
    unconfigured_keys.rotate("gone")
    v2 = unconfigured_keys.encrypt(b"two", tenant="gone", label="l")
    keep = unconfigured_keys.encrypt(b"kept", tenant="stays", label="l")
    assert unconfigured_keys.destroy("gone") == 2
    recs = unconfigured_keys.list_keys("gone")
    assert {r.state for r in recs} == {"destroyed"} and all(r.wrapped_key is None for r in recs)
    for blob in (v1, v2):
        with pytest.raises(KeyDestroyed):
            unconfigured_keys.decrypt(blob, tenant="gone", label="l")
        with pytest.raises(KeyDestroyed):  # a cold process too
            carnet.KeyManager(
                unconfigured_keys.engine, master_key=unconfigured_keys.master_key
            ).decrypt(blob, tenant="gone", label="l")
    with pytest.raises(KeyDestroyed):  # no silent new key for a shredded practice
        unconfigured_keys.encrypt(b"new", tenant="gone", label="l")
    assert unconfigured_keys.decrypt(keep, tenant="stays", label="l") == b"kept"


def test_retire_erases_one_inactive_version(unconfigured_keys: carnet.KeyManager) -> None:
    old = unconfigured_keys.encrypt(b"old", tenant="p1", label="l")
    active = unconfigured_keys.ensure_key("p1")
    with pytest.raises(ConfigurationError):
        unconfigured_keys.retire(active.key_id)
    unconfigured_keys.rotate("p1")
    unconfigured_keys.retire(old[1:17])
    unconfigured_keys.clear_cache()
    with pytest.raises(KeyRetired):
        unconfigured_keys.decrypt(old, tenant="p1", label="l")
    with pytest.raises(UnknownKey):
        unconfigured_keys.retire(os.urandom(16))


def test_unknown_key_id(unconfigured_keys: carnet.KeyManager) -> None:
    blob = unconfigured_keys.encrypt(b"x", tenant="p1", label="l")
    forged = blob[:1] + os.urandom(16) + blob[17:]
    with pytest.raises(UnknownKey):
        unconfigured_keys.decrypt(forged, tenant="p1", label="l")


def test_cache_costs_one_unwrap_per_tenant(unconfigured_keys: carnet.KeyManager) -> None:
    blobs = [
        (
            f"p{i % 20}",
            unconfigured_keys.encrypt(f"note {i}".encode(), tenant=f"p{i % 20}", label="l"),
        )
        for i in range(2000)
    ]
    reader = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    for tenant, blob in blobs:
        reader.decrypt(blob, tenant=tenant, label="l")
    assert reader.stats()["master_unwraps"] == 20  # cold: one per practice
    reader.reset_stats()
    for tenant, blob in blobs:
        reader.decrypt(blob, tenant=tenant, label="l")
    assert reader.stats()["master_unwraps"] == 0  # warm
    assert reader.stats()["cache_hits"] == 2000


def test_cache_ttl_expires_keys(unconfigured_keys: carnet.KeyManager) -> None:
    blob = unconfigured_keys.encrypt(b"x", tenant="p1", label="l")
    reader = carnet.KeyManager(
        unconfigured_keys.engine, master_key=unconfigured_keys.master_key, cache_ttl=0.05
    )
    reader.decrypt(blob, tenant="p1", label="l")
    import time

    time.sleep(0.08)
    reader.decrypt(blob, tenant="p1", label="l")
    assert reader.stats()["master_unwraps"] == 2


def test_rewrap_moves_every_key_and_old_master_is_no_longer_needed(
    unconfigured_keys: carnet.KeyManager, tmp_path: Path
) -> None:
    blobs = {t: unconfigured_keys.encrypt(t.encode(), tenant=t, label="l") for t in ("a", "b", "c")}
    unconfigured_keys.rotate("a")
    unconfigured_keys.destroy("c")
    new_uri = "file://" + str(tmp_path / "new.key")
    carnet.create_master_key(new_uri)
    report = unconfigured_keys.rewrap(new_uri)
    assert (report.rewrapped, report.skipped_destroyed) == (3, 1)
    assert {r.master_key_uri for r in unconfigured_keys.list_keys() if r.wrapped_key} == {new_uri}
    assert unconfigured_keys.rewrap(new_uri).rewrapped == 0  # idempotent
    os.unlink(
        unconfigured_keys.list_keys("c")[0].master_key_uri.removeprefix("file://")
    )  # old master gone
    cold = carnet.KeyManager(unconfigured_keys.engine, master_key=new_uri)
    assert cold.decrypt(blobs["a"], tenant="a", label="l") == b"a"
    assert cold.decrypt(blobs["b"], tenant="b", label="l") == b"b"


def test_a_key_wrapped_by_an_unconfigured_master_is_refused(
    unconfigured_keys: carnet.KeyManager, tmp_path: Path
) -> None:
    blob = unconfigured_keys.encrypt(b"x", tenant="p1", label="l")
    other_uri = "file://" + str(tmp_path / "other.key")
    carnet.create_master_key(other_uri)
    stranger = carnet.KeyManager(unconfigured_keys.engine, master_key=other_uri)
    with pytest.raises(MasterKeyUnavailable, match="previous_master_keys"):
        stranger.decrypt(blob, tenant="p1", label="l")
    # Pointing the row at the other master (an attacker with write access) does not help.
    with unconfigured_keys.engine.begin() as conn:
        conn.execute(unconfigured_keys.table.update().values(master_key_uri=other_uri))
    with pytest.raises(MasterKeyMismatch):
        stranger.decrypt(blob, tenant="p1", label="l")


def test_wrapped_key_copied_to_another_tenant_does_not_unwrap(
    unconfigured_keys: carnet.KeyManager,
) -> None:
    blob_a = unconfigured_keys.encrypt(b"a", tenant="a", label="l")
    unconfigured_keys.ensure_key("b")
    t = unconfigured_keys.table
    with unconfigured_keys.engine.begin() as conn:
        wrapped_a = conn.execute(sa.select(t.c.wrapped_key).where(t.c.tenant == "a")).scalar_one()
        conn.execute(t.update().where(t.c.tenant == "b").values(wrapped_key=wrapped_a))
    cold = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    with pytest.raises(MasterKeyMismatch):
        cold.encrypt(b"x", tenant="b", label="l")
    assert cold.decrypt(blob_a, tenant="a", label="l") == b"a"


def test_bad_database_url() -> None:
    with pytest.raises(ConfigurationError):
        carnet.KeyManager("nosuchdb://x", master_key="file:///nonexistent")
