from __future__ import annotations

import time

import pytest

from carnet.cache import TTLCache


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
