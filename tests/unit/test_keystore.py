"""KeyStore on its own against real databases: the key table's SQL, wrapped bytes only."""

from __future__ import annotations

import inspect
import os
import threading
import typing

import pytest
import sqlalchemy as sa

import carnet
import carnet.keystore as keystore_module
from carnet.errors import (
    ConfigurationError,
    KeyDestroyed,
    KeyStoreInconsistent,
    UnknownKey,
    UnknownTenant,
)
from carnet.keystore import ACTIVE, DESTROYED, INACTIVE, INDEX, RETIRED, KeyStore, keys_table
from carnet.providers.base import MasterKey

URI = "file:///not/a/real/master.key"  # the store only records a master key's name


def _kid() -> bytes:
    return os.urandom(16)


def _wrapped() -> bytes:
    # Opaque to the store: any bytes; it never unwraps them.
    return b"wrapped:" + os.urandom(40)


@pytest.fixture
def store(engine: sa.Engine) -> KeyStore:
    s = KeyStore(engine)
    assert s.create_schema() == []
    return s


def _first(store: KeyStore, tenant: str) -> tuple[bytes, bytes]:
    kid, w = _kid(), _wrapped()
    assert store.insert_first(None, tenant, kid, w, URI)
    return kid, w


def test_first_key_round_trips_wrapped_bytes(store: KeyStore) -> None:
    kid, w = _first(store, "p1")
    rec, states = store.active(None, "p1")
    assert rec is not None and states == {ACTIVE}
    assert (rec.key_id, rec.tenant, rec.version, rec.wrapped_key) == (kid, "p1", 1, w)
    assert rec.master_key_uri == URI and rec.active_tenant == "p1"
    assert store.get(kid) == rec
    assert store.get(_kid()) is None
    assert store.active(None, "p2") == (None, set())
    assert store.tenants() == ["p1"]


def test_a_second_first_key_loses(store: KeyStore) -> None:
    kid, _ = _first(store, "p1")
    assert not store.insert_first(None, "p1", _kid(), _wrapped(), URI)
    assert [r.key_id for r in store.list_keys("p1")] == [kid]


def test_concurrent_first_key_inserts_yield_one_active_key(store: KeyStore) -> None:
    n = 6
    barrier = threading.Barrier(n)
    ids = [_kid() for _ in range(n)]
    won: list[bool] = [False] * n
    errors: list[BaseException] = []

    def insert(i: int) -> None:
        barrier.wait()
        try:
            won[i] = store.insert_first(None, "race", ids[i], _wrapped(), URI)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=insert, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert won.count(True) == 1
    recs = store.list_keys("race")
    assert len(recs) == 1 and recs[0].state == ACTIVE
    assert recs[0].key_id == ids[won.index(True)]


def test_first_key_inside_a_transaction_rolls_back_with_it(store: KeyStore) -> None:
    with store.engine.connect() as conn, conn.begin() as tx:
        # The application's transaction has written already (pysqlite begins on a write).
        assert store.insert(conn, "other", _kid(), _wrapped(), URI) == 1
        assert store.insert_first(conn, "p1", _kid(), _wrapped(), URI)
        assert store.active(conn, "p1")[0] is not None
        tx.rollback()
    assert store.list_keys() == []


def test_rotate_keeps_one_active_key(store: KeyStore) -> None:
    kid1, _ = _first(store, "p1")
    kid2, w2 = _kid(), _wrapped()
    assert store.rotate("p1", kid2, w2, URI, create=False) == 2
    states = {r.key_id: r.state for r in store.list_keys("p1")}
    assert states == {kid1: INACTIVE, kid2: ACTIVE}
    rec, _ = store.active(None, "p1")
    assert rec is not None and rec.wrapped_key == w2
    with pytest.raises(UnknownTenant):
        store.rotate("nobody", _kid(), _wrapped(), URI, create=False)
    assert store.rotate("new", _kid(), _wrapped(), URI, create=True) == 1


def test_concurrent_rotations_each_get_a_version(store: KeyStore) -> None:
    _first(store, "p1")
    n = 4
    barrier = threading.Barrier(n)
    versions: list[int] = []
    errors: list[BaseException] = []

    def rotate() -> None:
        barrier.wait()
        try:
            versions.append(store.rotate("p1", _kid(), _wrapped(), URI, create=False))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=rotate) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert sorted(versions) == [2, 3, 4, 5]
    recs = store.list_keys("p1")
    assert [r.version for r in recs] == [1, 2, 3, 4, 5]
    assert [r.state for r in recs].count(ACTIVE) == 1 and recs[-1].state == ACTIVE


def test_destroy_then_reenable(store: KeyStore) -> None:
    _first(store, "gone")
    store.rotate("gone", _kid(), _wrapped(), URI, create=False)
    assert store.insert_index_root(None, "gone", _kid(), _wrapped(), URI)
    _first(store, "stays")
    with pytest.raises(ConfigurationError, match="not destroyed"):
        store.reenable("gone", _kid(), _wrapped(), URI)

    assert store.destroy("gone") == 3  # both data keys and the index root
    recs = store.list_keys("gone")
    assert {r.state for r in recs} == {DESTROYED}
    assert all(r.wrapped_key is None and r.active_tenant is None for r in recs)
    assert store.destroy("gone") == 0
    assert store.active(None, "stays")[0] is not None
    with pytest.raises(KeyDestroyed, match="reenable"):
        store.rotate("gone", _kid(), _wrapped(), URI, create=True)
    assert not store.insert_first(None, "gone", _kid(), _wrapped(), URI)  # version 1 is taken

    kid, w = _kid(), _wrapped()
    assert store.reenable("gone", kid, w, URI) == 3
    rec, states = store.active(None, "gone")
    assert rec is not None and (rec.key_id, rec.wrapped_key) == (kid, w)
    assert states == {DESTROYED, ACTIVE}
    with pytest.raises(UnknownTenant):
        store.destroy("typo")
    with pytest.raises(UnknownTenant):
        store.reenable("typo", _kid(), _wrapped(), URI)


def test_retire_erases_one_inactive_key(store: KeyStore) -> None:
    kid1, _ = _first(store, "p1")
    kid2 = _kid()
    store.rotate("p1", kid2, _wrapped(), URI, create=False)
    with pytest.raises(ConfigurationError, match="rotate first"):
        store.retire(kid2)
    with pytest.raises(UnknownKey):
        store.retire(_kid())
    before, changed = store.retire(kid1)
    assert changed and before.state == INACTIVE and before.wrapped_key is not None
    after = store.get(kid1)
    assert after is not None and after.state == RETIRED and after.wrapped_key is None
    again, changed = store.retire(kid1)
    assert not changed and again.state == RETIRED


def test_rewrap_is_a_compare_and_set_on_the_master_key(store: KeyStore) -> None:
    kid1, _ = _first(store, "p1")
    kid2, _ = _first(store, "p2")
    recs = {r.key_id: r for r in store.list_keys()}
    new = "file:///another/master.key"
    assert store.rewrap([(recs[kid1], b"new-1")], new) == 1
    # A second rewrap from the same stale read changes nothing.
    assert store.rewrap([(recs[kid1], b"new-again"), (recs[kid2], b"new-2")], new) == 1
    got = {r.key_id: (r.master_key_uri, r.wrapped_key) for r in store.list_keys()}
    assert got == {kid1: (new, b"new-1"), kid2: (new, b"new-2")}
    store.destroy("p2")
    assert store.rewrap([(recs[kid2], b"late")], new) == 0  # destroyed meanwhile
    assert store.get(kid2).wrapped_key is None  # type: ignore[union-attr]


def test_index_roots_are_separate_from_data_keys(store: KeyStore) -> None:
    assert store.index_roots(None, "p1") == ([], set())
    _first(store, "p1")
    assert store.index_roots(None, "p1") == ([], {ACTIVE})
    r1 = _kid()
    assert store.insert_index_root(None, "p1", r1, _wrapped(), URI)
    assert not store.insert_index_root(None, "p1", _kid(), _wrapped(), URI)
    r2 = _kid()
    assert store.rotate_index_root("p1", r2, _wrapped(), URI) == 2
    roots, _ = store.index_roots(None, "p1")
    assert [(r.key_id, r.state, r.kind) for r in roots] == [
        (r2, ACTIVE, INDEX),
        (r1, INACTIVE, INDEX),
    ]
    rec, states = store.active(None, "p1")  # the data key is untouched
    assert rec is not None and rec.kind == "data" and states == {ACTIVE}
    store.destroy("p1")
    with pytest.raises(KeyDestroyed):
        store.rotate_index_root("p1", _kid(), _wrapped(), URI)


def test_batches_page_through_every_key(store: KeyStore) -> None:
    for i in range(7):
        _first(store, f"p{i}")
    batches = list(store.batches(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    ids = [r.key_id.hex() for b in batches for r in b]
    assert ids == sorted(ids) and len(set(ids)) == 7


def test_rows_refuse_an_active_marker_naming_another_practice(store: KeyStore) -> None:
    _first(store, "a")
    t = store.table
    with store.engine.begin() as conn:
        conn.execute(t.update().where(t.c.tenant == "a").values(active_tenant="b"))
    for tenant in ("a", "b"):
        with pytest.raises(KeyStoreInconsistent):
            store.active(None, tenant)


def test_a_table_made_before_key_kinds_is_read_then_upgraded(engine: sa.Engine) -> None:
    keys_table(sa.MetaData(), kinds=False).create(engine)
    old = KeyStore(engine)
    assert "kind" not in old.table.c
    assert old.insert_first(None, "p1", _kid(), _wrapped(), URI)
    with pytest.raises(ConfigurationError, match="carnet init"):
        old.require_kinds()
    KeyStore(engine).create_schema()
    new = KeyStore(engine)
    assert "kind" in new.table.c
    new.require_kinds()
    rec, _ = new.active(None, "p1")
    assert rec is not None and rec.kind == "data"


def test_its_api_takes_wrapped_bytes_never_a_master_key() -> None:
    for name, fn in inspect.getmembers(KeyStore, inspect.isfunction):
        hints = typing.get_type_hints(fn, vars(keystore_module))
        for param, hint in hints.items():
            assert "master_key" not in param or param == "master_key_uri", (name, param)
            assert MasterKey not in typing.get_args(hint) and hint is not MasterKey, (name, param)
        if "wrapped" in hints:
            assert hints["wrapped"] is bytes, name


def test_a_manager_hands_its_store_no_master_key(engine: sa.Engine, master_key_uri: str) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    keys.encrypt(b"note", tenant="p1", label="l")
    keys.rotate("p1")
    keys.index_roots("p1")
    keys.destroy("p1")
    keys.reenable("p1")
    assert isinstance(keys.store, KeyStore)
    assert not [
        v for v in vars(keys.store).values() if isinstance(v, (MasterKey, carnet.KeyManager))
    ]
    # What the store holds is the wrap, not the key: no row equals a cached key's secret.
    assert all(r.wrapped_key is None or len(r.wrapped_key) > 32 for r in keys.list_keys())
    keys.close()


# -- the key table edited by someone with SQL access ---------------------------------------


def test_a_destroyed_practice_rewritten_as_retired_gets_no_key_without_reenable(
    engine: sa.Engine, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    keys.ensure_key("p1")
    keys.rotate("p1")
    keys.destroy("p1")
    t = keys.store.table
    with engine.begin() as conn:
        # The attacker hides the shredding: no row says "destroyed" any more.
        conn.execute(t.update().where(t.c.tenant == "p1").values(state=RETIRED))
    keys.cache.clear()
    with pytest.raises(KeyDestroyed, match="reenable"):
        keys.rotate("p1")
    with pytest.raises(KeyStoreInconsistent, match="reenable"):
        keys.encrypt(b"x", tenant="p1", label="t.c")
    assert not [r for r in keys.store.list_keys("p1") if r.state == ACTIVE]
    keys.reenable("p1")
    assert keys.decrypt(keys.encrypt(b"x", tenant="p1", label="t.c"), tenant="p1", label="t.c")


def test_a_rotation_rolled_back_by_moving_the_active_marker_is_reported(
    engine: sa.Engine, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    keys.ensure_key("p1")
    keys.ensure_key("p2")
    keys.rotate("p1")
    assert keys.key_anomalies() == []
    t = keys.store.table
    with engine.begin() as conn:
        # Back to version 1: the newest key made inactive, the old one active again.
        conn.execute(
            t.update()
            .where(t.c.tenant == "p1", t.c.version == 2)
            .values(state=INACTIVE, active_tenant=None)
        )
        conn.execute(
            t.update()
            .where(t.c.tenant == "p1", t.c.version == 1)
            .values(state=ACTIVE, active_tenant="p1")
        )
    found = keys.key_anomalies()
    assert len(found) == 1 and "'p1'" in found[0] and "rolled back" in found[0]


def test_a_retired_key_rewritten_as_inactive_is_reported(
    engine: sa.Engine, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    old = keys.ensure_key("p1")
    keys.rotate("p1")
    keys.retire(old.key_id)
    t = keys.store.table
    with engine.begin() as conn:
        conn.execute(t.update().where(t.c.key_id == old.key_id.hex()).values(state=INACTIVE))
    found = keys.key_anomalies()
    assert any("version 1 is inactive but holds no key material" in f for f in found)
