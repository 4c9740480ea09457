"""The write cost of the database checks (carnet.dbchecks), checks on / checks off.

Side by side in one run, on the same database and data, with tables that
differ only in ``info={"carnet_checks": False}`` (no constraint, no trigger):

- ORM insert of 2,000 notes (``EncryptedText(tenant="practice_id")``);
- Core executemany insert of the same rows in a ``tenant_scope``;
- ORM update of every note's body (objects loaded untimed; the flush timed);
- ORM insert of 2,000 consultations whose practice is their patient's
  (``tenant="patient.practice_id"``: a trigger reads the parent row);

and, for reference, each with checks against a plain ``Text`` table.

What the checks cost is spent in the database: in this process on SQLite,
in the server on PostgreSQL and MariaDB. So the clock here is the CPU time of
this process plus that of the server process (PostgreSQL: the backend of
each pooled connection) or thread (MariaDB: the connection's thread, found
by the CPU a ``BENCHMARK()`` call burns on it), read from
``/proc/<id>/schedstat``. When the server is not on this machine, or its
threads cannot be read, the clock falls back to wall time and the notes say
so. Wall-time ratios are given in the notes too.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

import carnet
from bench.bench_core import core_insert
from bench.common import (
    Row,
    mariadb_database,
    master_key_uri,
    postgres_database,
    repeats,
    row,
    scale,
    temp_dir,
)
from carnet import _synthetic

N_NOTES = 2_000
N_TENANTS = 20
N_PATIENTS = 200


# -- the server's CPU time ------------------------------------------------------------------


def _schedstat(tid: int) -> float:
    """Seconds on CPU of a process or thread (``/proc/<id>/schedstat``, nanoseconds)."""
    with open(f"/proc/{tid}/schedstat", encoding="ascii") as f:
        return int(f.read().split()[0]) / 1e9


def _mariadbd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in ("mariadbd", "mysqld"):
                    return int(entry.name)
    return None


def _mariadb_thread(dbapi_conn: Any, pid: int) -> int | None:
    """The mariadbd thread serving ``dbapi_conn``: the one a BENCHMARK() call keeps busy."""
    tasks = Path(f"/proc/{pid}/task")

    def snap() -> dict[int, float]:
        out = {}
        for t in tasks.iterdir():
            with contextlib.suppress(OSError, ValueError):
                out[int(t.name)] = _schedstat(int(t.name))
        return out

    # The busiest thread during the call, the same in two of up to five
    # trials: ours (another client's thread would have to win as often).
    wins: dict[int, int] = {}
    for _ in range(5):
        before = snap()
        cur = dbapi_conn.cursor()
        cur.execute("SELECT BENCHMARK(1000000, MD5('carnet'))")
        cur.fetchall()
        cur.close()
        after = snap()
        deltas = sorted(((after[t] - before.get(t, 0.0), t) for t in after), reverse=True)
        if deltas and deltas[0][0] >= 0.02:
            tid = deltas[0][1]
            wins[tid] = wins.get(tid, 0) + 1
            if wins[tid] == 2:
                return tid
    return None


class ServerClock:
    """CPU seconds of this process plus the server side of ``engine``'s connections."""

    def __init__(self, engine: sa.Engine) -> None:
        self.ids: set[int] = set()
        self.kind = "process CPU time"
        name = engine.dialect.name
        if name == "sqlite":
            return
        host = engine.url.host or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            self.kind = "wall-clock time (remote server)"
            return
        self.kind = f"process + {'backend' if name == 'postgresql' else 'server thread'} CPU time"
        self.pid = _mariadbd_pid() if name != "postgresql" else None
        if name != "postgresql" and self.pid is None:
            self.kind = "wall-clock time (no mariadbd process here)"
            return
        self.failed = False

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            if name == "postgresql":
                cur = dbapi_conn.cursor()
                cur.execute("SELECT pg_backend_pid()")
                self.ids.add(int(cur.fetchone()[0]))
                cur.close()
                return
            assert self.pid is not None  # noqa: S101 - checked above
            tid = _mariadb_thread(dbapi_conn, self.pid)
            if tid is None:
                self.failed = True
            else:
                self.ids.add(tid)

    @property
    def wall(self) -> bool:
        return self.kind.startswith("wall") or getattr(self, "failed", False)

    def __call__(self) -> float:
        if self.wall:
            return time.perf_counter()
        server = 0.0
        for tid in self.ids:
            with contextlib.suppress(OSError):
                server += _schedstat(tid)
        return time.process_time() + server


def _measure(
    cases: dict[str, tuple[Callable[[], object] | None, Callable[[], object]]],
    n: int,
    clock: ServerClock,
) -> tuple[dict[str, float], dict[str, float]]:
    """Medians of each case over ``n`` interleaved rounds: (CPU or fallback clock, wall)."""
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    wall: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(n):
        for name, (setup, body) in cases.items():
            if setup is not None:
                setup()
            gc.collect()
            gc.disable()
            try:
                c0, w0 = clock(), time.perf_counter()
                body()
                c1, w1 = clock(), time.perf_counter()
            finally:
                gc.enable()
            cpu[name].append(c1 - c0)
            wall[name].append(w1 - w0)
    return (
        {k: statistics.median(v) for k, v in cpu.items()},
        {k: statistics.median(v) for k, v in wall.items()},
    )


# -- models ---------------------------------------------------------------------------------


class _Models:
    """Notes and consultations, checked and unchecked, and a plain Text reference."""

    def __init__(self, keys: carnet.KeyManager) -> None:
        class Base(DeclarativeBase):
            pass

        def note(name: str, body: Any, checks: bool) -> type[Any]:
            attrs: dict[str, Any] = {
                "__tablename__": name,
                "__annotations__": {"id": Mapped[int], "practice_id": Mapped[str]},
                "id": mapped_column(sa.Integer, primary_key=True),
                "practice_id": mapped_column(sa.String(64), index=True),
                "body": mapped_column(body, nullable=True),
            }
            if not checks:
                attrs["__table_args__"] = {"info": {"carnet_checks": False}}
            return type(name, (Base,), attrs)

        def enc(tenant: str) -> carnet.EncryptedText:
            return carnet.EncryptedText(tenant=tenant, manager=keys)

        self.note_on = note("ck_notes_on", enc("practice_id"), True)
        self.note_off = note("ck_notes_off", enc("practice_id"), False)
        self.note_plain = note("ck_notes_plain", sa.Text(), True)

        class Patient(Base):
            __tablename__ = "ck_patients"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            practice_id: Mapped[str] = mapped_column(sa.String(64))

        def consult(name: str, body: Any, checks: bool) -> type[Any]:
            attrs: dict[str, Any] = {
                "__tablename__": name,
                "__annotations__": {"id": Mapped[int], "patient_id": Mapped[int]},
                "id": mapped_column(sa.Integer, primary_key=True),
                "patient_id": mapped_column(sa.ForeignKey("ck_patients.id")),
                "patient": relationship(Patient),
                "comment": mapped_column(body, nullable=True),
            }
            if not checks:
                attrs["__table_args__"] = {"info": {"carnet_checks": False}}
            return type(name, (Base,), attrs)

        self.patient = Patient
        self.consult_on = consult("ck_consults_on", enc("patient.practice_id"), True)
        self.consult_off = consult("ck_consults_off", enc("patient.practice_id"), False)
        self.consult_plain = consult("ck_consults_plain", sa.Text(), True)
        self.metadata = Base.metadata


def _delete_all(engine: sa.Engine, table: sa.Table) -> Callable[[], None]:
    def setup() -> None:
        with engine.begin() as conn:
            conn.execute(table.delete())

    return setup


def _orm_insert(engine: sa.Engine, make: Callable[[], list[Any]]) -> Callable[[], None]:
    def body() -> None:
        with Session(engine) as session:
            session.add_all(make())
            session.commit()

    return body


def _orm_update(
    engine: sa.Engine, cls: type[Any], texts: list[str]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(setup: load every note in a new session, untimed; body: change every body, commit)."""
    state: dict[str, Any] = {}
    turn = [0]

    def setup() -> None:
        session = Session(engine)
        state["session"] = session
        state["notes"] = session.scalars(sa.select(cls).order_by(cls.id)).all()

    def body() -> None:
        turn[0] += 1
        session = state.pop("session")
        try:
            for i, n in enumerate(state.pop("notes")):
                n.body = texts[(i + turn[0]) % len(texts)]
            session.commit()
        finally:
            session.close()

    return setup, body


# -- one database ---------------------------------------------------------------------------


def bench_database(url: str, label: str, directory: Path) -> list[Row]:
    engine = sa.create_engine(url)
    clock = ServerClock(engine)
    keys = carnet.KeyManager(engine, master_key=master_key_uri(directory))
    try:
        return _bench_database(engine, keys, label, clock)
    finally:
        keys.close()
        engine.dispose()


def _bench_database(
    engine: sa.Engine, keys: carnet.KeyManager, label: str, clock: ServerClock
) -> list[Row]:
    keys.create_schema()
    m = _Models(keys)
    m.metadata.create_all(engine)
    with engine.connect() as conn:
        from carnet import dbchecks

        on = dbchecks.installed(conn, "ck_notes_on") | dbchecks.installed(conn, "ck_consults_on")
        off = dbchecks.installed(conn, "ck_notes_off") | dbchecks.installed(conn, "ck_consults_off")
    if not on or off - on:
        raise RuntimeError(f"{label}: checks on {sorted(on)}, off {sorted(off)}")
    n = scale(N_NOTES)
    data = _synthetic.generate_notes(n, seed=11, tenants=N_TENANTS)
    tenants = sorted({d.practice_id for d in data})
    for t in tenants:
        keys.ensure_key(t)  # a one-off per practice, not what is measured
    patients = {p: tenants[p % len(tenants)] for p in range(1, scale(N_PATIENTS) + 1)}
    with engine.begin() as conn:
        conn.execute(
            sa.insert(m.patient),
            [{"id": p, "practice_id": t} for p, t in patients.items()],
        )
    reps = repeats(7)
    ms = 1e3
    rows: list[Row] = []
    mean_len = sum(len(d.text.encode()) for d in data) // len(data)
    what = f"{n:,} notes (mean {mean_len} B), {len(tenants)} practices"

    def notes_of(cls: type[Any]) -> Callable[[], list[Any]]:
        return lambda: [cls(practice_id=d.practice_id, body=d.text) for d in data]

    def consults_of(cls: type[Any]) -> Callable[[], list[Any]]:
        ids = list(patients)
        return lambda: [
            cls(patient_id=ids[i % len(ids)], comment=d.text) for i, d in enumerate(data)
        ]

    results: list[tuple[str, str, dict[str, float], dict[str, float]]] = []

    notes = {"on": m.note_on, "off": m.note_off, "plain": m.note_plain}
    cpu, wall = _measure(
        {
            k: (_delete_all(engine, c.__table__), _orm_insert(engine, notes_of(c)))
            for k, c in notes.items()
        },
        reps,
        clock,
    )
    results.append(("ORM insert", what, cpu, wall))

    tenant = tenants[0]
    params = [{"practice_id": tenant, "body": d.text} for d in data]
    cpu, wall = _measure(
        {
            k: (_delete_all(engine, c.__table__), core_insert(engine, c.__table__, tenant, params))
            for k, c in notes.items()
        },
        reps,
        clock,
    )
    results.append(
        ("Core executemany insert", f"{n:,} rows of one practice, tenant_scope", cpu, wall)
    )

    # The tables now hold the Core rows: every note is updated by the ORM.
    texts = [d.text for d in data]
    cpu, wall = _measure({k: _orm_update(engine, c, texts) for k, c in notes.items()}, reps, clock)
    results.append(("ORM update of the body", f"{n:,} notes loaded untimed, one flush", cpu, wall))

    consults = {"on": m.consult_on, "off": m.consult_off, "plain": m.consult_plain}
    cpu, wall = _measure(
        {
            k: (_delete_all(engine, c.__table__), _orm_insert(engine, consults_of(c)))
            for k, c in consults.items()
        },
        reps,
        clock,
    )
    results.append(
        (
            'ORM insert, tenant="patient.practice_id"',
            f"{n:,} consultations of {len(patients)} patients",
            cpu,
            wall,
        )
    )

    unit = "ms"
    how = clock.kind if not clock.wall else "wall-clock time (server CPU not readable)"
    for name, detail, cpu, wall in results:
        wall_ratio = wall["on"] / wall["off"] if wall["off"] else float("nan")
        rows.append(
            row(
                f"{name}, checks on vs off [{label}]",
                cpu["off"] * ms,
                cpu["on"] * ms,
                unit,
                f"{detail}; {how}; wall ratio {wall_ratio:.2f}×",
            )
        )
        rows.append(
            row(
                f"  reference: checks on vs plain Text [{label}]",
                cpu["plain"] * ms,
                cpu["on"] * ms,
                unit,
                f"checks off vs plain Text: {cpu['off'] / cpu['plain']:.2f}×",
            )
        )
    return rows


def run() -> list[Row]:
    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with temp_dir() as d:
            (d / "sqlite").mkdir()
            rows += bench_database(
                f"sqlite:///{d / 'sqlite' / 'bench.db'}", "SQLite file", d / "sqlite"
            )
            with postgres_database() as pg_url:
                if pg_url is not None:
                    (d / "pg").mkdir()
                    rows += bench_database(pg_url, "PostgreSQL", d / "pg")
            with mariadb_database() as my_url:
                if my_url is not None:
                    (d / "my").mkdir()
                    rows += bench_database(my_url, "MariaDB", d / "my")
    return rows
