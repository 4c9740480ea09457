"""Key-lifecycle operations behind the ``carnet`` commands, as plain functions.

Each returns a dataclass or dict that the CLI prints (as text or JSON) and
that tests inspect without a terminal. Nothing here returns or logs a
plaintext note or key material: reports hold counts, key ids, tenant ids and
primary keys.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from . import envelope
from . import jobs as _jobs
from . import verify as vf
from .audit_store import AUDIT_TABLE
from .batch import BatchReport, BatchRow, iter_rows, raw_type, resolve_table, run_batches
from .errors import (
    ConfigurationError,
    InvalidCiphertext,
    KeyInUse,
    KeyUsageUnknown,
    MasterKeyUnavailable,
    UnknownKey,
    UnknownTenant,
)
from .keystore import ACTIVE, AUDIT, DATA, DECOY, DESTROYED, RETIRED, KeyRecord
from .manager import KeyManager, RewrapReport, env_settings
from .providers import MasterKey, create_master_key

Progress = Callable[[int], None]

# Values of a column that is not (yet) encrypted: legacy text without carnet's prefix.
PLAINTEXT = "plaintext"


# -- opening ----------------------------------------------------------------------------


SQLITE_LOCK_TIMEOUT = 30.0  # seconds the CLI waits for another connection's SQLite lock


def make_engine(url: str, *, lock_notice: Callable[[str], None] | None = None) -> sa.Engine:
    """An engine with time-outs suited to batch work next to a live application.

    ``lock_notice`` is told (on SQLite) when a statement waits for another
    connection's lock, and when it gets it, so a wait is never silent.
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigurationError(
            "bad database URL (expected e.g. postgresql+psycopg://...)"
        ) from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        # SQLite has one writer: wait for the application's write to finish
        # instead of failing the batch at once.
        connect_args["timeout"] = SQLITE_LOCK_TIMEOUT
    elif backend in ("postgresql", "mysql", "mariadb"):
        connect_args["connect_timeout"] = 10
    try:
        # hide_parameters: a failed statement must not print its parameters
        # (a note it compared against, during a re-encryption or a migration).
        engine = sa.create_engine(parsed, connect_args=connect_args, hide_parameters=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigurationError(f"bad database URL: {exc}") from None
    except ImportError as exc:
        raise ConfigurationError(
            f"the database driver for {backend} is not installed ({exc.name}); "
            f"{_driver_hint(backend)}"
        ) from None
    if backend == "sqlite" and lock_notice is not None:
        _SqliteLockWatch(engine, lock_notice)
    return engine


def _driver_hint(backend: str) -> str:
    extra = {"postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"}.get(backend)
    return f"install carnet[{extra}]" if extra else "install its DB-API driver"


class _SqliteLockWatch:
    """Tells when a statement waits for another connection's SQLite lock.

    SQLite's busy handler sleeps inside the statement without a sign. A
    progress handler runs while the statement computes, never while it
    sleeps: a statement running for a second with no progress is waiting
    for a lock, not working.
    """

    AFTER = 1.0  # seconds without progress before the first notice
    EVERY = 5.0  # then one notice per this many seconds

    def __init__(self, engine: sa.Engine, notice: Callable[[str], None]) -> None:
        self.notice = notice
        self._lock = threading.Lock()
        self._inflight: dict[int, list[Any]] = {}
        self._thread: threading.Thread | None = None
        from . import _hooks

        _hooks.on_engine(
            engine,
            {
                "connect": self._connect,
                "before_cursor_execute": self._before,
                "after_cursor_execute": self._after,
                "handle_error": self._error,
            },
        )

    def _connect(self, dbapi_conn: Any, record: Any) -> None:
        progress = record.info.setdefault("carnet_progress", [time.monotonic()])

        def tick() -> int:
            progress[0] = time.monotonic()
            return 0

        dbapi_conn.set_progress_handler(tick, 1000)

    def _before(
        self,
        conn: sa.Connection,
        cursor: Any,
        statement: str,
        params: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        now = time.monotonic()
        progress = conn.connection.info.get("carnet_progress", [now])
        progress[0] = now
        # [start, progress, last notice or None]; one watcher thread per engine
        # looks at every statement in flight (a thread per statement would cost
        # more than the batch work).
        with self._lock:
            self._inflight[id(conn)] = [now, progress, None]
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, daemon=True, name="carnet-sqlite-lock-watch"
                )
                self._thread.start()

    def _watch(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                waiting = []
                for st in self._inflight.values():
                    start, progress, last = st
                    if now - progress[0] < self.AFTER or now - start < self.AFTER:
                        continue  # computing, or too short to mention
                    if last is None or now - last >= self.EVERY:
                        st[2] = now
                        waiting.append(now - start)
            for waited in waiting:
                self.notice(
                    f"waiting for a lock on the SQLite database held by another connection "
                    f"({waited:.0f}s so far; a statement gives up after {SQLITE_LOCK_TIMEOUT:g}s)"
                )

    def _done(self, conn: sa.Connection | None) -> None:
        if conn is None:
            return
        with self._lock:
            st = self._inflight.pop(id(conn), None)
        if st is not None and st[2] is not None:
            self.notice(f"got the SQLite lock after {time.monotonic() - st[0]:.1f}s")

    def _after(
        self,
        conn: sa.Connection,
        cursor: Any,
        statement: str,
        params: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        self._done(conn)

    def _error(self, ctx: sa.engine.ExceptionContext) -> None:
        self._done(ctx.connection)


def open_manager(
    database_url: str | sa.Engine,
    master_key: str,
    previous_master_keys: Iterable[str] = (),
    *,
    cache_ttl: float = 300.0,
    lock_notice: Callable[[str], None] | None = None,
) -> KeyManager:
    engine = (
        make_engine(database_url, lock_notice=lock_notice)
        if isinstance(database_url, str)
        else database_url
    )
    return KeyManager(
        engine,
        master_key=master_key,
        previous_master_keys=tuple(previous_master_keys),
        cache_ttl=cache_ttl,
    )


def init(manager: KeyManager) -> dict[str, Any]:
    """Create ``carnet_keys``, ``carnet_jobs`` and ``carnet_audit`` when missing; make
    practice ids exact."""
    converted = manager.create_schema()
    _jobs.ensure_jobs_table(manager.engine)
    return {
        "tables": [manager.table.name, _jobs.JOBS_TABLE, AUDIT_TABLE],
        "database": safe_url(manager.engine),
        "converted_to_exact_practice_ids": converted,
    }


def new_master(uri: str) -> dict[str, Any]:
    """Create a master key (refuses to overwrite an existing one)."""
    mk = create_master_key(uri)
    try:
        return {"master_key_uri": mk.uri}
    finally:
        mk.close()


def safe_url(engine: sa.Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


# -- reading stored values --------------------------------------------------------------


def blob_of(value: Any) -> bytes | str | None:
    """The binary value (v1 or v2) of a raw stored value; ``PLAINTEXT`` for legacy
    text; None for NULL."""
    if value is None:
        return None
    if isinstance(value, str):
        if not envelope.looks_like_text_ciphertext(value):
            return PLAINTEXT
        return envelope.from_text(value)
    return bytes(value)


class _Keys:
    """Key records by id and active key per tenant, loaded once per run (one row per key)."""

    def __init__(self, manager: KeyManager) -> None:
        self.manager = manager
        self._by_id: dict[bytes, KeyRecord | None] = {}
        self._active: dict[str, bytes] = {}

    def get(self, key_id: bytes) -> KeyRecord | None:
        if key_id not in self._by_id:
            self._by_id[key_id] = self.manager.get_key(key_id)
        return self._by_id[key_id]

    def active(self, tenant: str) -> bytes:
        kid = self._active.get(tenant)
        if kid is None:
            kid = self.manager.ensure_key(tenant).key_id
            self._active[tenant] = kid
        return kid


def _label(table: str, column: str, label: str | None) -> str:
    return label if label is not None else f"{table.rpartition('.')[2]}.{column}"


def check_column(engine: sa.Engine, table: str, column: str, *, pk: Sequence[str] = ()) -> sa.Table:
    """The reflected table, after checking the column exists and can hold carnet values.

    ``pk``: the columns standing for the primary key of a table that declares none.
    """
    tbl = resolve_table(engine, table)
    for c in (column, *pk):
        if c not in tbl.c:
            raise ConfigurationError(f"table {table!r} has no column {c!r}")
    if not pk and not tbl.primary_key.columns:
        raise ConfigurationError(f"table {table!r} has no primary key")
    try:
        py = raw_type(tbl.c[column], engine.dialect).python_type
    except NotImplementedError:
        py = object
    if py not in (bytes, str):
        raise ConfigurationError(f"{table}.{column} is not a text or binary column")
    return tbl


def _carnet_value(manager: KeyManager, value: Any) -> bool:
    try:
        blob = blob_of(value)
    except InvalidCiphertext:
        return True  # carnet's prefix with a broken body: still a carnet column
    if blob is None or blob == PLAINTEXT or isinstance(blob, str):
        return False
    if not envelope.is_known(blob):
        return False
    return manager.get_key(envelope.key_id_of(blob)) is not None


def is_encrypted_column(manager: KeyManager, tbl: sa.Table, column: str, sample: int = 50) -> bool:
    """True if some of the first non-NULL values carry carnet blobs (or the column is empty)."""
    col = sa.type_coerce(tbl.c[column], raw_type(tbl.c[column], manager.engine.dialect))
    with manager.engine.connect() as conn:
        values = (
            conn.execute(sa.select(col).where(tbl.c[column].is_not(None)).limit(sample))
            .scalars()
            .all()
        )
    if not values:
        return True
    return any(_carnet_value(manager, v) for v in values)


def require_encrypted(manager: KeyManager, table: str, column: str) -> sa.Table:
    tbl = check_column(manager.engine, table, column)
    if not is_encrypted_column(manager, tbl, column):
        raise ConfigurationError(
            f"{table}.{column} holds no carnet values: not an encrypted column"
        )
    return tbl


def discover_columns(manager: KeyManager) -> list[tuple[str, str]]:
    """Columns of every table whose stored values carry carnet ciphertext."""
    insp = sa.inspect(manager.engine)
    found: list[tuple[str, str]] = []
    skip = {manager.table.name, _jobs.JOBS_TABLE}
    for name in sorted(insp.get_table_names()):
        if name in skip:
            continue
        tbl = sa.Table(name, sa.MetaData(), autoload_with=manager.engine)
        if not tbl.primary_key.columns:
            continue
        for col in tbl.columns:
            try:
                py = col.type.python_type
            except NotImplementedError:
                continue
            if py not in (bytes, str) or col.primary_key:
                continue
            c = sa.type_coerce(col, col.type)
            with manager.engine.connect() as conn:
                values = (
                    conn.execute(sa.select(c).where(col.is_not(None)).limit(50)).scalars().all()
                )
            if any(_carnet_value(manager, v) for v in values):
                found.append((name, col.name))
    return found


# -- status -----------------------------------------------------------------------------


@dataclass
class ColumnStatus:
    table: str
    column: str
    # "data": carnet values found in it; "declared": an EncryptedText column
    # of the application (--app), found whether or not it has rows
    found_by: str = "data"
    rows: int = 0
    nulls: int = 0
    plaintext: int = 0
    unreadable_framing: int = 0
    unknown_key: int = 0
    # key id (hex) -> {"tenant", "version", "state", "rows"}, in practice and version order
    by_key: dict[str, dict[str, Any]] = field(default_factory=dict)
    # under a live older key: what `reencrypt` moves
    not_on_active: int = 0
    # under a destroyed or retired key: unreadable for good, nothing to move
    destroyed: int = 0
    # in format v1 under a live key, active or older: what `reencrypt` upgrades
    # to v2 (a v1 value under an older key counts in not_on_active too)
    v1: int = 0


@dataclass
class TenantStatus:
    tenant: str
    active_version: int | None
    master_key_uri: str | None
    keys: list[dict[str, Any]]


@dataclass
class StatusReport:
    database: str
    master_key_uri: str
    # True: one key per master key in use unwrapped; None: not checked
    master_key_ok: bool | None
    tenants: list[TenantStatus]
    columns: list[ColumnStatus]
    jobs: list[dict[str, Any]]
    finished_jobs_hidden: int = 0  # finished jobs older than the ones listed

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def check_master_key(manager: KeyManager) -> bool:
    """Unwrap one live DEK per master key URI in use: proves the configured keys open them."""
    seen: set[str] = set()
    for rec in manager.iter_keys():
        if rec.wrapped_key is None or rec.master_key_uri in seen:
            continue
        seen.add(rec.master_key_uri)
        manager.check_unwrap(rec)
    return True


def column_status(
    manager: KeyManager,
    table: str,
    column: str,
    keys: _Keys | None = None,
    batch_size: int = 2000,
    progress: Progress | None = None,
) -> ColumnStatus:
    check_column(manager.engine, table, column)
    keys = keys or _Keys(manager)
    st = ColumnStatus(table=table, column=column)
    counts: Counter[bytes] = Counter()
    v1_counts: Counter[bytes] = Counter()
    for row in iter_rows(manager.engine, table, column, batch_size=batch_size):
        st.rows += 1
        try:
            blob = blob_of(row.value)
        except InvalidCiphertext:
            st.unreadable_framing += 1
            continue
        if blob is None:
            st.nulls += 1
        elif isinstance(blob, str):
            st.plaintext += 1
        elif not envelope.is_known(blob):
            st.unreadable_framing += 1
        else:
            counts[envelope.key_id_of(blob)] += 1
            if not envelope.is_current(blob):
                v1_counts[envelope.key_id_of(blob)] += 1
        if progress is not None and st.rows % batch_size == 0:
            progress(batch_size)
    known: list[tuple[KeyRecord, int]] = []
    for kid, n in counts.items():
        rec = keys.get(kid)
        if rec is None:
            st.unknown_key += n
        else:
            known.append((rec, n))
    # By practice, then version: the order an operator reads a rotation in.
    for rec, n in sorted(known, key=lambda rn: (rn[0].tenant, rn[0].version)):
        st.by_key[rec.key_id.hex()] = {
            "tenant": rec.tenant,
            "version": rec.version,
            "state": rec.state,
            "rows": n,
        }
        if rec.state in (DESTROYED, RETIRED):
            st.destroyed += n
        else:
            st.v1 += v1_counts[rec.key_id]
            if rec.state != ACTIVE:
                st.not_on_active += n
    return st


class UncheckedMasterKey(MasterKey):
    """Stands in for the master key when it is not to be opened
    (``status --no-master-check``): every unwrap is refused."""

    scheme = "unchecked"

    def __init__(self, uri: str | None) -> None:
        self._uri = uri or "(none configured)"

    @property
    def uri(self) -> str:
        return self._uri

    def wrap(self, dek: bytes, context: Any) -> bytes:
        raise MasterKeyUnavailable("the master key was not opened (--no-master-check)")

    def unwrap(self, wrapped: bytes, context: Any) -> bytes:
        raise MasterKeyUnavailable("the master key was not opened (--no-master-check)")

    @classmethod
    def from_uri(cls, uri: str) -> MasterKey:
        return cls(uri)


def status(
    manager: KeyManager,
    columns: Sequence[tuple[str, str]] | None = None,
    check_master: bool = True,
    declared: Sequence[tuple[str, str]] = (),
    finished_jobs: int = _jobs.FINISHED_SHOWN,
) -> StatusReport:
    """Keys per practice, and per encrypted column the rows by key version.

    ``declared``: encrypted columns the application declares; reported even
    when they have no rows yet (discovery by content cannot see those).
    ``finished_jobs``: how many finished jobs to list, most recent first
    (every unfinished one is listed); ``finished_jobs_hidden`` counts the rest.
    """
    manager.create_schema()
    tenants: dict[str, list[KeyRecord]] = {}
    for rec in manager.iter_keys():
        if rec.kind == AUDIT:
            continue  # the audit trail's key belongs to no practice (docs/audit.md)
        tenants.setdefault(rec.tenant, []).append(rec)
    ts = []
    for tenant in sorted(tenants):
        recs = sorted(tenants[tenant], key=lambda r: r.version)
        active = [r for r in recs if r.state == ACTIVE and r.kind == DATA]
        ts.append(
            TenantStatus(
                tenant=tenant,
                active_version=active[0].version if active else None,
                master_key_uri=active[0].master_key_uri if active else None,
                keys=[
                    {
                        "key_id": r.key_id.hex(),
                        "version": r.version,
                        "state": r.state,
                        "kind": r.kind,
                        "master_key_uri": r.master_key_uri,
                    }
                    for r in recs
                ],
            )
        )
    ok = check_master_key(manager) if check_master else None
    cols = list(columns) if columns is not None else discover_columns(manager)
    found_by = dict.fromkeys(cols, "data")
    for tc in declared:
        if tc not in found_by:
            cols.append(tc)
            found_by[tc] = "declared"
    keys = _Keys(manager)
    col_st = []
    for t, c in cols:
        cs = column_status(manager, t, c, keys)
        cs.found_by = found_by[(t, c)]
        col_st.append(cs)
    jobs_rows: list[dict[str, Any]] = []
    shown, hidden = _jobs.recent_jobs(manager.engine, finished_jobs)
    for r in shown:
        jobs_rows.append(
            {
                "job": r.job,
                "worker": f"{r.worker}/{r.workers}",
                "table": r.table_name,
                "column": r.column_name,
                "done": bool(r.done),
                "scanned": int(r.scanned),
                "rewritten": int(r.rewritten),
                "failed": int(r.failed),
            }
        )
    return StatusReport(
        database=safe_url(manager.engine),
        master_key_uri=manager.master_key.uri,
        master_key_ok=ok,
        tenants=ts,
        columns=col_st,
        jobs=jobs_rows,
        finished_jobs_hidden=hidden,
    )


# -- keys -------------------------------------------------------------------------------


def iso_utc(value: Any) -> str | None:
    """ISO 8601 with a UTC offset. SQLite hands back naive datetimes (it stores
    no zone); carnet writes them in UTC, so a naive value is UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return str(value.astimezone(dt.timezone.utc).isoformat())


def key_dict(rec: KeyRecord) -> dict[str, Any]:
    """A key row for reports: no material, timestamps in ISO 8601 with their offset."""
    d = dict(rec.as_dict())
    d["created_at"] = iso_utc(rec.created_at)
    d["updated_at"] = iso_utc(rec.updated_at)
    return d


def list_keys(manager: KeyManager, tenant: str | None = None) -> list[dict[str, Any]]:
    return [key_dict(r) for r in manager.list_keys(tenant)]


def rotate_keys(
    manager: KeyManager, tenants: Sequence[str] | None = None, *, create: bool = False
) -> list[dict[str, Any]]:
    """New active DEK for each tenant (all live tenants when ``tenants`` is None).

    A named practice with no key is refused (:class:`UnknownTenant`) unless
    ``create``; a destroyed one is refused (:class:`KeyDestroyed`).
    """
    if tenants is None:
        tenants = [
            t for t in manager.tenants() if any(r.state == ACTIVE for r in manager.list_keys(t))
        ]
    return [key_dict(manager.rotate(t, create=create)) for t in tenants]


def require_tenant(manager: KeyManager, tenant: str) -> list[KeyRecord]:
    """The practice's keys; :class:`UnknownTenant` if it has none (a mistyped id)."""
    recs = manager.list_keys(tenant)
    if not recs:
        raise UnknownTenant(tenant, " (check the id)")
    return recs


def reenable_tenant(manager: KeyManager, tenant: str) -> dict[str, Any]:
    """Let a destroyed practice be written again, under a new key."""
    return {"tenant": tenant, "key": key_dict(manager.reenable(tenant))}


@dataclass
class KeyUsage:
    key_id: str
    rows: dict[str, int]  # "table.column" -> rows sealed under the key
    columns_scanned: int = 0
    rows_scanned: int = 0
    # "table" or "table.column" -> why it could not be read (never its content)
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.rows.values())


# Reflected types that cannot hold carnet ciphertext; every other column is
# read, and what decides is the value's Python type (str or bytes).
_NOT_TEXT = (
    sa.types.Integer,
    sa.types.Numeric,
    sa.types.Boolean,
    sa.types.Date,
    sa.types.DateTime,
    sa.types.Time,
    sa.types.Interval,
    sa.types.JSON,
)
_PREFIX_BYTES = envelope.TEXT_PREFIX.encode("ascii")


def _named_key(value: Any) -> bytes | None:
    """The key id a stored value that may be carnet ciphertext names (v1 or v2,
    binary or text form), else None.

    Read from the value's head only, so a truncated or damaged value still
    counts for the key it names.
    """
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if isinstance(value, bytes) and value.startswith(_PREFIX_BYTES):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        return envelope.text_key_id(value)
    if isinstance(value, bytes):
        return envelope.head_key_id(value)
    return None


def _under_key(value: Any, key_id: bytes) -> bool:
    return _named_key(value) == key_id


def _why(exc: BaseException) -> str:
    # The driver's class and error code only: a driver message may quote the value.
    # (SQLite's message for an undecodable value quotes the value itself.)
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None)
    if not isinstance(code, str):
        first = (getattr(orig, "args", None) or [None])[0]
        code = first if isinstance(first, int) else None
    return type(orig).__name__ + (f" {code}" if code is not None else "")


def _all_tables(manager: KeyManager) -> list[tuple[str | None, str]]:
    """Every table that may hold carnet values: the default schema's, and on
    PostgreSQL every other non-system schema's."""
    insp = sa.inspect(manager.engine)
    schemas: list[str | None] = [None]
    if manager.engine.dialect.name == "postgresql":
        default = insp.default_schema_name
        schemas += [
            s
            for s in insp.get_schema_names()
            if s != default and s != "information_schema" and not s.startswith("pg_")
        ]
    out: list[tuple[str | None, str]] = []
    for schema in schemas:
        for name in sorted(insp.get_table_names(schema=schema)):
            if schema is None and name in (manager.table.name, _jobs.JOBS_TABLE):
                continue
            out.append((schema, name))
    return out


def _candidate_columns(manager: KeyManager, schema: str | None, name: str) -> list[str]:
    cols = sa.inspect(manager.engine).get_columns(name, schema=schema)
    return [c["name"] for c in cols if not isinstance(c["type"], _NOT_TEXT)]


def _scan(
    manager: KeyManager,
    schema: str | None,
    name: str,
    columns: Sequence[str],
    key_id: bytes,
    usage: KeyUsage,
) -> None:
    """Read every row of ``columns`` (raw driver values, no primary key needed)."""
    where = f"{schema}.{name}" if schema else name
    tbl = sa.table(name, *(sa.column(c) for c in columns), schema=schema)
    counts = dict.fromkeys(columns, 0)
    rows = 0
    try:
        with manager.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(
                sa.select(*(tbl.c[c] for c in columns))
            )
            for row in result:
                rows += 1
                for c, v in zip(columns, row, strict=True):
                    if v is not None and _under_key(v, key_id):
                        counts[c] += 1
    except (sa.exc.DBAPIError, UnicodeDecodeError) as exc:
        if len(columns) > 1:
            # Find which columns cannot be read, so the refusal names them.
            for c in columns:
                _scan(manager, schema, name, [c], key_id, usage)
            return
        usage.unreadable[f"{where}.{columns[0]}"] = _why(exc)
        return
    usage.columns_scanned += len(columns)
    usage.rows_scanned += rows
    for c, n in counts.items():
        if n:
            usage.rows[f"{where}.{c}"] = n


def key_usage(
    manager: KeyManager, key_id: bytes, columns: Sequence[tuple[str, str]] | None = None
) -> KeyUsage:
    """Rows sealed under ``key_id``, by reading every row of every candidate column.

    Without ``columns``: every column of every table that is not clearly
    numeric, temporal or JSON, whatever its name, primary key or first values.
    A table or column that cannot be read is listed in ``unreadable``.
    """
    usage = KeyUsage(key_id=key_id.hex(), rows={})
    if columns is not None:
        for table, column in columns:
            tbl = resolve_table(manager.engine, table)
            if column not in tbl.c:
                raise ConfigurationError(f"table {table!r} has no column {column!r}")
            _scan(manager, tbl.schema, tbl.name, [column], key_id, usage)
        return usage
    for schema, name in _all_tables(manager):
        where = f"{schema}.{name}" if schema else name
        try:
            cols = _candidate_columns(manager, schema, name)
        except sa.exc.DBAPIError as exc:
            usage.unreadable[where] = _why(exc)
            continue
        if cols:
            _scan(manager, schema, name, cols, key_id, usage)
    return usage


_KEY_ID_HELP = "a key id is 32 hexadecimal digits (see carnet keys list)"


def parse_key_id(text: str) -> bytes:
    try:
        kid = bytes.fromhex(text)
    except ValueError:
        raise ConfigurationError(_KEY_ID_HELP) from None
    if len(kid) != envelope.KEY_ID_SIZE:
        raise ConfigurationError(_KEY_ID_HELP)
    return kid


def retire_key(
    manager: KeyManager,
    key_id: bytes,
    columns: Sequence[tuple[str, str]] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Erase an inactive key version once a full scan finds no row using it (or with ``force``).

    Refuses (:class:`KeyUsageUnknown`) when some table or column could not be
    read: the key could be used there. ``force`` retires anyway.
    """
    rec = manager.get_key(key_id)
    if rec is None:
        raise UnknownKey(key_id)
    if rec.state == ACTIVE:
        raise ConfigurationError(
            f"key {key_id.hex()} is the active key of tenant {rec.tenant!r}: rotate first"
        )
    usage = key_usage(manager, key_id, columns) if rec.state not in (RETIRED, DESTROYED) else None
    if usage is not None and usage.total and not force:
        where = ", ".join(f"{n} row(s) in {tc}" for tc, n in sorted(usage.rows.items()))
        # The command for each blocking column, so the operator need not work it out.
        todo = "; ".join(
            f"carnet reencrypt --table {tc.rpartition('.')[0]} --column {tc.rpartition('.')[2]}"
            for tc in sorted(usage.rows)
        )
        raise KeyInUse(
            f"key {key_id.hex()} (tenant {rec.tenant!r}, v{rec.version}) is still used by "
            f"{usage.total} row(s): {where}; re-encrypt them first ({todo}; or every column "
            "at once: carnet reencrypt --app MODULE:ATTR or --all), or --force to make "
            "them unreadable"
        )
    if usage is not None and usage.unreadable and not force:
        where = ", ".join(f"{w} ({why})" for w, why in sorted(usage.unreadable.items()))
        raise KeyUsageUnknown(
            f"key {key_id.hex()} (tenant {rec.tenant!r}, v{rec.version}) may still be used: "
            f"could not read {where}; grant read access (or name the encrypted columns with "
            "--table/--column), or --force to retire without knowing"
        )
    done = manager.retire(key_id)
    return {
        "key": key_dict(done),
        "rows_under_key": usage.total if usage else 0,
        "rows_made_unreadable": usage.total if usage else 0,
        "columns_scanned": usage.columns_scanned if usage else 0,
        "rows_scanned": usage.rows_scanned if usage else 0,
        "unreadable": dict(usage.unreadable) if usage else {},
    }


def destroy_tenant(manager: KeyManager, tenant: str) -> dict[str, Any]:
    """Crypto-shred a practice; :class:`UnknownTenant` if it has no key at all."""
    n = manager.destroy(tenant)
    return {
        "tenant": tenant,
        "keys_destroyed": n,
        "already_destroyed": n == 0,
        "cache_ttl_seconds": manager.cache_ttl,
    }


def rotate_master(
    manager: KeyManager, to: str, *, batch_size: int = 200, progress: Progress | None = None
) -> RewrapReport:
    """Rewrap every DEK under master key ``to``; no data row is read or written."""
    manager.create_schema()
    return manager.rewrap(to, batch_size=batch_size, progress=progress)


# One rule for a master key that no data key uses any more, said the same way
# by the CLI and the docs (cli.md, operations.md).
OLD_MASTER_RULE = (
    "keep it until no backup you may restore predates this rotation (restoring such a "
    "backup needs it, as --previous-master-key); then delete it"
)


def master_keys_in_use(manager: KeyManager) -> dict[str, int]:
    """Master key URI -> live (wrapped) data keys under it."""
    out: Counter[str] = Counter()
    for rec in manager.iter_keys():
        if rec.wrapped_key is not None:
            out[rec.master_key_uri] += 1
    return dict(out)


def erased_keys(manager: KeyManager) -> dict[str, int]:
    """Keys whose material is erased, by state: nothing to rewrap or unwrap."""
    out = {"retired": 0, "destroyed": 0}
    for rec in manager.iter_keys():
        if rec.wrapped_key is None or rec.state in (RETIRED, DESTROYED):
            out["destroyed" if rec.state == DESTROYED else "retired"] += 1
    return out


def wrapping_master_keys_hint(engine: sa.Engine) -> str | None:
    """Which master keys wrap the data keys already stored, when some are; else None.

    Read without any master key, to name the one to restore when the
    configured one cannot be opened.
    """
    try:
        if not sa.inspect(engine).has_table("carnet_keys"):
            return None
        t = sa.table("carnet_keys", sa.column("master_key_uri"), sa.column("wrapped_key"))
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(t.c.master_key_uri, sa.func.count())
                .where(t.c.wrapped_key.is_not(None))
                .group_by(t.c.master_key_uri)
            ).all()
    except sa.exc.SQLAlchemyError:
        return None  # the database error, if any, is reported by what runs next
    if not rows:
        return None
    which = ", ".join(f"{n} under {uri}" for uri, n in sorted(rows))
    return (
        f"this database already holds data keys ({which}): restore that master key "
        "from its backup and point CARNET_MASTER_KEY (or --previous-master-key) at it; "
        "a new master key cannot open them"
    )


def strip_create_hint(message: str) -> str:
    """A provider's error without its "(create one: carnet master new …)" advice."""
    head, sep, _ = message.partition(" (create one:")
    return head if sep else message


def count_keys(manager: KeyManager) -> int:
    with manager.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(manager.table)).scalar_one())


# -- reencrypt --------------------------------------------------------------------------


def reencrypt_transform(
    manager: KeyManager,
    table: str,
    column: str,
    *,
    tenant: str | None = None,
    label: str | None = None,
    old_label: str | None = None,
    counts: Counter[str] | None = None,
) -> Callable[[BatchRow], Any | None]:
    """The transform moving one value to its tenant's active DEK, current label and
    the current format (a v1 value is re-sealed as v2, whatever its key).

    ``counts`` receives why each row was left alone (``nulls``, ``plaintext``,
    ``destroyed``, ``other_practice``), so a report does not call a shredded
    row or a NULL "already current", and ``from_v1``, the values re-sealed
    from format v1.
    """
    left: Counter[str] = counts if counts is not None else Counter()
    new_label = _label(table, column, label)
    labels = [old_label, new_label] if old_label else [new_label]
    keys = _Keys(manager)

    def transform(row: BatchRow) -> Any | None:
        blob = blob_of(row.value)
        if blob is None:
            left["nulls"] += 1
            return None
        if isinstance(blob, str):
            left["plaintext"] += 1  # legacy plaintext: that is migrate's work
            return None
        kid = envelope.key_id_of(blob)
        rec = keys.get(kid)
        if rec is None:
            raise UnknownKey(kid)
        if rec.kind == DECOY:
            return None  # a decoy stays under its decoy key, unopened (carnet.decoys)
        if tenant is not None and rec.tenant != tenant:
            left["other_practice"] += 1
            return None
        if rec.state in (DESTROYED, RETIRED):
            left["destroyed"] += 1  # can never be read again: nothing to move
            return None
        # A v1 value is re-sealed (as v2) even under the active key and label.
        on_active = kid == keys.active(rec.tenant) and envelope.is_current(blob)
        if on_active and old_label is None:
            return None
        for lab in labels:
            try:
                plain = manager.decrypt(blob, tenant=rec.tenant, label=lab)
                break
            except InvalidCiphertext:
                continue
        else:
            raise InvalidCiphertext(label=new_label, tenant=rec.tenant)
        if on_active and lab == new_label:
            return None
        sealed = manager.encrypt(plain, tenant=rec.tenant, label=new_label)
        if not envelope.is_current(blob):
            left["from_v1"] += 1
        return envelope.to_text(sealed) if isinstance(row.value, str) else sealed

    return transform


def reencrypt_job_name(table: str, column: str, tenant: str | None = None) -> str:
    return f"reencrypt:{table}.{column}" + (f":{tenant}" if tenant else "")


_LEFT = ("nulls", "plaintext", "destroyed", "other_practice")


@dataclass
class ReencryptReport(BatchReport):
    """A batch report that tells apart the rows ``reencrypt`` leaves alone.

    ``skipped`` (the batch engine's count) is every row not rewritten;
    ``already_current`` is the part of it already on the active key and label
    in format v2. ``from_v1``: values of format v1 re-sealed as v2 (counted
    when sealed, so a row the application wrote meanwhile, a conflict, counts
    too). A batch retried after a lock wait is counted again.
    """

    nulls: int = 0
    plaintext: int = 0
    destroyed: int = 0
    other_practice: int = 0
    from_v1: int = 0

    @property
    def already_current(self) -> int:
        return max(self.skipped - sum(int(getattr(self, k)) for k in _LEFT), 0)

    def add(self, other: dict[str, Any]) -> None:
        self.scanned += other["scanned"]
        self.rewritten += other["rewritten"]
        self.skipped += other["skipped"]
        self.conflicts += other["conflicts"]
        self.failed.extend(tuple(pk) for pk in other["failed"])
        for k in (*_LEFT, "from_v1"):
            setattr(self, k, getattr(self, k) + other.get(k, 0))

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        d.update({k: getattr(self, k) for k in (*_LEFT, "from_v1")})
        d["already_current"] = self.already_current
        return d


def fresh_pass_if_finished(
    engine: sa.Engine, job: str, workers: int, *, any_count: bool = False
) -> bool:
    """Forget a finished job run with another worker count, so a new pass starts.

    A finished job has nothing to resume, so its worker count binds nothing;
    only an unfinished one must be resumed the way it was started. With
    ``any_count`` (one coordinating process, ``--workers N``) a finished job is
    forgotten whatever its count, so progress starts from zero and the new
    pass cuts ranges over today's rows.
    """
    if not sa.inspect(engine).has_table(_jobs.JOBS_TABLE):
        return False
    t = _jobs.JOBS
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.workers, t.c.done).where(t.c.job == job)).all()
    if (
        rows
        and all(r.done for r in rows)
        and (any_count or any(r.workers != workers for r in rows))
    ):
        _jobs.reset_job(engine, job)
        return True
    return False


def reencrypt(
    manager: KeyManager,
    table: str,
    column: str,
    *,
    tenant: str | None = None,
    label: str | None = None,
    old_label: str | None = None,
    batch_size: int = 500,
    worker: tuple[int, int] = (0, 1),
    job: str | None = None,
    restart: bool = False,
    progress: Progress | None = None,
) -> ReencryptReport:
    """Move every value of ``table.column`` to its practice's active DEK (and label)."""
    require_encrypted(manager, table, column)
    job = job or reencrypt_job_name(table, column, tenant)
    new_label = label or f"{table}.{column}"
    if old_label is not None and old_label != new_label:
        from .dbchecks import accept_labels  # the database's check takes both labels meanwhile

        accept_labels(manager.engine, table, column, new_label, old_label)
    if not restart:
        fresh_pass_if_finished(manager.engine, job, worker[1])
    counts: Counter[str] = Counter()
    rep = run_batches(
        manager.engine,
        table,
        column,
        reencrypt_transform(
            manager, table, column, tenant=tenant, label=label, old_label=old_label, counts=counts
        ),
        job=job,
        batch_size=batch_size,
        worker=worker,
        progress=progress,
        restart=restart,
    )
    out = ReencryptReport(job=rep.job)
    out.add({**rep.as_dict(), **counts})
    out.resumed_from = rep.resumed_from
    out.elapsed = rep.elapsed
    if not out.failed and tenant is None:
        # The new label alone, and no v1 value left: f1 becomes f2.
        from .dbchecks import tighten_after_reencrypt

        relabel = old_label is not None and old_label != new_label
        tighten_after_reencrypt(manager.engine, table, column, new_label, relabel)
    return out


# -- reencrypt every encrypted column (--app / --all) ---------------------------------------


@dataclass(frozen=True)
class EncryptedColumn:
    """A column to re-encrypt: ``table`` (``schema.table`` allowed), ``column``, and its
    field label when the application sets one (else ``table.column``)."""

    table: str
    column: str
    label: str | None = None


@dataclass
class ColumnOutcome:
    table: str
    column: str
    # "reencrypted"; "done" (finished before an interruption of this run);
    # "not encrypted" (no carnet value yet: carnet migrate's work); "no table"
    outcome: str
    report: dict[str, Any] | None = None


@dataclass
class ReencryptAllReport:
    run: str
    resumed: bool
    columns: list[ColumnOutcome]
    total: ReencryptReport
    elapsed: float = 0.0

    @property
    def failed(self) -> list[tuple[Any, ...]]:
        return self.total.failed

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "run": self.run,
            "resumed": self.resumed,
            "columns": [asdict(c) for c in self.columns],
            "total": self.total.as_dict(),
            "elapsed": self.elapsed,
        }


def run_name(what: str, tenant: str | None = None) -> str:
    """The progress record of a run over several columns (``reencrypt:app``, ``reencrypt:all``)."""
    return f"reencrypt:{what}" + (f":{tenant}" if tenant else "")


def _has_table(engine: sa.Engine, table: str) -> bool:
    schema, _, name = table.rpartition(".")
    return sa.inspect(engine).has_table(name, schema=schema or None)


def rows_to_scan(manager: KeyManager, columns: Sequence[EncryptedColumn]) -> int:
    """Rows a pass over ``columns`` reads (a table once per column), for one progress bar."""
    return sum(
        estimate_rows(manager.engine, c.table)
        for c in columns
        if _has_table(manager.engine, c.table)
    )


def reencrypt_columns(
    manager: KeyManager,
    columns: Sequence[EncryptedColumn],
    *,
    run: str,
    tenant: str | None = None,
    batch_size: int = 500,
    restart: bool = False,
    progress: Progress | None = None,
) -> ReencryptAllReport:
    """:func:`reencrypt` every column in turn, as one resumable run.

    Each column is the job :func:`reencrypt` would run for it alone
    (``reencrypt:T.C``); the run has its own row in ``carnet_jobs``. A run
    killed midway resumes, when started again, inside the column it was in
    and skips the columns it had finished; a finished run (or ``restart``)
    starts a fresh pass over every column. A declared table missing from the
    database, and a column with no carnet value yet, are reported and left.
    """
    started = time.monotonic()
    engine = manager.engine
    resuming = not restart and _jobs.run_state(engine, run) is False
    if not resuming:
        # A fresh pass: what a column job recorded before belongs to an older one.
        for c in columns:
            _jobs.reset_job(engine, reencrypt_job_name(c.table, c.column, tenant))
        _jobs.start_run(engine, run)
    total = ReencryptReport(job=run)
    outcomes: list[ColumnOutcome] = []
    for c in columns:
        job = reencrypt_job_name(c.table, c.column, tenant)
        if not _has_table(engine, c.table):
            outcomes.append(ColumnOutcome(c.table, c.column, "no table"))
            continue
        if resuming and _jobs.job_finished(engine, job):
            outcomes.append(ColumnOutcome(c.table, c.column, "done"))
            if progress is not None:
                progress(estimate_rows(engine, c.table))
            continue
        tbl = check_column(engine, c.table, c.column)
        if not is_encrypted_column(manager, tbl, c.column):
            outcomes.append(ColumnOutcome(c.table, c.column, "not encrypted"))
            if progress is not None:
                progress(estimate_rows(engine, c.table))
            continue
        rep = reencrypt(
            manager,
            c.table,
            c.column,
            tenant=tenant,
            label=c.label,
            batch_size=batch_size,
            job=job,
            progress=progress,
        )
        d = rep.as_dict()
        outcomes.append(ColumnOutcome(c.table, c.column, "reencrypted", d))
        total.add(d)
    total.elapsed = time.monotonic() - started
    # Finished, failed rows included: a rerun is a fresh pass that retries them.
    _jobs.finish_run(
        engine,
        run,
        {
            "scanned": total.scanned,
            "rewritten": total.rewritten,
            "skipped": total.skipped,
            "conflicts": total.conflicts,
            "failed": len(total.failed),
        },
    )
    return ReencryptAllReport(
        run=run, resumed=resuming, columns=outcomes, total=total, elapsed=total.elapsed
    )


@dataclass
class WorkerSpec:
    database_url: str
    master_key: str
    previous_master_keys: tuple[str, ...]
    table: str
    column: str
    tenant: str | None
    label: str | None
    old_label: str | None
    batch_size: int
    job: str
    restart: bool


def _reencrypt_worker(spec: WorkerSpec, index: int, count: int) -> dict[str, Any]:
    def notice(message: str) -> None:
        # A worker process has no terminal of its own: stderr is the parent's.
        print(f"carnet: worker {index}/{count}: {message}", file=sys.stderr, flush=True)

    manager = open_manager(
        spec.database_url, spec.master_key, spec.previous_master_keys, lock_notice=notice
    )
    try:
        rep = reencrypt(
            manager,
            spec.table,
            spec.column,
            tenant=spec.tenant,
            label=spec.label,
            old_label=spec.old_label,
            batch_size=spec.batch_size,
            worker=(index, count),
            job=spec.job,
            restart=spec.restart,
        )
        return rep.as_dict()
    finally:
        manager.close()
        manager.engine.dispose()


def reencrypt_parallel(
    spec: WorkerSpec, workers: int, poll: Callable[[dict[str, Any]], None] | None = None
) -> ReencryptReport:
    """Run ``workers`` local processes on disjoint key ranges of one job; sum their reports.

    ``poll`` is called about twice a second with the job's summed progress
    from ``carnet_jobs`` (the same numbers workers on other machines add to).
    """
    started = time.monotonic()
    engine = make_engine(spec.database_url)
    try:
        if spec.restart:
            _jobs.reset_job(engine, spec.job)
        else:
            fresh_pass_if_finished(engine, spec.job, workers, any_count=True)
        # Create the job's ranges once, before the workers race to.
        _jobs.ensure_jobs_table(engine)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futs = [
                pool.submit(_reencrypt_worker, _no_restart(spec), i, workers)
                for i in range(workers)
            ]
            while not all(f.done() for f in futs):
                if poll is not None:
                    poll(_jobs.job_progress(engine, spec.job))
                time.sleep(0.5)
            results = [f.result() for f in futs]
            if poll is not None:
                poll(_jobs.job_progress(engine, spec.job))
    finally:
        engine.dispose()
    total = ReencryptReport(job=spec.job)
    for r in results:
        total.add(r)
    total.elapsed = time.monotonic() - started
    return total


def _no_restart(spec: WorkerSpec) -> WorkerSpec:
    from dataclasses import replace

    return replace(spec, restart=False)


def estimate_rows(engine: sa.Engine, table: str) -> int:
    tbl = resolve_table(engine, table)
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(tbl)).scalar_one())


# -- verify -----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``verify`` found. Rows under a destroyed key (a crypto-shredded
    practice) are the erasure working, counted as ``destroyed``, not as failures."""

    table: str
    column: str
    rows: int = 0
    ok: int = 0
    nulls: int = 0
    plaintext: int = 0
    destroyed: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # practice -> {"ok", "destroyed", "failed"}; "" when the practice is unknown
    # (a value under a key carnet does not have, with no practice column)
    practices: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_pks: list[list[Any]] = field(default_factory=list)
    tenant_column: str | None = None
    # the database's checks of the column (carnet.verify.database_checks)
    checks: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _tenant_source(
    manager: KeyManager,
    table: str,
    column: str,
    tenant_column: str,
    pk: Sequence[str] = (),
) -> tuple[sa.Table, sa.ColumnElement[Any], Callable[[sa.Select[Any]], sa.Select[Any]] | None]:
    """The table, the row's practice column and the join reaching it.

    ``practice_id`` is a column of the table itself; ``patients.practice_id``
    a column of a parent table reached through foreign keys, resolved exactly
    as ``carnet migrate --tenant`` resolves it.
    """
    if "." not in tenant_column:
        check_column(manager.engine, table, tenant_column, pk=pk)
        tbl = resolve_table(manager.engine, table)
        return tbl, tbl.c[tenant_column], None
    from .migrate.target import resolve

    target = resolve(manager.engine, table, column, tenant=tenant_column, pk=pk)
    return target.table, target.tenant_column(), target.join_or_none()


def verify(
    manager: KeyManager,
    table: str,
    column: str,
    *,
    label: str | None = None,
    allow_plaintext: bool = False,
    batch_size: int = 1000,
    tenant_column: str | None = None,
    progress: Progress | None = None,
    pk: Sequence[str] = (),
) -> VerifyReport:
    """Decrypt every value; count failures by reason and list their primary keys.

    Without ``tenant_column`` each value is opened as its key's practice, which
    proves it authentic but not that it sits in a row of that practice; with it,
    each value must open as its own row's practice, as the application reads it,
    and a row without a practice fails (``no_practice``). ``tenant_column`` is a
    column of the table, or ``parent.column`` of a table reached through foreign
    keys (``patients.practice_id``). ``pk`` names the columns to page by in a
    table without a declared primary key.

    The walk is :func:`carnet.verify.walk`, the one ``carnet migrate verify``
    reports too.
    """
    check_column(manager.engine, table, column, pk=pk)
    lab = _label(table, column, label)

    def fails(out: vf.Outcome) -> bool:
        return out.kind == vf.FAILED or (out.kind == vf.PLAINTEXT and not allow_plaintext)

    # One Table for the walk, the join and the practice column, so the SELECT
    # names a single FROM.
    join = None
    tcol = None
    if tenant_column is not None:
        tbl, tcol, join = _tenant_source(manager, table, column, tenant_column, pk)
    else:
        tbl = resolve_table(manager.engine, table)
    found = vf.walk(
        manager,
        manager.engine,
        tbl,
        column,
        label=lab,
        tenant=tcol,
        join=join,
        pk=pk,
        batch_size=batch_size,
        sample_as=lambda out: "failed" if fails(out) else None,
        samples=None,
        progress=progress,
    )
    rep = VerifyReport(table=table, column=column, tenant_column=tenant_column)
    rep.rows = found.rows
    rep.ok = found.total(vf.OK)
    rep.nulls = found.total(vf.NULL)
    rep.plaintext = found.total(vf.PLAINTEXT)
    rep.destroyed = found.total(vf.DESTROYED)
    for (kind, reason), n in found.counts.items():
        if kind == vf.FAILED or (kind == vf.PLAINTEXT and not allow_plaintext):
            rep.failed += n
            name = reason or PLAINTEXT
            rep.reasons[name] = rep.reasons.get(name, 0) + n
    for practice, c in found.practices.items():
        counts = {
            "ok": c[vf.OK],
            "destroyed": c[vf.DESTROYED],
            "failed": c[vf.FAILED] + (0 if allow_plaintext else c[vf.PLAINTEXT]),
        }
        if any(counts.values()):
            rep.practices[practice] = counts
    rep.failed_pks = found.samples.get("failed", [])
    rep.checks = vf.database_checks(manager.engine, table, column, tenant_column, pk)
    return rep


def env_previous_master_keys() -> tuple[str, ...]:
    """``CARNET_PREVIOUS_MASTER_KEYS``, parsed as :meth:`KeyManager.from_env` parses it."""
    return env_settings().previous_master_keys
