"""A patient moved while a consultation of it is inserted, in two real transactions.

``EncryptedText(tenant="patient.practice_id")`` keeps the practice on the
parent row, so the database's checks need two rows: ``carnet_p_...`` (on the
consultation) compares the value's header with the patient's practice, and
``carnet_m_...`` (on the patient) refuses a move while a consultation holds a
value. Each reads the other table with a locking read; this file shows that
the locks close the race, on PostgreSQL and MariaDB, at READ COMMITTED and
REPEATABLE READ (each side at either level), in both orders:

(a) the mover updates the patient first, uncommitted; the inserter's
    statement then waits for it, and fails once the move commits;
(b) the inserter inserts first, uncommitted; the mover's statement waits,
    and fails once the insert commits.

Statements are raw SQL (``exec_driver_sql``) so only the database decides;
both transactions read the patient first, as an application that seals for
the practice it read would, so that REPEATABLE READ snapshots predate the
other side's write. After each race a fresh connection and a brand-new
KeyManager check the invariant: every body names, and opens under, its
patient's current practice. SQLite, which serialises writers, gets the same
two orders; so does joined inheritance (the practice on the base table).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import carnet
from carnet import dbchecks, envelope
from carnet.errors import CarnetError

LABEL = "consultations.body"
JI_LABEL = "clients.note"
LOCK_TIMEOUT_S = 4  # a side that waits longer than this is a bug in the test, not a hang
STEP_TIMEOUT_S = 8.0
RC, RR = "READ COMMITTED", "REPEATABLE READ"
P, Q = 1, 2  # P is moved; Q is a bystander whose consultation must stay readable


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))


class Consultation(Base):
    __tablename__ = "consultations"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patients.id"))
    patient: Mapped[Patient] = relationship()
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="patient.practice_id"))


# Joined inheritance: the practice is on the base table, the note on the
# subclass table, whose primary key is the foreign key to the base.
ji_metadata = sa.MetaData()
persons = sa.Table(
    "persons",
    ji_metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(20)),
    sa.Column("practice_id", sa.String(64)),
)
clients = sa.Table(
    "clients",
    ji_metadata,
    sa.Column("id", sa.Integer, sa.ForeignKey("persons.id"), primary_key=True, autoincrement=False),
    sa.Column("note", carnet.EncryptedText(tenant="practice_id")),
)


@dataclass(frozen=True)
class Schema:
    """Where the race happens: parent and child tables, their columns, the label."""

    parent: str
    child: str
    fk: str
    col: str
    label: str
    extra_parent_cols: str = ""  # "kind, " for persons
    extra_parent_vals: str = ""


PARENT = Schema("patients", "consultations", "patient_id", "body", LABEL)
JOINED = Schema("persons", "clients", "id", "note", JI_LABEL, "kind, ", "'client', ")


# -- setup ---------------------------------------------------------------------------------


@pytest.fixture
def race_keys(db_url: str, engine: sa.Engine, master_key_uri: str) -> Iterator[carnet.KeyManager]:
    """A manager on an engine of its own (not ``engine``), not carnet's default manager.

    Practices A and B have their data keys before any race starts.
    """
    keys = carnet.KeyManager(db_url, master_key=master_key_uri)
    keys.create_schema()
    for practice in ("A", "B"):
        keys.ensure_key(practice)  # before any race: key creation is not under test
    Base.metadata.create_all(engine)
    ji_metadata.create_all(engine)
    try:
        yield keys
    finally:
        keys.close()


def _seal(keys: carnet.KeyManager, text: str, practice: str, label: str) -> bytes:
    # Binary storage (EncryptedText's default): the value is stored as these bytes.
    return keys.encrypt(text.encode(), tenant=practice, label=label)


def _populate(engine: sa.Engine, keys: carnet.KeyManager, schema: Schema) -> None:
    """P and Q of practice A; Q has a consultation sealed for A, P has none yet."""
    with engine.begin() as conn:
        for pid in (P, Q):
            conn.exec_driver_sql(
                f"INSERT INTO {schema.parent} (id, {schema.extra_parent_cols}practice_id) "
                f"VALUES ({pid}, {schema.extra_parent_vals}'A')"
            )
        if schema is PARENT:
            conn.exec_driver_sql(
                "INSERT INTO consultations (id, patient_id, body) VALUES (%s, %s, %s)"
                if engine.dialect.name != "sqlite"
                else "INSERT INTO consultations (id, patient_id, body) VALUES (?, ?, ?)",
                (20, Q, _seal(keys, "bystander note", "A", LABEL)),
            )
        else:
            conn.exec_driver_sql(
                "INSERT INTO clients (id, note) VALUES (%s, %s)"
                if engine.dialect.name != "sqlite"
                else "INSERT INTO clients (id, note) VALUES (?, ?)",
                (Q, _seal(keys, "bystander note", "A", JI_LABEL)),
            )


def _check_invariant(db_url: str, master_key_uri: str, schema: Schema) -> dict[int, str]:
    """From a fresh connection and a brand-new KeyManager: every body opens under its practice.

    Returns {parent id: practice} so callers can see who won.
    """
    eng = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    fresh = carnet.KeyManager(db_url, master_key=master_key_uri)
    try:
        with eng.connect() as conn:
            practices = {
                r[0]: r[1]
                for r in conn.exec_driver_sql(f"SELECT id, practice_id FROM {schema.parent}")
            }
            rows = conn.exec_driver_sql(
                f"SELECT c.{schema.fk}, c.{schema.col} FROM {schema.child} c "
                f"WHERE c.{schema.col} IS NOT NULL"
            ).all()
        assert rows, "the bystander's value at least must be there"
        for parent_id, value in rows:
            blob = bytes(value)
            practice = practices[parent_id]
            assert envelope.tenant_of(blob) == practice, (
                f"invariant broken: a value of parent {parent_id} is sealed for "
                f"{envelope.tenant_of(blob)!r} but the row's practice is {practice!r}"
            )
            fresh.decrypt(blob, tenant=practice, label=schema.label)  # opens, or raises
        return practices
    finally:
        fresh.close()
        eng.dispose()


# -- two sides, each a connection confined to its own thread -------------------------------


class Side:
    """One transaction on its own connection and thread; steps return futures."""

    def __init__(self, db_url: str, isolation: str, name: str) -> None:
        self.name = name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
        self.kind = self._engine.dialect.name
        self.conn: sa.Connection = self.call(self._open, isolation)
        self.session_id: int = self.call(self._session_id)

    def _open(self, isolation: str) -> sa.Connection:
        conn = self._engine.connect().execution_options(isolation_level=isolation)
        if self.kind == "postgresql":
            conn.exec_driver_sql(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
        else:
            conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {LOCK_TIMEOUT_S}")
        conn.commit()
        return conn

    def _session_id(self) -> int:
        q = "SELECT pg_backend_pid()" if self.kind == "postgresql" else "SELECT CONNECTION_ID()"
        return int(self.conn.exec_driver_sql(q).scalar_one())

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        return self._pool.submit(fn, *args)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.submit(fn, *args).result(timeout=STEP_TIMEOUT_S)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> Future[Any]:
        return self.submit(lambda: self.conn.exec_driver_sql(statement, params))

    def close(self) -> None:
        try:
            self.call(self._close)
        finally:
            self._pool.shutdown(wait=False)
            self._engine.dispose()

    def _close(self) -> None:
        try:
            self.conn.rollback()
        finally:
            self.conn.close()


def _is_waiting(monitor: sa.Connection, side: Side) -> bool:
    if side.kind == "postgresql":
        q = (
            "SELECT count(*) FROM pg_stat_activity "
            f"WHERE pid = {side.session_id} AND wait_event_type = 'Lock'"
        )
    else:
        q = (
            "SELECT count(*) FROM information_schema.innodb_trx "
            f"WHERE trx_mysql_thread_id = {side.session_id} AND trx_state = 'LOCK WAIT'"
        )
    return bool(monitor.exec_driver_sql(q).scalar_one())


def _wait_until_blocked(monitor: sa.Connection, side: Side, fut: Future[Any]) -> None:
    """Return once ``side``'s statement waits on a lock; fail if it finishes or never waits."""
    deadline = time.monotonic() + STEP_TIMEOUT_S / 2
    while time.monotonic() < deadline:
        if fut.done():
            exc = fut.exception()
            raise AssertionError(
                f"{side.name}'s statement did not wait for the other transaction's lock "
                f"(it {'failed: ' + _outcome(exc) if exc else 'completed'})"
            )
        if _is_waiting(monitor, side):
            return
        # InnoDB refreshes information_schema.innodb_trx only when it was not read
        # for 0.1 s: polling faster would keep reading the same stale copy.
        time.sleep(0.02 if side.kind == "postgresql" else 0.15)
    raise AssertionError(f"{side.name}'s statement neither finished nor waited on a lock")


def _outcome(exc: BaseException | None) -> str:
    """A short name for how a step ended: ``ok``, a carnet check's name, or the error class."""
    if exc is None:
        return "ok"
    if isinstance(exc, CarnetError):
        name = getattr(exc, "constraint", None)
        return name or type(exc).__name__
    orig = getattr(exc, "orig", exc)
    name = dbchecks.check_of(orig)
    if name is not None:
        return name
    sqlstate = getattr(orig, "sqlstate", None)
    errno = orig.args[0] if getattr(orig, "args", None) else None
    if sqlstate == "40001":
        return "serialization_failure"
    if sqlstate == "40P01" or errno == 1213:
        return "deadlock"
    if sqlstate == "55P03" or errno == 1205:
        return "lock_timeout"
    return f"other:{type(orig).__name__}:{sqlstate or errno}"


def _finish(side: Side, fut: Future[Any]) -> str:
    """Wait for ``side``'s pending statement; commit if it succeeded, roll back if not."""
    try:
        fut.result(timeout=STEP_TIMEOUT_S)
    except FutureTimeout:
        raise AssertionError(f"{side.name} still blocked after {STEP_TIMEOUT_S}s") from None
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
        side.call(side.conn.rollback)
        return _outcome(exc)
    try:
        side.call(side.conn.commit)
    except Exception as exc:  # noqa: BLE001
        side.call(side.conn.rollback)
        return _outcome(exc)
    return "ok"


# A refusal by the database's own checks, or the database aborting one of the
# two transactions: each leaves nothing of the failed side behind.
# (``carnet_k_``: the value's key is not a key of the practice the row now has,
# a refusal of the same stale value by the key check when it runs first.)
ACCEPTED_FAILURES = ("carnet_p_", "carnet_k_", "carnet_m_", "serialization_failure", "deadlock")


def _accepted(outcome: str) -> bool:
    return outcome.startswith(ACCEPTED_FAILURES)


def _race(
    db_url: str,
    keys: carnet.KeyManager,
    schema: Schema,
    mover_level: str,
    inserter_level: str,
    order: str,
) -> tuple[str, str]:
    """Run one interleaving; returns (mover's outcome, inserter's outcome)."""
    dialect = sa.make_url(db_url).get_backend_name()
    ph = "%s"
    assert dialect in ("postgresql", "mysql", "mariadb")
    value = _seal(keys, "note sealed for A", "A", schema.label)
    if schema is PARENT:
        insert = f"INSERT INTO consultations (id, patient_id, body) VALUES (10, {ph}, {ph})"
    else:
        insert = f"INSERT INTO clients (id, note) VALUES ({ph}, {ph})"
    move = f"UPDATE {schema.parent} SET practice_id = 'B' WHERE id = {P}"
    read = f"SELECT practice_id FROM {schema.parent} WHERE id = {P}"

    mover = Side(db_url, mover_level, "mover")
    inserter = Side(db_url, inserter_level, "inserter")
    monitor_engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with monitor_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as monitor:
            # Both read the patient first: their snapshots predate the other's write.
            assert inserter.sql(read).result(timeout=STEP_TIMEOUT_S).scalar_one() == "A"
            assert mover.sql(read).result(timeout=STEP_TIMEOUT_S).scalar_one() == "A"
            if order == "move_first":
                mover.sql(move).result(timeout=STEP_TIMEOUT_S)
                pending = inserter.sql(insert, (P, value))
                _wait_until_blocked(monitor, inserter, pending)
                mover_out = _finish(mover, _done())
                inserter_out = _finish(inserter, pending)
            else:
                inserter.sql(insert, (P, value)).result(timeout=STEP_TIMEOUT_S)
                pending = mover.sql(move)
                _wait_until_blocked(monitor, mover, pending)
                inserter_out = _finish(inserter, _done())
                mover_out = _finish(mover, pending)
    finally:
        mover.close()
        inserter.close()
        monitor_engine.dispose()
    return mover_out, inserter_out


def _done() -> Future[Any]:
    f: Future[Any] = Future()
    f.set_result(None)
    return f


def _assert_one_failed(
    order: str, outcomes: tuple[str, str], practices: dict[int, str], child_exists: bool
) -> None:
    mover_out, inserter_out = outcomes
    if order == "move_first":
        # The move committed before the insert could finish: the insert must fail.
        assert mover_out == "ok", outcomes
        assert _accepted(inserter_out), outcomes
        assert practices[P] == "B" and not child_exists, (outcomes, practices)
    else:
        assert inserter_out == "ok", outcomes
        assert _accepted(mover_out), outcomes
        assert practices[P] == "A" and child_exists, (outcomes, practices)
    assert practices[Q] == "A"


def _child_exists(db_url: str, schema: Schema) -> bool:
    eng = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        with eng.connect() as conn:
            if schema is PARENT:
                q = "SELECT count(*) FROM consultations WHERE id = 10"
            else:
                q = f"SELECT count(*) FROM clients WHERE id = {P}"
            return bool(conn.exec_driver_sql(q).scalar_one())
    finally:
        eng.dispose()


# -- PostgreSQL and MariaDB ----------------------------------------------------------------

LEVELS = [
    pytest.param(RC, RC, id="both-rc"),
    pytest.param(RR, RR, id="both-rr"),
    pytest.param(RR, RC, id="mover-rr-inserter-rc"),
    pytest.param(RC, RR, id="mover-rc-inserter-rr"),
]
ORDERS = [
    pytest.param("move_first", id="move-first"),
    pytest.param("insert_first", id="insert-first"),
]


@pytest.mark.parametrize(
    "db_kind",
    [
        pytest.param("postgresql", marks=pytest.mark.db),
        pytest.param("mariadb", marks=pytest.mark.db),
    ],
)
@pytest.mark.parametrize(("mover_level", "inserter_level"), LEVELS)
@pytest.mark.parametrize("order", ORDERS)
def test_parent_move_and_child_insert_race(
    db_kind: str,
    db_url: str,
    engine: sa.Engine,
    race_keys: carnet.KeyManager,
    master_key_uri: str,
    mover_level: str,
    inserter_level: str,
    order: str,
) -> None:
    _populate(engine, race_keys, PARENT)
    outcomes = _race(db_url, race_keys, PARENT, mover_level, inserter_level, order)
    practices = _check_invariant(db_url, master_key_uri, PARENT)
    _assert_one_failed(order, outcomes, practices, _child_exists(db_url, PARENT))


@pytest.mark.parametrize(
    "db_kind",
    [
        pytest.param("postgresql", marks=pytest.mark.db),
        pytest.param("mariadb", marks=pytest.mark.db),
    ],
)
@pytest.mark.parametrize(("mover_level", "inserter_level"), LEVELS)
@pytest.mark.parametrize("order", ORDERS)
def test_joined_inheritance_base_move_and_subclass_insert_race(
    db_kind: str,
    db_url: str,
    engine: sa.Engine,
    race_keys: carnet.KeyManager,
    master_key_uri: str,
    mover_level: str,
    inserter_level: str,
    order: str,
) -> None:
    _populate(engine, race_keys, JOINED)
    outcomes = _race(db_url, race_keys, JOINED, mover_level, inserter_level, order)
    practices = _check_invariant(db_url, master_key_uri, JOINED)
    _assert_one_failed(order, outcomes, practices, _child_exists(db_url, JOINED))


# -- SQLite: one writer at a time ----------------------------------------------------------


def _sqlite_conn(path: str, busy_s: float) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=busy_s, isolation_level=None, check_same_thread=False)


@pytest.mark.parametrize("db_kind", ["sqlite"])
@pytest.mark.parametrize("order", ORDERS)
def test_sqlite_second_writer_waits_then_the_checks_refuse(
    db_kind: str,
    db_url: str,
    engine: sa.Engine,
    race_keys: carnet.KeyManager,
    master_key_uri: str,
    order: str,
) -> None:
    _populate(engine, race_keys, PARENT)
    engine.dispose()
    path = str(Path(sa.make_url(db_url).database or ""))
    value = _seal(race_keys, "note sealed for A", "A", LABEL)
    insert = ("INSERT INTO consultations (id, patient_id, body) VALUES (10, ?, ?)", (P, value))
    move = (f"UPDATE patients SET practice_id = 'B' WHERE id = {P}", ())
    first_sql, second_sql = (move, insert) if order == "move_first" else (insert, move)

    first = _sqlite_conn(path, 0.1)
    impatient = _sqlite_conn(path, 0.0)
    patient = _sqlite_conn(path, 5.0)
    try:
        first.execute("BEGIN")
        first.execute(*first_sql)
        # A second writer that does not wait is told the database is locked...
        impatient.execute("BEGIN")
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            impatient.execute(*second_sql)
        impatient.execute("ROLLBACK")
        # ...and one that waits runs only after the first commits, and is refused then.
        result: dict[str, BaseException | None] = {}
        started = threading.Event()

        def second() -> None:
            patient.execute("BEGIN")
            started.set()
            try:
                patient.execute(*second_sql)
            except sqlite3.Error as exc:
                result["exc"] = exc
                patient.execute("ROLLBACK")
            else:
                result["exc"] = None
                patient.execute("COMMIT")

        t = threading.Thread(target=second)
        t.start()
        started.wait(2)
        time.sleep(0.3)
        assert t.is_alive(), "the second writer did not wait for the first"
        first.execute("COMMIT")
        t.join(STEP_TIMEOUT_S)
        assert not t.is_alive()
        exc = result["exc"]
        assert exc is not None, "both writers committed"
        expected = dbchecks.check_of(exc)
        if order == "move_first":  # the insert read the new practice, B
            assert expected in ("carnet_p_consultations_body", "carnet_k_consultations_body"), exc
        else:  # the move saw the committed consultation
            assert expected == "carnet_m_patients_consultations_body", exc
    finally:
        for c in (first, impatient, patient):
            c.close()
    practices = _check_invariant(db_url, master_key_uri, PARENT)
    _assert_one_failed(
        order,
        ("ok", expected) if order == "move_first" else (expected, "ok"),
        practices,
        _child_exists(db_url, PARENT),
    )
