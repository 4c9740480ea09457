from __future__ import annotations

import os
import threading
import time

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

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


# -- DeadlineWatch: the fast paths' entries end at their deadline -------------------------

# How late the watch thread may end an entry: it needs the interpreter lock, which
# a busy thread holds for the switch interval (5 ms); generous for a loaded machine.
LATE = 0.25


def _entry(seconds: float) -> envelope.Opener:
    dek = Dek(b"W" * 16, "w", SECRET)
    return envelope.Opener(dek.cipher, dek.key_id, "l", "w", time.monotonic() + seconds)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(min_value=-0.05, max_value=0.3), min_size=1, max_size=8))
def test_a_watched_entry_is_live_only_before_its_deadline_and_ends(offsets: list[float]) -> None:
    watch = cache_module.DeadlineWatch()
    entries = [_entry(s) for s in offsets]
    for e in entries:
        watch.watch(e)
        if e.expires > time.monotonic():
            assert e.live  # ahead when watched, so live at once
        else:
            # Past (or just passed): not live, or about to be ended.
            assert not e.live or time.monotonic() < e.expires + LATE
    stop = time.monotonic() + max(offsets) + LATE + 0.5
    while time.monotonic() < stop:
        now = time.monotonic()
        for e in entries:
            # Never live past its deadline by more than the thread's turn.
            assert not e.live or now < e.expires + LATE
        if not any(e.live for e in entries):
            break
        time.sleep(0.005)
    assert not any(e.live for e in entries)


def test_a_watched_entry_is_live_at_once_and_a_dropped_one_stops_at_once() -> None:
    c = KeyCache(100, 60)
    dek = Dek(b"A" * 16, "a", SECRET)
    opener, sealer = _opener(dek), _sealer(dek)
    assert not opener.live and not sealer.live  # not stored: the clock decides
    c.put_opener(dek.key_id, "l", "a", opener)
    c.put_sealer("a", "l", sealer)
    assert opener.live and sealer.live
    c.drop_fast_paths()
    assert not opener.live and not sealer.live
    assert opener.expires == sealer.expires == 0.0


def test_without_a_thread_no_entry_is_live(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    watch = cache_module.DeadlineWatch()
    monkeypatch.setattr(threading.Thread, "start", refuse)
    e = _entry(60)
    watch.watch(e)
    assert not e.live


def test_a_forked_child_has_no_live_entry_until_its_own_thread_watches_one() -> None:
    dek = Dek(b"F" * 16, "f", SECRET)
    held = _opener(dek)
    cache_module.WATCH.watch(held)
    assert held.live
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without pytest's teardown
        try:
            inherited = held.live
            fresh = _entry(0.2)
            cache_module.WATCH.watch(fresh)
            live_at_once = fresh.live
            time.sleep(0.2 + LATE + 0.3)
            os.write(write, f"{inherited} {live_at_once} {fresh.live}".encode())
        finally:
            os._exit(0)
    os.close(write)
    got = os.read(read, 100).decode()
    os.waitpid(pid, 0)
    os.close(read)
    assert got == "False True False"
    assert held.live  # the parent's thread still watches it


def test_an_entry_ends_past_its_deadline_while_the_process_is_busy() -> None:
    # The thread takes the interpreter lock from a thread that never sleeps.
    e = _entry(0.1)
    cache_module.WATCH.watch(e)
    stop = time.monotonic() + 0.1 + LATE
    n = 0
    while e.live and time.monotonic() < stop + 1:
        n += 1
    assert not e.live and time.monotonic() < stop
