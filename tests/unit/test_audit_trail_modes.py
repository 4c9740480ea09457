"""The two modes' written guarantees, as a property: interleaved reads, flushes, crashes and
outages of a real store (a SQLite file another connection locks exclusively).

best_effort: a read is never refused; a live trail's flushed count equals what it
disclosed once the store is back; a crashed one's never exceeds it.
required: a read is refused only when it needs a new block while the store is down;
per writer and key, reserved >= disclosed > reserved - block, crash or not.
"""

from __future__ import annotations

import itertools
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import carnet
from carnet.audit import AuditTrail
from carnet.errors import AuditStoreUnavailable

BLOCK = 3
PRINCIPALS = ("a", "b")
_n = itertools.count()

ops = st.lists(
    st.one_of(
        st.tuples(st.just("read"), st.sampled_from(PRINCIPALS), st.integers(1, 4)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("crash")),
        st.tuples(st.just("down")),
        st.tuples(st.just("up")),
    ),
    max_size=25,
)


@pytest.fixture(scope="module")
def sqlite_keys() -> Iterator[carnet.KeyManager]:
    from carnet.providers import create_master_key

    d = Path(tempfile.mkdtemp())
    uri = f"file://{d}/master.key"
    create_master_key(uri).close()
    keys = carnet.KeyManager(sa.create_engine(f"sqlite:///{d}/keys.db"), master_key=uri)
    keys.create_schema()
    yield keys
    keys.close()


class World:
    def __init__(self, keys: carnet.KeyManager, mode: str) -> None:
        self.keys = keys
        self.mode = mode
        self.path = Path(tempfile.mkdtemp()) / f"audit-{next(_n)}.db"
        self.url = f"sqlite:///{self.path}"
        self.locker: sa.Connection | None = None
        self.lock_engine = sa.create_engine(self.url, connect_args={"timeout": 0.05})
        self.disclosed: Counter[tuple[str, str]] = Counter()  # (writer, principal)
        self.flushed: Counter[tuple[str, str]] = Counter()  # what a successful flush covered
        self.crashed: set[str] = set()
        self.trail = self._new()

    def _new(self) -> AuditTrail:
        t = AuditTrail(
            self.keys, self.url, mode=self.mode, block=BLOCK, background=False, timeout=0.05
        )
        t.process = f"{t.process}/{next(_n)}"  # one writer per trail, as one per process
        return t

    def step(self, op: tuple[object, ...]) -> None:
        t = self.trail
        if op[0] == "read":
            principal, n = str(op[1]), int(op[2])  # type: ignore[call-overload]
            for _ in range(n):
                try:
                    t.disclosed(principal, "p1", "notes.body", 1, 0)
                except AuditStoreUnavailable:
                    assert self.mode == "required" and self.locker is not None
                    continue
                self.disclosed[(t.process, principal)] += 1
        elif op[0] == "flush":
            before = {k: v for k, v in self.disclosed.items() if k[0] == t.process}
            ok = t.flush()
            assert ok == (self.locker is None) or not t.pending()
            if ok:
                self.flushed.update({k: v - self.flushed[k] for k, v in before.items()})
        elif op[0] == "crash":
            # The process dies: its memory is gone, nothing more is written by it.
            self.crashed.add(t.process)
            self.trail = self._new() if self.locker is None else self._new_when_down()
        elif op[0] == "down" and self.locker is None:
            self.locker = self.lock_engine.connect()
            self.locker.exec_driver_sql("BEGIN EXCLUSIVE")
        elif op[0] == "up" and self.locker is not None:
            self.locker.exec_driver_sql("ROLLBACK")
            self.locker.close()
            self.locker = None

    def _new_when_down(self) -> AuditTrail:
        # A restart while the store is down: best_effort starts anyway; required refuses.
        if self.mode == "required":
            self.step(("up",))
            t = self._new()
            self.step(("down",))
            return t
        return self._new()

    def check(self) -> None:
        self.step(("up",))
        assert self.trail.flush()
        counts: dict[tuple[str, str, str], int] = Counter()
        for r in self.trail.store.walk():
            counts[(str(r["kind"]), str(r["process"]), str(r["principal"]))] += int(r["count"])  # type: ignore[call-overload]
        assert self.trail.store.verify().ok
        for (writer, principal), n in self.disclosed.items():
            read = counts[("read", writer, principal)]
            if self.mode == "required":
                reserved = counts[("reserve", writer, principal)]
                assert reserved >= n > reserved - BLOCK
            if writer in self.crashed:
                assert self.flushed[(writer, principal)] <= read <= n
            else:
                assert read == n
        self.lock_engine.dispose()
        self.trail.store.engine.dispose()


@pytest.mark.parametrize("mode", ["best_effort", "required"])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(program=ops)
def test_mode_guarantees(
    sqlite_keys: carnet.KeyManager, mode: str, program: list[tuple[object, ...]]
) -> None:
    world = World(sqlite_keys, mode)
    for op in program:
        world.step(op)
    world.check()
