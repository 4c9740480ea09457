"""The batch engine behind ``reencrypt``, ``verify`` and ``migrate``.

It walks one column of a table by primary key (keyset pagination, so memory
stays flat and composite or non-integer keys work), hands each RAW stored
value to a transform, and writes the result back with a compare-and-set::

    UPDATE t SET col = :new WHERE pk = :pk AND col = :old

so a concurrent application write always wins (counted as a conflict: the
application seals on write, so its value needs no work). Each batch is read
in a short lock-free statement, transformed outside any transaction, then
written in one short transaction together with the worker's progress row in
``carnet_jobs``: a SIGKILLed run resumes after the last committed batch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from . import jobs as _jobs
from .errors import (
    CarnetError,
    ConfigurationError,
    DatabaseError,
    MasterKeyMismatch,
    MasterKeyUnavailable,
    db_error_code,
    describe_db_error,
)
from .keystore import utcnow
from .reflect import raw_type, resolve_table

__all__ = ["BatchReport", "BatchRow", "iter_rows", "resolve_table", "run_batches", "raw_type"]

# Lock waits and deadlocks are expected when the application writes the same
# rows; the batch is simply re-read and retried.
_RETRIES = 20

# Errors about the setup, not the row: every other row would fail the same way.
_FATAL = (ConfigurationError, MasterKeyUnavailable, MasterKeyMismatch)


@dataclass
class BatchRow:
    """One row handed to a transform: primary key, raw stored value, extra columns."""

    pk: tuple[Any, ...]
    value: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        # The raw value may be legacy plaintext (migration): never show it.
        kind = type(self.value).__name__
        return f"BatchRow(pk={self.pk!r}, value=<{kind}>, extra_keys={sorted(self.extra)!r})"


@dataclass
class BatchReport:
    """What one worker did in one run. ``failed`` holds primary keys only, no content."""

    job: str
    scanned: int = 0
    rewritten: int = 0
    skipped: int = 0
    conflicts: int = 0
    failed: list[tuple[Any, ...]] = field(default_factory=list)
    resumed_from: tuple[Any, ...] | None = None
    elapsed: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "scanned": self.scanned,
            "rewritten": self.rewritten,
            "skipped": self.skipped,
            "conflicts": self.conflicts,
            "failed": [list(pk) for pk in self.failed],
            "resumed_from": list(self.resumed_from) if self.resumed_from is not None else None,
            "elapsed": round(self.elapsed, 3),
        }


# -- table resolution -------------------------------------------------------------------


def _column(table: sa.Table, column: str) -> sa.Column[Any]:
    try:
        return table.c[column]
    except KeyError:
        raise ConfigurationError(f"table {table.name!r} has no column {column!r}") from None


def _pk_columns(table: sa.Table, names: Sequence[str] = ()) -> list[sa.Column[Any]]:
    """The columns to page and write back by: ``names`` when given (a table
    without a declared primary key), else the declared primary key."""
    if names:
        return [_column(table, n) for n in names]
    pk = list(table.primary_key.columns)
    if not pk:
        raise ConfigurationError(
            f"table {table.name!r} has no primary key: batch work needs one to page and to "
            "write back safely"
        )
    return pk


# -- keyset predicates ------------------------------------------------------------------


def _gt(cols: Sequence[sa.ColumnElement[Any]], vals: Sequence[Any]) -> sa.ColumnElement[bool]:
    """(cols) > (vals) lexicographically, spelled out: row values are not indexed everywhere."""
    c, v = cols[0], vals[0]
    if len(cols) == 1:
        gt: sa.ColumnElement[bool] = c > v
        return gt
    return sa.or_(c > v, sa.and_(c == v, _gt(cols[1:], vals[1:])))


def _le(cols: Sequence[sa.ColumnElement[Any]], vals: Sequence[Any]) -> sa.ColumnElement[bool]:
    c, v = cols[0], vals[0]
    if len(cols) == 1:
        le: sa.ColumnElement[bool] = c <= v
        return le
    return sa.or_(c < v, sa.and_(c == v, _le(cols[1:], vals[1:])))


def after_key(cols: Sequence[sa.ColumnElement[Any]], vals: Sequence[Any]) -> sa.ColumnElement[bool]:
    """Rows after the key ``vals`` in ``cols`` order: the one keyset predicate of carnet's
    table walks (the batch engine's and the migration's scans)."""
    if len(cols) == 1:
        return _gt(cols, vals)
    # The redundant leading bound lets MariaDB and SQLite use a range scan on the index.
    return sa.and_(cols[0] >= vals[0], _gt(cols, vals))


# -- reading ----------------------------------------------------------------------------


class WritePlan:
    """The statements of one (table, column), built once."""

    def __init__(
        self,
        engine: sa.Engine,
        table: sa.Table,
        column: str,
        extra_columns: Mapping[str, sa.ColumnElement[Any]] | None,
        join: Callable[[sa.Select[Any]], sa.Select[Any]] | None,
        where: sa.ColumnElement[bool] | None,
        pk: Sequence[str] = (),
    ) -> None:
        self.table = table
        self.col = _column(table, column)
        self.pk = _pk_columns(table, pk)
        self.dialect = engine.dialect
        self.raw = raw_type(self.col, engine.dialect)
        self.extra_names = list(extra_columns or {})
        self.extra_exprs = list((extra_columns or {}).values())
        self.join = join
        self.where = where
        raw_col = sa.type_coerce(self.col, self.raw)
        self.raw_col = raw_col
        n = len(self.pk)
        new = sa.bindparam("carnet_new", type_=self.raw)
        pk_match = [c == sa.bindparam(f"carnet_pk{i}", type_=c.type) for i, c in enumerate(self.pk)]
        old = sa.bindparam("carnet_old", type_=self.raw)
        if self.dialect.name in ("mysql", "mariadb") and not _is_binary(self.raw):
            # Compare bytes, not collation-equal text: a case-insensitive
            # collation would let a concurrent write that differs only in
            # case look unchanged.
            same = sa.cast(raw_col, sa.LargeBinary) == sa.cast(old, sa.LargeBinary)
        else:
            same = raw_col == old
        self.cas = table.update().where(*pk_match, same).values({self.col.name: new})
        self.cas_null = (
            table.update().where(*pk_match, self.col.is_(None)).values({self.col.name: new})
        )
        self.npk = n
        # What the run is doing, for an error that must name rows but no values.
        self.doing: tuple[str, tuple[Any, ...] | None] = ("reading the rows", None)
        # PostgreSQL: one UPDATE ... FROM (VALUES ...) per batch instead of one
        # statement per row: a single round trip, same compare-and-set.
        # %(name)b (binary parameters) is psycopg 3 syntax.
        self.bulk = self.dialect.name == "postgresql" and self.dialect.driver == "psycopg"

        if self.bulk:
            q = self.dialect.identifier_preparer
            tname = q.format_table(table)
            cname = q.quote(self.col.name)
            arrays = ", ".join(f"%(carnet_pk{i})b" for i in range(n))
            names = ", ".join(f"k{i}" for i in range(n))
            match = " AND ".join(
                f"{tname}.{q.quote(c.name)} = carnet_v.k{i}" for i, c in enumerate(self.pk)
            )
            # unnest() of one array per field: the statement text is the same
            # for every batch, so the server prepares it once. Sent through
            # psycopg with binary parameters: text-format bytea arrays cost
            # more to escape than the encryption itself.
            self.bulk_sql = (
                f"UPDATE {tname} SET {cname} = carnet_v.new "  # noqa: S608 - quoted identifiers
                f"FROM unnest({arrays}, %(carnet_old)b, %(carnet_new)b) "
                f"AS carnet_v({names}, old, new) "
                f"WHERE {match} AND {tname}.{cname} = carnet_v.old"
            )

    def bulk_execute(self, conn: sa.Connection, updates: list[dict[str, Any]]) -> int:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None  # noqa: S101 - a connection in a transaction has one
        cur: Any = dbapi.cursor()
        try:
            cur.execute(self.bulk_sql, self.bulk_params(updates))
            return int(cur.rowcount)
        except self.dialect.loaded_dbapi.Error as exc:
            # The raw cursor bypasses SQLAlchemy: wrap the driver's error as
            # SQLAlchemy would (so a deadlock is retried like any other), with
            # no parameters: they hold the old values, legacy notes in a migration.
            raise sa.exc.DBAPIError.instance(
                self.bulk_sql,
                None,
                exc,
                self.dialect.loaded_dbapi.Error,
                hide_parameters=True,
                dialect=self.dialect,
            ) from None
        finally:
            cur.close()

    def bulk_params(self, updates: list[dict[str, Any]]) -> dict[str, Any]:
        params: dict[str, Any] = {
            f"carnet_pk{i}": [u[f"carnet_pk{i}"] for u in updates] for i in range(self.npk)
        }
        params["carnet_old"] = [u["carnet_old"] for u in updates]
        params["carnet_new"] = [u["carnet_new"] for u in updates]
        return params

    def select(
        self,
        lower: Sequence[Any] | None,
        upper: Sequence[Any] | None,
        last: Sequence[Any] | None,
        limit: int,
    ) -> sa.Select[Any]:
        q = sa.select(*self.pk, self.raw_col, *self.extra_exprs).select_from(self.table)
        if self.join is not None:
            q = self.join(q)
        conds: list[sa.ColumnElement[bool]] = []
        start = last if last is not None else lower
        if start is not None:
            conds.append(after_key(self.pk, start))
        if upper is not None:
            conds.append(_le(self.pk, upper))
        if self.where is not None:
            conds.append(self.where)
        if conds:
            q = q.where(*conds)
        return q.order_by(*self.pk).limit(limit)

    def to_batch_row(self, row: sa.Row[Any]) -> BatchRow:
        n = self.npk
        return BatchRow(
            pk=tuple(row[:n]),
            value=row[n],
            extra={name: row[n + 1 + i] for i, name in enumerate(self.extra_names)},
        )


def _is_binary(t: sa.types.TypeEngine[Any]) -> bool:
    try:
        return t.python_type is bytes
    except NotImplementedError:
        return False


def _transient(exc: sa.exc.DBAPIError) -> bool:
    """Lock wait, deadlock, serialization failure, busy SQLite: worth retrying the batch."""
    text = str(exc.orig).lower()
    code = getattr(exc.orig, "args", [None])[0] if exc.orig is not None else None
    sqlstate = getattr(exc.orig, "sqlstate", None)
    return (
        code in (1205, 1213)
        or sqlstate in ("40001", "40P01", "55P03")
        or "database is locked" in text
        or "deadlock" in text
    )


def iter_rows(
    engine: sa.Engine,
    table: str | sa.Table,
    column: str,
    *,
    extra_columns: Mapping[str, sa.ColumnElement[Any]] | None = None,
    join: Callable[[sa.Select[Any]], sa.Select[Any]] | None = None,
    where: sa.ColumnElement[bool] | None = None,
    batch_size: int = 1000,
    pk: Sequence[str] = (),
) -> Any:
    """Yield every row as a :class:`BatchRow`, read-only, a batch at a time (flat memory)."""
    plan = WritePlan(engine, resolve_table(engine, table), column, extra_columns, join, where, pk)
    last: tuple[Any, ...] | None = None
    while True:
        with engine.connect() as conn:
            rows = conn.execute(plan.select(None, None, last, batch_size)).all()
        if not rows:
            return
        for r in rows:
            yield plan.to_batch_row(r)
        last = tuple(rows[-1][: plan.npk])
        if len(rows) < batch_size:
            return


# -- job bookkeeping --------------------------------------------------------------------

_EMPTY = "[]"  # lower == upper == _EMPTY marks a worker with nothing to do


def _split_points(conn: sa.Connection, plan: WritePlan, count: int) -> list[tuple[Any, ...] | None]:
    """count-1 primary keys cutting the table into count ranges of similar size."""
    total = conn.execute(sa.select(sa.func.count()).select_from(plan.table)).scalar_one()
    points: list[tuple[Any, ...] | None] = []
    for i in range(1, count):
        off = (total * i) // count
        row = None
        if 0 < off <= total:
            row = conn.execute(
                sa.select(*plan.pk).order_by(*plan.pk).offset(off - 1).limit(1)
            ).first()
        points.append(tuple(row) if row is not None else None)
    return points


def _create_job(engine: sa.Engine, plan: WritePlan, job: str, workers: int, column: str) -> None:
    t = _jobs.JOBS
    with engine.connect() as conn:
        points = _split_points(conn, plan, workers)
    rows = []
    prev: tuple[Any, ...] | None = None
    exhausted = False
    for i in range(workers):
        upper = points[i] if i < workers - 1 else None
        short = (i < workers - 1 and upper is None) or (upper is not None and upper == prev)
        if exhausted or short:
            # Fewer rows than workers: this worker gets an empty range, the
            # last worker the open end.
            if i == workers - 1:
                rows.append(_jobs.new_row(job, i, workers, plan.table.name, column, prev, None))
            else:
                r = _jobs.new_row(job, i, workers, plan.table.name, column, None, None)
                r["lower_pk"] = r["upper_pk"] = _EMPTY
                rows.append(r)
            exhausted = exhausted or upper is None
            continue
        rows.append(_jobs.new_row(job, i, workers, plan.table.name, column, prev, upper))
        prev = upper
    try:
        with engine.begin() as conn:
            conn.execute(t.insert(), rows)
    except sa.exc.IntegrityError:
        pass  # another worker created the job first; its ranges are the ones used


def _load_worker(engine: sa.Engine, job: str, index: int) -> sa.Row[Any] | None:
    t = _jobs.JOBS
    with engine.connect() as conn:
        return conn.execute(sa.select(t).where(t.c.job == job, t.c.worker == index)).first()


def _reset_worker(engine: sa.Engine, job: str, index: int) -> None:
    t = _jobs.JOBS
    with engine.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.job == job, t.c.worker == index)
            .values(
                last_pk=None,
                done=False,
                scanned=0,
                rewritten=0,
                skipped=0,
                conflicts=0,
                failed=0,
                updated_at=utcnow(),
            )
        )


# -- the engine -------------------------------------------------------------------------


def run_batches(
    engine: sa.Engine,
    table: str | sa.Table,
    column: str,
    transform: Callable[[BatchRow], Any | None],
    *,
    job: str,
    extra_columns: Mapping[str, sa.ColumnElement[Any]] | None = None,
    join: Callable[[sa.Select[Any]], sa.Select[Any]] | None = None,
    where: sa.ColumnElement[bool] | None = None,
    batch_size: int = 500,
    worker: tuple[int, int] = (0, 1),
    progress: Callable[[int], None] | None = None,
    restart: bool = False,
    pk: Sequence[str] = (),
) -> BatchReport:
    """Rewrite ``column`` of ``table`` row by row with ``transform``, resumably.

    ``pk``: the columns to page by, for a table without a declared primary
    key (they must identify rows uniquely); default: the primary key.

    ``transform`` gets a :class:`BatchRow` with the RAW stored value and
    returns the new raw value, or None to leave the row. A
    :class:`~carnet.errors.CarnetError` it raises marks that row failed (its
    primary key is reported) and the run goes on, except configuration and
    master-key errors, which stop the run. ``job`` names the progress
    record: a rerun with the same name resumes where a killed run stopped; a
    finished worker starts a fresh pass. ``worker=(i, n)``: this process
    handles the i-th of n disjoint primary-key ranges, fixed in the database
    when the job's first worker starts.
    """
    if batch_size < 1:
        raise ConfigurationError("batch_size must be at least 1")
    index, count = worker
    if count < 1 or not 0 <= index < count:
        raise ConfigurationError(f"bad worker {index}/{count}: need 0 <= index < count")
    started = time.monotonic()
    tbl = resolve_table(engine, table)
    plan = WritePlan(engine, tbl, column, extra_columns, join, where, pk)
    t = _jobs.ensure_jobs_table(engine)

    state = _load_worker(engine, job, index)
    if state is not None and (
        state.workers != count or state.table_name != tbl.name or state.column_name != column
    ):
        if not restart:
            raise ConfigurationError(
                f"job {job!r} was started on {state.table_name}.{state.column_name} with "
                f"{state.workers} worker(s); rerun it the same way, or restart it"
            )
        _jobs.reset_job(engine, job)
        state = None
    if state is None:
        _create_job(engine, plan, job, count, column)
        state = _load_worker(engine, job, index)
        if state is None:
            raise ConfigurationError(f"job {job!r} has no worker {index}")
    elif restart or state.done:
        _reset_worker(engine, job, index)
        state = _load_worker(engine, job, index)
        assert state is not None  # noqa: S101 - just reset, not deleted

    report = BatchReport(job=job)
    if state.lower_pk == _EMPTY:
        _finish(engine, job, index)
        report.elapsed = time.monotonic() - started
        return report
    lower = _jobs.decode_pk(state.lower_pk)
    upper = _jobs.decode_pk(state.upper_pk)
    last = _jobs.decode_pk(state.last_pk)
    report.resumed_from = last

    with engine.connect() as conn:
        while True:
            failure: DatabaseError | None = None
            for attempt in range(_RETRIES):
                try:
                    n, last_seen = _one_batch(
                        conn, plan, t, job, index, lower, upper, last, batch_size, transform, report
                    )
                    break
                except sa.exc.DBAPIError as exc:
                    if conn.in_transaction():
                        conn.rollback()
                    if not _transient(exc) or attempt == _RETRIES - 1:
                        failure = _failure(exc, plan)
                        break
                    time.sleep(min(2.0, 0.02 * 2**attempt) * (0.5 + random.random()))  # noqa: S311
            if failure is not None:
                # Raised outside the except block: the driver's error, its
                # message and SQLAlchemy's parameters (legacy notes during a
                # migration) must not ride along as __context__.
                raise failure
            if n == 0:
                break
            last = last_seen
            if progress is not None:
                progress(n)
            if n < batch_size:
                break
    _finish(engine, job, index)
    report.elapsed = time.monotonic() - started
    return report


def _failure(exc: sa.exc.DBAPIError, plan: WritePlan) -> DatabaseError:
    doing, pks = plan.doing
    if pks is None:
        rows = "from the start of the range"
    elif doing.startswith("reading"):
        rows = f"after primary key {list(pks[0])}"
    else:
        rows = f"with primary keys {list(pks[0])} to {list(pks[-1])}"
    where = f"{plan.table.name}.{plan.col.name}"
    return DatabaseError(
        f"{where}: database error while {doing} {rows}: {describe_db_error(exc)}",
        table=plan.table.name,
        column=plan.col.name,
        pks=pks or (),
        code=db_error_code(exc),
    )


def _finish(engine: sa.Engine, job: str, index: int) -> None:
    t = _jobs.JOBS
    with engine.begin() as conn:
        conn.execute(
            t.update()
            .where(t.c.job == job, t.c.worker == index)
            .values(done=True, updated_at=utcnow())
        )


def _one_batch(
    conn: sa.Connection,
    plan: WritePlan,
    t: sa.Table,
    job: str,
    index: int,
    lower: tuple[Any, ...] | None,
    upper: tuple[Any, ...] | None,
    last: tuple[Any, ...] | None,
    batch_size: int,
    transform: Callable[[BatchRow], Any | None],
    report: BatchReport,
) -> tuple[int, tuple[Any, ...] | None]:
    # Plain read, ended at once: no row or gap locks held while transforming.
    start = last if last is not None else lower
    plan.doing = ("reading the rows", (start,) if start is not None else None)
    rows = conn.execute(plan.select(lower, upper, last, batch_size)).all()
    conn.commit()
    if not rows:
        return 0, last
    updates: list[dict[str, Any]] = []
    updates_null: list[dict[str, Any]] = []
    failed: list[tuple[Any, ...]] = []
    skipped = 0
    for r in rows:
        br = plan.to_batch_row(r)
        try:
            new = transform(br)
        except _FATAL:
            raise
        except CarnetError:
            failed.append(br.pk)
            continue
        if new is None or new == br.value:
            skipped += 1
            continue
        params = {f"carnet_pk{i}": v for i, v in enumerate(br.pk)}
        params["carnet_new"] = new
        if br.value is None:
            updates_null.append(params)
        else:
            params["carnet_old"] = br.value
            updates.append(params)
    last_seen = tuple(rows[-1][: plan.npk])
    plan.doing = ("writing the rows", (tuple(rows[0][: plan.npk]), last_seen))
    written = 0
    with conn.begin():
        if updates and plan.bulk:
            written += plan.bulk_execute(conn, updates)
        elif updates:
            written += conn.execute(plan.cas, updates).rowcount
        if updates_null:
            written += conn.execute(plan.cas_null, updates_null).rowcount
        conflicts = len(updates) + len(updates_null) - written
        conn.execute(
            t.update()
            .where(t.c.job == job, t.c.worker == index)
            .values(
                last_pk=_jobs.encode_pk(last_seen),
                scanned=t.c.scanned + len(rows),
                rewritten=t.c.rewritten + written,
                skipped=t.c.skipped + skipped,
                conflicts=t.c.conflicts + conflicts,
                failed=t.c.failed + len(failed),
                updated_at=utcnow(),
            )
        )
    # Counted only once committed, so a retried batch is not counted twice.
    report.scanned += len(rows)
    report.rewritten += written
    report.skipped += skipped
    report.conflicts += conflicts
    report.failed.extend(failed)
    return len(rows), last_seen
