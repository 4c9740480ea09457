"""The cost of refusing SQL over ciphertext (carnet.guard): per statement, never per row.

The guard walks each statement once before execution. Measured on SQLite (no
server, so the statement's own Python cost dominates and the guard's share is
as large as it gets), guard off (the listener removed: what carnet did before
the guard) against guard on, interleaved:

- an ORM select of 10,000 notes and a Core select of 10,000 rows: one
  statement each, so the guard's cost vanishes in the per-row work;
- 500 ``Session.get`` and 500 Core selects by primary key, each a new
  statement object: the worst case, where every statement is walked;
- the walk alone per statement shape, next to the cost of building that
  statement, for a new object and for one already checked (remembered).
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from bench.common import Row, interleaved_medians, master_key_uri, repeats, row, scale, temp_dir
from carnet import guard

N_ROWS = 10_000
N_SMALL = 500


class _Base(DeclarativeBase):
    pass


class _Note(_Base):
    __tablename__ = "guard_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


_notes = _Note.__table__


def _guard(on: bool) -> Callable[[], None]:
    def setup() -> None:
        listening = sa.event.contains(sa.Engine, "before_execute", guard._before_execute)
        if on and not listening:
            sa.event.listen(sa.Engine, "before_execute", guard._before_execute, insert=True)
        elif not on and listening:
            sa.event.remove(sa.Engine, "before_execute", guard._before_execute)

    return setup


def _walk_rows() -> list[Row]:
    note, notes = _Note, _notes
    shapes: dict[str, Callable[[], Any]] = {
        "ORM select(Note).where().order_by()": lambda: (
            sa.select(note).where(note.id > 5).order_by(note.id)
        ),
        "Core select(id, body).where(practice_id = :p)": lambda: sa.select(
            notes.c.id, notes.c.body
        ).where(notes.c.practice_id == "p1"),
        "ORM update(Note).where(id = :id).values(body=:b)": lambda: (
            sa.update(note).where(note.id == 1).values(body="x")
        ),
        "select + join subquery + count + group_by": lambda: (
            sa.select(note.practice_id, sa.func.count(note.body))
            .join(
                sa.select(note.id).where(note.body.is_not(None)).subquery("s"),
                sa.literal_column("s.id") == note.id,
            )
            .group_by(note.practice_id)
        ),
    }
    rows: list[Row] = []
    n = scale(2000)
    for name, build in shapes.items():
        fresh = iter([build() for _ in range(n)])
        walk = min(
            timeit.repeat(lambda f=fresh: guard.check_statement(next(f)), number=n // 4, repeat=4)
        ) / (n // 4)
        built = min(timeit.repeat(build, number=n // 4, repeat=4)) / (n // 4)
        again = build()
        guard.check_statement(again)
        cached = (
            min(timeit.repeat(lambda a=again: guard.check_statement(a), number=n, repeat=4)) / n
        )
        rows.append(
            row(
                f"walk: {name}",
                built * 1e6,
                walk * 1e6,
                "µs",
                f"baseline: building the statement; already checked: {cached * 1e6:.2f} µs",
            )
        )
    return rows


def run() -> list[Row]:
    with temp_dir() as d:
        engine = sa.create_engine(f"sqlite:///{d}/guard.db")
        uri = master_key_uri(d)
        keys = carnet.KeyManager(engine, master_key=uri)
        keys.create_schema()
        carnet.configure(keys)
        try:
            return _run(engine)
        finally:
            _guard(True)()
            carnet.configure(None)
            engine.dispose()


def _run(engine: sa.Engine) -> list[Row]:
    n_rows = scale(N_ROWS)
    _Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all(
            _Note(id=i, practice_id=f"p{i % 20}", body=f"note {i} " + "x" * 500)
            for i in range(1, n_rows + 1)
        )
        s.commit()

    def orm_select() -> None:
        with Session(engine) as s:
            assert len(s.scalars(sa.select(_Note)).all()) == n_rows

    def core_select() -> None:
        with engine.connect() as conn:
            assert len(conn.execute(sa.select(_notes.c.id, _notes.c.body)).all()) == n_rows

    def gets() -> None:
        with Session(engine) as s:
            for i in range(1, N_SMALL + 1):
                s.get(_Note, i)

    def core_by_pk() -> None:
        with engine.connect() as conn:
            for i in range(1, N_SMALL + 1):
                conn.execute(sa.select(_notes.c.id).where(_notes.c.id == i)).all()

    bodies = {
        "ORM select of 10,000 notes": orm_select,
        "Core select of 10,000 rows": core_select,
        f"{N_SMALL} × Session.get (one statement each)": gets,
        f"{N_SMALL} × Core select by primary key (new statement each)": core_by_pk,
    }
    cases: dict[str, tuple[Callable[[], object] | None, Callable[[], object]]] = {}
    for name, body in bodies.items():
        body()  # warm SQLAlchemy's compiled cache and carnet's key cache
        cases[f"{name}|off"] = (_guard(False), body)
        cases[f"{name}|on"] = (_guard(True), body)
    med = interleaved_medians(cases, repeats(9))
    rows: list[Row] = []
    for name in bodies:
        off, on = med[f"{name}|off"], med[f"{name}|on"]
        statements = 1 if "select of" in name else N_SMALL
        per_statement = (on - off) * 1e6 / statements
        rows.append(
            row(
                f"{name}: guard off → on",
                off * 1e3,
                on * 1e3,
                "ms",
                f"{per_statement:+.1f} µs per statement",
            )
        )
    _guard(True)()
    return rows + _walk_rows()
