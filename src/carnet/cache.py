"""A bounded LRU cache with a time-to-live, for unwrapped data keys.

Master-key calls then grow with the number of tenants, not rows. The
time-to-live bounds how long a process keeps decrypting after another process
destroyed or retired a key.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


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
