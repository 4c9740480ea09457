"""The best_effort trail's count per ORM result (AuditTrail._tally): what an ORM load opens
is counted in the result, not by a call per value, and every flush takes exactly what was
opened so far, whether the result is still being read, finished, or dropped half read.

A property drives several streaming ORM results over real databases, read in chunks
under their principals, interleaved with flushes, results dropped (and collected), and
the manager's hook swapped for none or for another hook mid-result; after every flush
the store holds, per principal, practice and field, exactly what the trail's hook was
installed for when it was opened.
"""

from __future__ import annotations

import gc
import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

import carnet
from carnet.audit import AuditTrail, principal_scope
from carnet.audit_store import AuditStore
from support.models import Note

PRACTICES = ("p0", "p1", "p2")
N_NOTES = 12
FIELDS = ("notes.body", "notes.summary")
SECRET = "PLANTED-tally-note"
_n = itertools.count()


@pytest.fixture
def notes(keys: carnet.KeyManager, engine: sa.Engine) -> dict[int, str]:
    with Session(engine) as s:
        s.add_all(
            Note(
                id=i,
                practice_id=PRACTICES[i % len(PRACTICES)],
                body=f"{SECRET} {i}",
                summary=f"summary {i}",
            )
            for i in range(1, N_NOTES + 1)
        )
        s.commit()
    return {i: PRACTICES[i % len(PRACTICES)] for i in range(1, N_NOTES + 1)}


def _written(store: AuditStore) -> Counter[tuple[str, str, str]]:
    got: Counter[tuple[str, str, str]] = Counter()
    for r in store.walk():
        if r["kind"] == "read":
            got[(str(r["principal"]), str(r["practice"]), str(r["field"]))] += int(r["count"])  # type: ignore[call-overload]
    return got


class Reading:
    """One ORM result being read in chunks by one principal, in its own Session."""

    def __init__(self, engine: sa.Engine, principal: str, chunk: int) -> None:
        self.principal = principal
        self.chunk = chunk
        self.session = Session(engine)
        stmt = sa.select(Note).order_by(Note.id).execution_options(yield_per=chunk)
        with principal_scope(principal):
            self.rows: Iterator[Note] | None = iter(self.session.scalars(stmt))

    def pull(self) -> list[Note]:
        """One chunk: every value of it is opened as its first row is loaded."""
        got: list[Note] = []
        with principal_scope(self.principal):
            for note in itertools.islice(self.rows or iter(()), self.chunk):
                got.append(note)
        return got

    def drop(self) -> None:
        self.rows = None
        self.session.close()


class World:
    def __init__(self, engine: sa.Engine, keys: carnet.KeyManager, tmp: Path) -> None:
        self.engine = engine
        self.keys = keys
        # The trail's store in a database of its own: a result left open mid-stream
        # holds a read lock on a SQLite file; the store's writes must not wait for it.
        url = f"sqlite:///{tmp}/audit-{next(_n)}.db"
        # The background flusher (and so the hook that counts per result) with an
        # interval that never comes: the flushes are the program's.
        self.trail = AuditTrail(keys, url, flush_every=3600)
        self.trail.install(keys)
        self.hook = keys.decrypt_hook
        self.calls: Counter[tuple[str, str]] = Counter()

        def other(tenant: str, field: str, count: int) -> None:
            self.calls[(tenant, field)] += count

        self.other = other
        self.installed: Any = self.hook
        self.readings: list[Reading] = []
        self.opened: Counter[tuple[str, str, str]] = Counter()  # under the trail's hook
        self.opened_other: Counter[tuple[str, str]] = Counter()
        self.texts: dict[int, str] = {}

    def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "open" and len(self.readings) < 3:
            self.readings.append(Reading(self.engine, op[1], op[2]))
        elif kind == "pull" and self.readings:
            r = self.readings[op[1] % len(self.readings)]
            for note in r.pull():
                assert note.body == f"{SECRET} {note.id}"
                for field in FIELDS:
                    if self.installed is self.hook:
                        self.opened[(r.principal, note.practice_id or "", field)] += 1
                    elif self.installed is self.other:
                        self.opened_other[(note.practice_id or "", field)] += 1
        elif kind == "drop" and self.readings:
            self.readings.pop(op[1] % len(self.readings)).drop()
            if op[2]:
                gc.collect()
        elif kind == "hook":
            self.installed = {"trail": self.hook, "other": self.other, "none": None}[op[1]]
            self.keys.decrypt_hook = self.installed
        elif kind == "flush":
            self.check()

    def check(self) -> None:
        assert self.trail.flush()
        assert +_written(self.trail.store) == +self.opened
        assert self.trail.counters()["carnet_audit_reads_total"] == sum(self.opened.values())
        assert +self.calls == +self.opened_other

    def finish(self) -> None:
        for r in self.readings:
            r.drop()
        self.readings.clear()
        gc.collect()
        self.check()
        assert self.trail.close()
        assert self.trail.store.verify().ok
        self.trail.store.engine.dispose()
        self.keys.decrypt_hook = None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(["dr.a", "dr.b"]), st.sampled_from([1, 2, 5])),
        st.tuples(st.just("pull"), st.integers(0, 2)),
        st.tuples(st.just("drop"), st.integers(0, 2), st.booleans()),
        st.tuples(st.just("hook"), st.sampled_from(["trail", "trail", "other", "none"])),
        st.tuples(st.just("flush")),
    ),
    max_size=30,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(program=ops)
def test_every_flush_takes_exactly_what_orm_results_opened(
    keys: carnet.KeyManager,
    engine: sa.Engine,
    notes: dict[int, str],
    tmp_path: Path,
    program: list[tuple[Any, ...]],
) -> None:
    world = World(engine, keys, tmp_path)
    try:
        for op in program:
            world.step(op)
        world.finish()
    finally:
        for r in world.readings:
            r.drop()
        keys.decrypt_hook = None


@pytest.fixture
def trail(keys: carnet.KeyManager, tmp_path: Path) -> Iterator[AuditTrail]:
    """A best_effort trail installed as an application does, its store a file of its own."""
    trail = AuditTrail(keys, f"sqlite:///{tmp_path}/audit.db", flush_every=3600)
    trail.install(keys)
    assert keys.decrypt_hook.tally is not None  # type: ignore[union-attr]
    yield trail
    trail.close()
    keys.decrypt_hook = None
    trail.store.engine.dispose()


def test_a_result_read_in_part_is_counted_at_each_flush_and_once(
    trail: AuditTrail, engine: sa.Engine, notes: dict[int, str]
) -> None:
    reading = Reading(engine, "dr.partial", 6)
    try:
        first = reading.pull()
        # One count per practice and field, kept by the result (the first value
        # of each went through the hook, which warmed its opener).
        assert len(trail._tallies) == len(PRACTICES) * len(FIELDS)
        assert trail.flush()
        # The first six rows: two of each practice, each with two encrypted fields.
        assert _written(trail.store) == {("dr.partial", p, f): 2 for p in PRACTICES for f in FIELDS}
        assert trail.pending() == 0 and trail.flush()
        assert sum(_written(trail.store).values()) == 2 * len(first)
        second = reading.pull()
        assert len(first) + len(second) == N_NOTES
    finally:
        reading.drop()
    assert trail.flush()
    assert _written(trail.store) == {("dr.partial", p, f): 4 for p in PRACTICES for f in FIELDS}
    assert trail.store.verify().ok
    # Each record's span: the second pull's records begin after the first's end
    # (the count's first read moves to the flush that took the rest).
    reads = [r for r in trail.store.walk() if r["kind"] == "read"]
    half = len(PRACTICES) * len(FIELDS)
    assert len(reads) == 2 * half
    assert all(str(r["first_at"]) <= str(r["last_at"]) for r in reads)
    assert min(str(r["first_at"]) for r in reads[half:]) >= max(
        str(r["last_at"]) for r in reads[:half]
    )


def test_a_result_dropped_half_read_keeps_its_count(
    trail: AuditTrail, engine: sa.Engine, notes: dict[int, str]
) -> None:
    reading = Reading(engine, "dr.gone", 3)
    assert len(reading.pull()) == 3
    assert trail._tallies
    reading.drop()
    del reading
    gc.collect()
    # Nothing holds the result any more: its tallies were queued as it was freed.
    assert not trail._tallies
    assert trail.flush()
    assert _written(trail.store) == {("dr.gone", p, f): 1 for p in PRACTICES for f in FIELDS}


def test_no_note_in_what_a_tally_keeps(
    trail: AuditTrail, engine: sa.Engine, notes: dict[int, str]
) -> None:
    reading = Reading(engine, "dr.repr", 12)
    try:
        reading.pull()
        kept = repr(list(trail._tallies.values())) + repr(list(trail._ended))
        assert "notes.body" in kept and SECRET not in kept
    finally:
        reading.drop()


@pytest.mark.parametrize("swap", ["other", "none"])
def test_a_hook_swapped_mid_result_is_called_per_value_from_then_on(
    keys: carnet.KeyManager, engine: sa.Engine, notes: dict[int, str], tmp_path: Path, swap: str
) -> None:
    world = World(engine, keys, tmp_path)
    try:
        for op in [("open", "dr.swap", 2), ("pull", 0), ("pull", 0), ("hook", swap), ("pull", 0)]:
            world.step(op)
        world.step(("hook", "trail"))
        world.step(("pull", 0))
        world.step(("flush",))
        assert sum(world.opened.values()) == 3 * 2 * len(FIELDS)
        assert sum(world.opened_other.values()) == (2 * len(FIELDS) if swap == "other" else 0)
        world.finish()
    finally:
        for r in world.readings:
            r.drop()
        keys.decrypt_hook = None


@pytest.mark.parametrize("hook", ["installed", "trail itself"])
def test_required_mode_reserves_before_every_value_an_orm_load_opens(
    keys: carnet.KeyManager, engine: sa.Engine, notes: dict[int, str], tmp_path: Path, hook: str
) -> None:
    # No count per result in required mode: each value is covered by a committed
    # reservation before it opens, warm opener or not.
    block = 2
    trail = AuditTrail(
        keys, f"sqlite:///{tmp_path}/audit.db", mode="required", block=block, flush_every=3600
    )
    trail.install(keys)
    if hook == "trail itself":
        keys.decrypt_hook = trail
    assert getattr(keys.decrypt_hook, "tally", None) is None
    try:
        reading = Reading(engine, "dr.required", N_NOTES)
        assert len(reading.pull()) == N_NOTES
        reading.drop()
        assert trail.flush()
        reserved: Counter[tuple[str, str, str]] = Counter()
        for r in trail.store.walk():
            if r["kind"] == "reserve":
                reserved[(str(r["principal"]), str(r["practice"]), str(r["field"]))] += int(
                    r["count"]
                )  # type: ignore[call-overload]
        read = _written(trail.store)
        per_key = N_NOTES // len(PRACTICES)
        assert read == {("dr.required", p, f): per_key for p in PRACTICES for f in FIELDS}
        for key, n in read.items():
            assert reserved[key] >= n > reserved[key] - block
    finally:
        trail.close()
        keys.decrypt_hook = None
