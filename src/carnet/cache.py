"""The caches of unwrapped keys: a bounded LRU cache with a time-to-live, and
:class:`KeyCache`, which holds a key manager's data keys, index roots and the
per-value fast paths built on them.

Master-key calls then grow with the number of tenants, not rows. The
time-to-live bounds how long a process keeps decrypting after another process
destroyed or retired a key; :class:`DeadlineWatch` ends the per-value fast
paths at it, so a warm value need not read the clock.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from . import _aead, envelope

V = TypeVar("V")

# Fast-path entries kept before the dicts are emptied and rebuilt on demand.
FAST_PATH_MAX = 100_000


class DeadlineWatch:
    """Ends the fast paths' entries (:class:`~carnet.envelope.Sealer`,
    :class:`~carnet.envelope.Opener`) at their deadline, from one daemon thread.

    A warm value's path (the column type's processors, the ORM's row getter,
    the manager's hot paths) tests an entry's ``live`` flag instead of reading
    the clock for every value: ``time.monotonic()`` is about a twentieth of a
    warm read. ``live`` is True only while this process's watch thread holds
    the entry with its deadline ahead:

    - the thread sets it False when the deadline passes (late by at most the
      time the thread waits for the interpreter lock: milliseconds, against a
      time-to-live of minutes);
    - the cache sets it False when it drops the entry (a rotation, a destroyed
      practice);
    - after a fork, no entry is live in the child (the thread did not survive
      it), until the child's own thread watches it.

    An entry that is not live is not thereby expired: the fast paths then read
    the clock, as they always did. So a thread that cannot start, an entry the
    cache never stored, or the instant between a deadline and the thread's turn
    is served by the clock, never past the deadline by more than that instant.
    """

    # Entries dropped before their deadline wait in the heap, weakly referenced,
    # until it; past this many, the heap keeps only the live ones.
    _HEAP_MAX = 4 * FAST_PATH_MAX

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, weakref.ref[Any]]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, entry: envelope.Sealer | envelope.Opener) -> None:
        """Make ``entry`` live until its ``expires``, if a thread can end it then."""
        deadline = entry.expires
        if not time.monotonic() < deadline < float("inf"):
            return
        ref = weakref.ref(entry)
        with self._lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="carnet-key-expiry", daemon=True)
                try:
                    thread.start()
                except RuntimeError:
                    # No thread (the interpreter shutting down, a thread limit):
                    # the entry stays not live and its readers read the clock.
                    return
                self._thread = thread
            if len(self._heap) >= self._HEAP_MAX:
                self._heap = [e for e in self._heap if _is_live(e[2])]
                heapq.heapify(self._heap)
            heapq.heappush(self._heap, (deadline, next(self._seq), ref))
            entry.live = True
            if self._heap[0][2] is ref:
                self._wake.notify()

    def _run(self) -> None:
        try:
            with self._lock:
                while True:
                    heap = self._heap
                    now = time.monotonic()
                    while heap and heap[0][0] <= now:
                        entry = heapq.heappop(heap)[2]()
                        if entry is not None:
                            entry.live = False
                    self._wake.wait(heap[0][0] - now if heap else None)
        finally:
            # Whatever stopped the thread, nothing it watched stays live.
            with self._lock:
                self._end_all()

    def _end_all(self) -> None:
        for _, _, ref in self._heap:
            entry = ref()
            if entry is not None:
                entry.live = False
        self._heap = []
        self._thread = None

    def _after_fork_in_child(self) -> None:
        # Only the forking thread survives a fork: the watch thread is gone, and
        # its lock may have been held by it. Nothing stays live without it.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._end_all()


def _is_live(ref: weakref.ref[Any]) -> bool:
    entry = ref()
    return entry is not None and bool(entry.live)


# One watch per process: the thread starts with the first entry it watches.
WATCH = DeadlineWatch()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=WATCH._after_fork_in_child)


class TTLCache(Generic[V]):
    def __init__(self, maxsize: int, ttl: float) -> None:
        if maxsize < 1:
            raise ValueError("cache size must be at least 1")
        if ttl <= 0:
            raise ValueError("cache time-to-live must be positive")
        self.maxsize = maxsize
        self.ttl = ttl
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        entry = self._data.get(key)
        if entry is not None:
            if entry[0] > time.monotonic():
                self.hits += 1
                try:
                    self._data.move_to_end(key)
                except KeyError:  # evicted by another thread meanwhile; the value is still good
                    pass
                return entry[1]
            with self._lock:
                self._data.pop(key, None)
        self.misses += 1
        return None

    def expiry(self, key: Hashable) -> float | None:
        """Monotonic time at which the entry expires, or None if absent."""
        entry = self._data.get(key)
        return entry[0] if entry is not None else None

    def peek(self, key: Hashable) -> bool:
        """Whether a live entry exists, without counting a hit or a miss."""
        entry = self._data.get(key)
        return entry is not None and entry[0] > time.monotonic()

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._data[key] = (time.monotonic() + self.ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def drop_where(self, predicate: Callable[[V], bool]) -> int:
        """Drop every entry whose value satisfies ``predicate``; return how many."""
        with self._lock:
            doomed = [k for k, (_, v) in self._data.items() if predicate(v)]
            for k in doomed:
                del self._data[k]
        return len(doomed)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        # Entries hold key material: show counts only.
        return f"<TTLCache {len(self._data)}/{self.maxsize} ttl={self.ttl}s>"


class Dek:
    """An unwrapped data key, held only in the cache. Never printed."""

    __slots__ = ("key_id", "tenant", "cipher")

    def __init__(self, key_id: bytes, tenant: str, secret: bytes) -> None:
        self.key_id = key_id
        self.tenant = tenant
        self.cipher = _aead.cipher(secret)

    def __repr__(self) -> str:
        return f"<DEK {self.key_id.hex()} tenant={self.tenant!r}>"


class IndexRoot:
    """An unwrapped blind-index root key, held only in the cache. Never printed."""

    __slots__ = ("key_id", "version", "secret", "derived")

    def __init__(self, key_id: bytes, version: int, secret: bytes) -> None:
        self.key_id = key_id
        self.version = version
        self.secret = secret
        # Per-index keys derived from this root (carnet.indexkeys), dropped with it.
        self.derived: dict[tuple[str, str, str], Any] = {}

    def __repr__(self) -> str:
        return f"<IndexRoot {self.key_id.hex()} v{self.version}>"


class KeyCache:
    """A key manager's unwrapped keys and the fast paths built on them.

    ``keys``: data keys by key id; ``active``: each practice's active data
    key; ``index_roots``: each practice's usable index roots. ``sealers`` and
    ``openers`` are the per-value fast paths, ``(practice, label)`` and
    ``(key id, label, practice)`` to an envelope Sealer/Opener expiring with
    the data key it holds: the manager looks them up directly (one dict get
    per value) and stores them through :meth:`put_sealer`/:meth:`put_opener`.
    The two dicts are never replaced, only emptied.
    """

    def __init__(self, maxsize: int, ttl: float) -> None:
        self.keys: TTLCache[Dek] = TTLCache(maxsize, ttl)
        self.active: TTLCache[Dek] = TTLCache(maxsize, ttl)
        self.index_roots: TTLCache[list[IndexRoot]] = TTLCache(maxsize, ttl)
        self.sealers: dict[tuple[str, str], envelope.Sealer] = {}
        self.openers: dict[tuple[bytes, str, str], envelope.Opener] = {}

    @property
    def ttl(self) -> float:
        return self.keys.ttl

    def put_sealer(self, tenant: str, label: str, sealer: envelope.Sealer) -> None:
        if len(self.sealers) > FAST_PATH_MAX:
            self.sealers.clear()
        WATCH.watch(sealer)
        self.sealers[(tenant, label)] = sealer

    def put_opener(self, key_id: bytes, label: str, tenant: str, opener: envelope.Opener) -> None:
        if len(self.openers) > FAST_PATH_MAX:
            self.openers.clear()
        WATCH.watch(opener)
        self.openers[(key_id, label, tenant)] = opener

    def put_active(self, dek: Dek) -> None:
        """``dek`` is now its practice's active key (a rotation, a re-enable)."""
        self.keys.put(dek.key_id, dek)
        self.active.put(dek.tenant, dek)
        self.drop_fast_paths()

    def drop_fast_paths(self) -> None:
        # Expired as well as forgotten: a column's result processor may hold the
        # last opener it used (carnet.types), and must not use it past this point.
        for opener in self.openers.values():
            opener.live = False
            opener.expires = 0.0
        for sealer in self.sealers.values():
            sealer.live = False
            sealer.expires = 0.0
        self.sealers.clear()
        self.openers.clear()

    def forget_key(self, tenant: str, key_id: bytes) -> None:
        """Drop one data key, and the practice's active key (the key was never committed)."""
        self.active.pop(tenant)
        self.keys.pop(key_id)
        self.drop_fast_paths()

    def forget_retired(self, tenant: str, key_id: bytes) -> None:
        """Drop one retired key and the practice's index roots (the key may have been one)."""
        self.keys.pop(key_id)
        self.index_roots.pop(tenant)
        self.drop_fast_paths()

    def forget_practice(self, tenant: str) -> None:
        """Drop every key of ``tenant`` (destroyed)."""
        self.drop_fast_paths()
        self.active.pop(tenant)
        self.index_roots.pop(tenant)
        self.keys.drop_where(lambda dek: dek.tenant == tenant)

    def clear(self) -> None:
        self.keys.clear()
        self.active.clear()
        self.index_roots.clear()
        self.drop_fast_paths()

    def stats(self) -> dict[str, int]:
        """Hits and misses of the data-key caches (fast-path hits are the manager's)."""
        return {
            "cache_hits": self.keys.hits + self.active.hits,
            "cache_misses": self.keys.misses + self.active.misses,
            "cached_keys": len(self.keys),
        }

    def reset_stats(self) -> None:
        self.keys.hits = self.keys.misses = self.active.hits = self.active.misses = 0

    def __repr__(self) -> str:
        # Entries hold key material: show counts only.
        return f"<KeyCache {len(self.keys)} keys, {len(self.active)} active, ttl={self.ttl}s>"
