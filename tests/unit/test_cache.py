from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

import carnet
import carnet.cache as cache_module
from carnet import envelope
from carnet.cache import Dek, IndexRoot, KeyCache, TTLCache


def test_lru_bound_evicts_least_recently_used() -> None:
    c: TTLCache[int] = TTLCache(maxsize=2, ttl=60)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now most recent
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    assert len(c) == 2


def test_entries_expire() -> None:
    c: TTLCache[int] = TTLCache(maxsize=10, ttl=0.05)
    c.put("a", 1)
    assert c.get("a") == 1
    time.sleep(0.08)
    assert c.get("a") is None
    assert c.hits == 1 and c.misses == 1


def test_repr_shows_no_values() -> None:
    c: TTLCache[bytes] = TTLCache(maxsize=10, ttl=1)
    c.put("k", b"SECRET-KEY-MATERIAL")
    assert "SECRET" not in repr(c)


@pytest.mark.parametrize("size,ttl", [(0, 1.0), (1, 0.0)])
def test_bad_configuration(size: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        TTLCache(size, ttl)


# -- KeyCache: a manager's unwrapped keys and fast paths -----------------------------------

SECRET = bytes(range(32))


def _sealer(dek: Dek, label: str = "l") -> envelope.Sealer:
    return envelope.Sealer(dek.cipher, dek.key_id, label, dek.tenant, time.monotonic() + 60)


def _opener(dek: Dek, label: str = "l") -> envelope.Opener:
    return envelope.Opener(dek.cipher, dek.key_id, label, dek.tenant, time.monotonic() + 60)


def _filled() -> tuple[KeyCache, Dek, Dek]:
    c = KeyCache(100, 60)
    a, b = Dek(b"A" * 16, "a", SECRET), Dek(b"B" * 16, "b", SECRET)
    for dek in (a, b):
        c.put_active(dek)
        c.put_sealer(dek.tenant, "l", _sealer(dek))
        c.put_opener(dek.key_id, "l", dek.tenant, _opener(dek))
        c.index_roots.put(dek.tenant, [IndexRoot(dek.key_id, 1, SECRET)])
    return c, a, b


def test_key_cache_forget_practice_drops_only_that_practice() -> None:
    c, a, b = _filled()
    old_a = Dek(b"a" * 16, "a", SECRET)  # an inactive key of a
    c.keys.put(old_a.key_id, old_a)
    c.forget_practice("a")
    assert c.keys.get(a.key_id) is None and c.keys.get(old_a.key_id) is None
    assert c.active.get("a") is None and c.index_roots.get("a") is None
    assert c.keys.get(b.key_id) is b and c.active.get("b") is b and c.index_roots.get("b")
    assert c.sealers == {} and c.openers == {}  # fast paths are rebuilt on demand


def test_key_cache_forget_key_and_retired() -> None:
    c, a, b = _filled()
    c.forget_key("a", a.key_id)
    assert c.keys.get(a.key_id) is None and c.active.get("a") is None
    assert c.index_roots.get("a") is not None and c.sealers == {} and c.openers == {}
    c.forget_retired("b", b.key_id)
    assert c.keys.get(b.key_id) is None and c.index_roots.get("b") is None
    assert c.active.get("b") is b  # the active key is never the retired one


def test_key_cache_put_active_replaces_and_drops_fast_paths() -> None:
    c, a, _ = _filled()
    new = Dek(b"N" * 16, "a", SECRET)
    c.put_active(new)
    assert c.active.get("a") is new and c.keys.get(new.key_id) is new
    assert c.keys.get(a.key_id) is a  # the old key still opens older values
    assert c.sealers == {} and c.openers == {}


def test_key_cache_fast_paths_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "FAST_PATH_MAX", 3)
    c, a, _ = _filled()
    sealers = c.sealers
    for i in range(10):
        c.put_sealer("a", f"l{i}", _sealer(a, f"l{i}"))
        c.put_opener(a.key_id, f"l{i}", "a", _opener(a, f"l{i}"))
        assert len(c.sealers) <= 4 and len(c.openers) <= 4
    assert c.sealers is sealers  # emptied, never replaced: a manager holds the dict itself


def test_key_cache_clear_and_stats() -> None:
    c, a, _ = _filled()
    c.reset_stats()
    assert c.keys.get(a.key_id) is a and c.active.get("zz") is None
    assert c.stats() == {"cache_hits": 1, "cache_misses": 1, "cached_keys": 2}
    c.clear()
    assert len(c.keys) == len(c.active) == len(c.index_roots) == 0
    assert c.sealers == {} and c.openers == {}
    assert c.stats()["cached_keys"] == 0
    with pytest.raises(ValueError):
        KeyCache(0, 1)


def test_key_cache_repr_shows_no_key_material() -> None:
    c, a, _ = _filled()
    for obj in (c, a, c.keys, c.index_roots.get("a")):
        text = repr(obj) + str(obj)
        assert SECRET.hex() not in text and repr(SECRET) not in text


def test_the_manager_seals_through_the_cache_fast_path(
    engine: sa.Engine, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    blob = keys.encrypt(b"note", tenant="p1", label="l")
    assert set(keys.cache.sealers) == {("p1", "l")}
    assert keys.decrypt(blob, tenant="p1", label="l") == b"note"
    assert set(keys.cache.openers) == {(keys.key_id_of(blob), "l", "p1")}
    hits = keys.stats()["cache_hits"]
    keys.encrypt(b"again", tenant="p1", label="l")
    assert keys.stats()["cache_hits"] == hits + 1  # one fast-path hit, no key-cache lookup
    keys.cache.drop_fast_paths()
    keys.encrypt(b"rebuilt", tenant="p1", label="l")
    assert set(keys.cache.sealers) == {("p1", "l")}
    keys.destroy("p1")
    assert keys.cache.sealers == {} and keys.cache.keys.get(keys.key_id_of(blob)) is None
    keys.close()
