"""The decrypt budget's property, and legacy plaintext reads in the count.

Property: never more than ``limit`` decryptions by one principal in any
interval of ``window`` seconds, and a decryption is refused only when allowing
it would break that. A fixed window let 999 decryptions through in 22 ms
under a 500-per-60-s budget, by straddling the window's edge; mixed-read
legacy values were not counted at all.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

import carnet
from carnet.audit import AuditEvent, Auditor, DecryptBudget, principal_scope
from carnet.errors import DecryptBudgetExceeded

SECRET = "PLANTED-audit-legacy-6e0"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _allowed(budget: DecryptBudget, principal: str = "u", n: int = 1) -> bool:
    try:
        budget.charge(principal, n)
    except DecryptBudgetExceeded:
        return False
    return True


def test_a_burst_straddling_a_window_edge_is_stopped() -> None:
    # Real clock, as deployed: one read, then a burst just before and just after
    # the instant a fixed window would have restarted.
    window = 1.0
    b = DecryptBudget(limit=500, window=window)
    start = time.monotonic()
    b.charge("scraper")
    time.sleep(window * 0.6)
    for _ in range(499):
        b.charge("scraper")
    time.sleep(max(0.0, start + window * 1.05 - time.monotonic()))
    passed = sum(_allowed(b, "scraper") for _ in range(500))
    # Only the first read has left the last `window` seconds.
    assert passed == 1


def test_sliding_window_with_a_controlled_clock() -> None:
    clock = Clock()
    b = DecryptBudget(limit=3, window=10, clock=clock)
    assert [_allowed(b) for _ in range(4)] == [True, True, True, False]
    clock.now += 9.999
    assert not _allowed(b)
    clock.now += 0.001  # the first three are exactly one window old: out
    assert [_allowed(b) for _ in range(4)] == [True, True, True, False]
    assert _allowed(b, "other")  # per principal


def test_refused_reads_do_not_push_the_budget_back() -> None:
    clock = Clock()
    b = DecryptBudget(limit=2, window=10, clock=clock)
    assert _allowed(b) and _allowed(b)
    for _ in range(100):
        clock.now += 0.05
        assert not _allowed(b)
    clock.now = 1010.0
    assert _allowed(b)


def test_a_charge_of_several_is_all_or_nothing() -> None:
    clock = Clock()
    b = DecryptBudget(limit=5, window=10, clock=clock)
    assert _allowed(b, n=3)
    assert not _allowed(b, n=3)
    assert _allowed(b, n=2)
    assert not _allowed(b, n=6)
    clock.now += 10
    assert _allowed(b, n=5)


def test_exempt_principals_are_never_stopped() -> None:
    b = DecryptBudget(limit=1, window=60, exempt=("reencrypt",), clock=Clock())
    assert all(_allowed(b, "reencrypt") for _ in range(50))


def test_idle_principals_are_forgotten() -> None:
    clock = Clock()
    b = DecryptBudget(limit=100, window=10, clock=clock)
    for i in range(5000):
        b.charge(f"user{i}")
    clock.now += 10
    b.charge("late")
    assert len(b._recent) <= 1024


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 6),
    window=st.sampled_from([0.5, 1.0, 2.5]),
    steps=st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 0.1, 0.25, 0.5, 1.0, 3.0]), st.integers(1, 3)),
        max_size=60,
    ),
)
def test_property_never_more_than_limit_in_any_window(
    limit: int, window: float, steps: list[tuple[float, int]]
) -> None:
    clock = Clock(0.0)
    b = DecryptBudget(limit=limit, window=window, clock=clock)
    allowed: list[tuple[float, int]] = []

    def in_window(t: float) -> int:
        # Allowed decryptions in the window of length `window` ending at t.
        return sum(n for s, n in allowed if s <= t and t - s < window)

    for gap, n in steps:
        clock.now += gap
        t = clock.now
        if _allowed(b, n=n):
            allowed.append((t, n))
            assert in_window(t) <= limit
        else:
            # Refused only when allowing it would have broken the property.
            assert in_window(t) + n > limit
    for t, _ in allowed:
        assert in_window(t) <= limit


# -- legacy plaintext reads, through the column type ------------------------------------


@pytest.fixture
def legacy(engine: sa.Engine, master_key_uri: str) -> Iterator[tuple[carnet.KeyManager, sa.Table]]:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    t = sa.Table(
        "legacy_notes",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("note", carnet.EncryptedText(storage="text", mixed_read=True, manager=keys)),
    )
    t.create(engine)
    raw = sa.table("legacy_notes", sa.column("id"), sa.column("note"))
    with engine.begin() as conn:
        conn.execute(raw.insert(), [{"id": i, "note": f"{SECRET} {i}"} for i in range(200)])
    try:
        yield keys, t
    finally:
        keys.close()


def test_legacy_reads_are_counted_and_charged(
    legacy: tuple[carnet.KeyManager, sa.Table], engine: sa.Engine
) -> None:
    keys, t = legacy
    seen: list[AuditEvent] = []
    auditor = Auditor(budget=DecryptBudget(limit=50, window=3600), sink=seen.append).install(keys)
    got: list[str] = []
    with principal_scope("scraper"), carnet.tenant_scope("p1"), engine.connect() as conn:
        with pytest.raises(DecryptBudgetExceeded):
            for (note,) in conn.execute(sa.select(t.c.note).order_by(t.c.id)):
                got.append(note)
    assert len(got) == 50
    events = auditor.flush()
    assert [(e.principal, e.tenant, e.field, e.count, e.legacy) for e in events] == [
        ("scraper", "p1", "legacy_notes.note", 50, 50)
    ]
    assert seen == events
    assert keys.legacy_plaintext_reads == 51  # the refused one was read, never returned
