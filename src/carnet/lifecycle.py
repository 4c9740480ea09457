"""Key-lifecycle operations behind the ``carnet`` commands, as plain functions.

Each returns a dataclass or dict that the CLI prints (as text or JSON) and
that tests inspect without a terminal. Nothing here returns or logs a
plaintext note or key material: reports hold counts, key ids, tenant ids and
primary keys.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from . import envelope
from . import jobs as _jobs
from ._engines import SQLITE_LOCK_TIMEOUT, make_engine, safe_url

# The commands' library calls, each job in its own module, gathered here for
# the CLI and for applications that call them as ``carnet.lifecycle.X`` (see __all__).
from .batchops import (
    EncryptedColumn,
    ReencryptAllReport,
    ReencryptReport,
    WorkerSpec,
    estimate_rows,
    fresh_pass_if_finished,
    reencrypt,
    reencrypt_columns,
    reencrypt_job_name,
    reencrypt_parallel,
    reencrypt_transform,
    rows_to_scan,
    run_name,
)
from .errors import (
    ConfigurationError,
    KeyInUse,
    KeyUsageUnknown,
    UnknownKey,
    UnknownTenant,
)
from .keystore import ACTIVE, DESTROYED, RETIRED, KeyRecord
from .manager import KeyManager, RewrapReport, env_settings
from .providers import create_master_key
from .reflect import (
    check_column,
    resolve,
    resolve_table,
)
from .status import (
    ColumnStatus,
    StatusReport,
    TenantStatus,
    UncheckedMasterKey,
    check_master_key,
    column_status,
    status,
)
from .stored import (
    PLAINTEXT,
    _carnet_value,
    _Keys,
    blob_of,
    discover_columns,
    is_encrypted_column,
    require_encrypted,
)
from .verify import (
    VerifyReport,
    verify,
)

Progress = Callable[[int], None]


# -- opening ----------------------------------------------------------------------------


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
    from .audit_store import AUDIT_TABLE

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
    from .schema import table_names

    carnet_tables = table_names(manager.table.name)
    out: list[tuple[str | None, str]] = []
    for schema in schemas:
        for name in sorted(insp.get_table_names(schema=schema)):
            if schema is None and name in carnet_tables:
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


def env_previous_master_keys() -> tuple[str, ...]:
    """``CARNET_PREVIOUS_MASTER_KEYS``, parsed as :meth:`KeyManager.from_env` parses it."""
    return env_settings().previous_master_keys


__all__ = [
    "SQLITE_LOCK_TIMEOUT",
    "make_engine",
    "ColumnStatus",
    "EncryptedColumn",
    "PLAINTEXT",
    "ReencryptAllReport",
    "ReencryptReport",
    "StatusReport",
    "TenantStatus",
    "UncheckedMasterKey",
    "VerifyReport",
    "WorkerSpec",
    "_Keys",
    "_carnet_value",
    "blob_of",
    "check_column",
    "check_master_key",
    "column_status",
    "discover_columns",
    "estimate_rows",
    "fresh_pass_if_finished",
    "is_encrypted_column",
    "reencrypt",
    "reencrypt_columns",
    "reencrypt_job_name",
    "reencrypt_parallel",
    "reencrypt_transform",
    "require_encrypted",
    "resolve",
    "resolve_table",
    "rows_to_scan",
    "run_name",
    "status",
    "verify",
]
