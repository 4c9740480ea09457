"""KeyManager: key store + master key + cache, and the value-level encrypt/decrypt.

Dependencies point one way: envelope format and providers below, the
SQLAlchemy type and the batch engine above.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa

from . import _aead, envelope
from .cache import TTLCache
from .context import activate, bind_manager
from .errors import (
    ConfigurationError,
    KeyDestroyed,
    KeyRetired,
    KeyStoreInconsistent,
    MasterKeyUnavailable,
    TenantMismatch,
    TenantRequired,
    UnknownKey,
    UnknownTenant,
)
from .keystore import (
    ACTIVE,
    DATA,
    DESTROYED,
    INACTIVE,
    INDEX,
    RETIRED,
    KeyRecord,
    add_key_kinds,
    keys_table,
    lock_conflict,
    make_practice_ids_exact,
    utcnow,
    wrap_context,
)
from .providers.base import MasterKey, open_master_key

if TYPE_CHECKING:
    # Only for annotations: the asyncio extension needs greenlet, an optional extra.
    from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("carnet")
_FAST_PATH_MAX = 100_000
_KEY_ID = envelope.KEY_ID

DecryptHook = Callable[[str, str, int], None]
_T = TypeVar("_T")

# Tries of a key-table change that lost a race to another process before giving up.
_RACE_ATTEMPTS = 8


class _Raced(Exception):
    """A compare-and-set on the key table found the row changed since it was read."""


class IndexRoot:
    """An unwrapped blind-index root key, held only in the cache. Never printed."""

    __slots__ = ("key_id", "version", "secret", "derived")

    def __init__(self, key_id: bytes, version: int, secret: bytes) -> None:
        self.key_id = key_id
        self.version = version
        self.secret = secret
        # Per-index keys derived from this root (carnet.indexkeys), dropped with it.
        self.derived: dict[tuple[str, str, str], Any] = {}

    def __repr__(self) -> str:
        return f"<IndexRoot {self.key_id.hex()} v{self.version}>"


class _Dek:
    """An unwrapped data key, held only in the cache. Never printed."""

    __slots__ = ("key_id", "tenant", "cipher")

    def __init__(self, key_id: bytes, tenant: str, secret: bytes) -> None:
        self.key_id = key_id
        self.tenant = tenant
        self.cipher = _aead.cipher(secret)

    def __repr__(self) -> str:
        return f"<DEK {self.key_id.hex()} tenant={self.tenant!r}>"


@dataclass
class RewrapReport:
    rewrapped: int
    already: int
    skipped_destroyed: int
    master_key_uri: str


def _check_tenant(tenant: object) -> str:
    if tenant is None or tenant == "":
        raise TenantRequired(
            "no tenant for an encrypted value: set the row's tenant column, "
            "or use carnet.tenant_scope(...)"
        )
    if not isinstance(tenant, str):
        tenant = str(tenant)
    return tenant


class KeyManager:
    """Data keys for every tenant, wrapped by a master key kept outside the database.

    ``bind`` is an Engine or a database URL where ``carnet_keys`` lives
    (usually the application's own database). ``master_key`` is a URI
    (``file:///…``, ``keyring://…``, ``aws-kms://…``, ``pkcs11://…``) or a
    :class:`~carnet.providers.MasterKey`. DEKs wrapped by any master key in
    ``previous_master_keys`` still unwrap (during and after ``rewrap``);
    DEKs naming any other master key are refused, so a row planted in the
    key table cannot make carnet use a master key of an attacker's choosing.
    """

    def __init__(
        self,
        bind: sa.Engine | AsyncEngine | str,
        master_key: str | MasterKey,
        *,
        previous_master_keys: Iterable[str | MasterKey] = (),
        cache_size: int = 10_000,
        cache_ttl: float = 300.0,
        table_name: str = "carnet_keys",
        require_scope: bool = False,
        read_only: bool = False,
    ) -> None:
        activate()  # carnet's SQLAlchemy listeners, from the first manager on
        if isinstance(bind, str):
            bind = _engine_from_url(bind)
        self.async_engine: AsyncEngine | None = None
        if _is_async_engine(bind):
            # Key-table statements run through the async engine's sync facade
            # inside SQLAlchemy's greenlets (an AsyncSession flush or load),
            # and through a synchronous twin on the same database elsewhere
            # (key management from ordinary code, a thread).
            self.async_engine = bind  # type: ignore[assignment]
            bind = bind.sync_engine  # type: ignore[union-attr]
        self._engine: sa.Engine = bind  # type: ignore[assignment]
        self._twin: sa.Engine | None = None
        self._key_async: AsyncEngine | None = None
        self._master = open_master_key(master_key)
        self._masters: dict[str, MasterKey] = {self._master.uri: self._master}
        for prev in previous_master_keys:
            mk = open_master_key(prev)
            self._masters.setdefault(mk.uri, mk)
        self.metadata = sa.MetaData()
        self._kinds_table = keys_table(self.metadata, table_name)
        self._table: sa.Table | None = None  # the shape found in the database, on first use
        self._keys: TTLCache[_Dek] = TTLCache(cache_size, cache_ttl)
        self._active: TTLCache[_Dek] = TTLCache(cache_size, cache_ttl)
        self._index_roots: TTLCache[list[IndexRoot]] = TTLCache(cache_size, cache_ttl)
        self._sealers: dict[tuple[str, str], envelope.Sealer] = {}
        self._openers: dict[tuple[bytes, str, str], envelope.Opener] = {}
        self._fast_hits = 0
        self._lock = threading.Lock()
        self.master_wraps = 0
        self.master_unwraps = 0
        self.keys_created = 0
        self.legacy_plaintext_reads = 0
        self.decrypt_hook: DecryptHook | None = None
        # Strict mode: application seals and opens need a matching tenant_scope
        # (see carnet.configure).
        self.require_scope = require_scope
        # A read replica: reads keys, never writes the key table.
        self.read_only = read_only
        if bind.echo == "debug" or log_debug_enabled():
            warnings.warn(
                "SQLAlchemy echo='debug' logs result rows: decrypted notes read through "
                "tenant_scope would reach the log. Turn it off where real data is read.",
                stacklevel=2,
            )

    # -- configuration -------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        """The engine of the key table, usable from the calling code.

        For an async engine: its sync facade inside SQLAlchemy's greenlets
        (statements of an AsyncSession or AsyncConnection), else a synchronous
        engine on the same database (created on first use).
        """
        if self.async_engine is None:
            return self._engine
        if _in_greenlet():
            # A pool of its own: the application's tasks may hold every
            # connection of theirs while their flushes wait for a first key.
            if self._key_async is None:
                from sqlalchemy.ext.asyncio import create_async_engine

                self._key_async = create_async_engine(self._engine.url, pool_size=2, max_overflow=8)
            return self._key_async.sync_engine
        if self._twin is None:
            self._twin = sa.create_engine(_sync_url(self._engine.url))
        return self._twin

    async def create_schema_async(self) -> list[str]:
        """:meth:`create_schema` for an async engine, awaited on the event loop."""
        import asyncio

        # In a worker thread, through the synchronous twin: the loop goes on.
        return await asyncio.to_thread(self.create_schema)

    @property
    def master_key(self) -> MasterKey:
        return self._master

    @property
    def cache_ttl(self) -> float:
        return self._keys.ttl

    def __repr__(self) -> str:
        return (
            f"<KeyManager {self._engine.url!r} master={self._master.uri} "
            f"table={self._kinds_table.name}>"
        )

    def bind(self, engine: Any) -> KeyManager:
        """Use this manager for encrypted columns in statements run on ``engine``.

        One model may then live in several databases, each with its own key
        table and master key: the manager is chosen from the engine (or
        session bind) a statement runs on; :func:`carnet.configure` remains
        the default for engines not bound. Returns ``self``.
        """
        bind_manager(engine, self)
        return self

    def create_schema(self) -> list[str]:
        """Create ``carnet_keys`` if it is missing; upgrade one made before key kinds;
        make its practice ids exact.

        Returns the columns of an existing table that were converted from a
        collation folding case or trailing spaces (MariaDB), usually none.
        """
        self.metadata.create_all(self.engine)
        add_key_kinds(self.engine, self._kinds_table)
        self._table = self._kinds_table
        return make_practice_ids_exact(self.engine, self.table)

    @property
    def table(self) -> sa.Table:
        """The key table, in the shape the database has.

        A table made before key kinds keeps working for data keys until
        :meth:`create_schema` (``carnet init``) upgrades it; blind-index roots
        need the upgrade.
        """
        t = self._table
        if t is None:
            t = self._kinds_table
            insp = sa.inspect(self.engine)
            if insp.has_table(t.name, schema=t.schema) and "kind" not in {
                c["name"] for c in insp.get_columns(t.name, schema=t.schema)
            }:
                t = keys_table(sa.MetaData(), t.name, kinds=False)
            self._table = t
        return t

    def _is_data(self, t: sa.Table) -> sa.ColumnElement[bool]:
        # Every key of a table made before key kinds is a data key.
        return t.c.kind == DATA if "kind" in t.c else sa.true()

    def _require_kinds(self) -> None:
        if "kind" not in self.table.c:
            raise ConfigurationError(
                f"{self.table.name} was made before key kinds: run 'carnet init' (or "
                "KeyManager.create_schema()) once to upgrade it, see docs/format.md"
            )

    # -- value level ---------------------------------------------------------------

    # The hot paths: one dict lookup per value once a (tenant, label) or
    # (key id, label, tenant) has been seen, with the same expiry as the cached
    # DEK, so a destroyed key stops working within the cache time-to-live.

    def encrypt(self, plaintext: bytes, *, tenant: str, label: str) -> bytes:
        """Seal ``plaintext`` under the tenant's active DEK (created on first use)."""
        sealer = self._sealers.get((tenant, label))
        if sealer is None or sealer.expires <= time.monotonic():
            sealer = self._sealer(tenant, label)
        else:
            self._fast_hits += 1
        return sealer.seal(plaintext)

    def _sealer(self, tenant: str, label: str) -> envelope.Sealer:
        dek = self._active.get(tenant)
        if dek is None:
            dek = self._active_dek(_check_tenant(tenant))
        expires = self._active.expiry(tenant) or time.monotonic()
        sealer = envelope.Sealer(dek.cipher, dek.key_id, label, tenant, expires)
        if len(self._sealers) > _FAST_PATH_MAX:
            self._sealers.clear()
        self._sealers[(tenant, label)] = sealer
        return sealer

    def decrypt(self, blob: bytes, *, tenant: str, label: str) -> bytes:
        """Open a value sealed for ``tenant`` and ``label``; raise a carnet error otherwise."""
        opener = self._openers.get((blob[_KEY_ID], label, tenant))
        if opener is None or opener.expires <= time.monotonic():
            opener = self._opener(envelope.key_id_of(blob), tenant, label)
        else:
            self._fast_hits += 1
        plaintext = opener.open(blob)
        if self.decrypt_hook is not None:
            self.decrypt_hook(tenant, label, 1)
        return plaintext

    def _opener(self, key_id: bytes, tenant: str, label: str) -> envelope.Opener:
        dek = self._keys.get(key_id)
        if dek is None:
            dek = self._dek_for(key_id, _check_tenant(tenant))
        if dek.tenant != tenant:
            # A value of another practice: copied into this row, or read under the
            # wrong scope. The key's tenant is metadata, so naming it leaks nothing.
            raise TenantMismatch(tenant, dek.tenant)
        expires = self._keys.expiry(key_id) or time.monotonic()
        opener = envelope.Opener(dek.cipher, key_id, label, tenant, expires)
        if len(self._openers) > _FAST_PATH_MAX:
            self._openers.clear()
        self._openers[(key_id, label, tenant)] = opener
        return opener

    def _drop_fast_paths(self) -> None:
        self._sealers.clear()
        self._openers.clear()

    def encrypt_text(self, text: str, *, tenant: str, label: str) -> bytes:
        return self.encrypt(text.encode("utf-8"), tenant=tenant, label=label)

    def decrypt_text(self, blob: bytes, *, tenant: str, label: str) -> str:
        return self.decrypt(blob, tenant=tenant, label=label).decode("utf-8")

    def key_id_of(self, blob: bytes) -> bytes:
        return envelope.key_id_of(blob)

    # -- key lookup ----------------------------------------------------------------

    def _master_for(self, uri: str) -> MasterKey:
        mk = self._masters.get(uri)
        if mk is None:
            raise MasterKeyUnavailable(
                f"a data key is wrapped by master key {uri}, which this KeyManager was not "
                "given; pass it as master_key or in previous_master_keys"
            )
        return mk

    def _unwrap(self, rec: KeyRecord) -> _Dek:
        rec.check()
        if rec.state == DESTROYED:
            raise KeyDestroyed(rec.key_id, rec.tenant)
        if rec.state == RETIRED or rec.wrapped_key is None:
            raise KeyRetired(rec.key_id, rec.tenant)
        ctx = wrap_context(rec.tenant, rec.key_id, rec.kind)
        secret = _off_loop(self._master_for(rec.master_key_uri).unwrap, rec.wrapped_key, ctx)
        self.master_unwraps += 1
        dek = _Dek(rec.key_id, rec.tenant, secret)
        if rec.kind == DATA:
            # Only data keys are cached as such: an index root must never
            # become the AES key of a value whose header names it.
            self._keys.put(rec.key_id, dek)
        return dek

    def check_unwrap(self, rec: KeyRecord) -> None:
        """Unwrap ``rec``'s data key under its master key (raises the carnet error if
        it does not open), caching it as a read would."""
        self._unwrap(rec)

    def _dek_for(self, key_id: bytes, tenant: str) -> _Dek:
        rec = self.get_key(key_id)
        if rec is None or rec.kind != DATA:
            # An index root key never decrypts a value, whatever a header names.
            raise UnknownKey(key_id)
        return self._unwrap(rec)

    def _tenant_rows(
        self, conn: sa.Connection, tenant: str, *, lock: bool = False, kind: str | None = DATA
    ) -> list[KeyRecord]:
        """Every key row of exactly ``tenant`` (of ``kind``; None: all kinds), checked row by row.

        One statement, so the rows are one consistent snapshot. It also reads
        any row whose active marker names ``tenant``: such a row of another
        practice would otherwise silently take the practice's place. The SQL
        comparison is exact on a table made or converted by ``create_schema``;
        Python compares again so that a table still folding ids (an old MariaDB
        table) fails closed instead of handing out another practice's key.
        """
        t = self.table
        q = sa.select(t).where(sa.or_(t.c.tenant == tenant, t.c.active_tenant == tenant))
        if lock:
            q = q.with_for_update()
        recs = [KeyRecord.from_row(r) for r in conn.execute(q)]
        for rec in recs:
            if rec.tenant != tenant and rec.active_tenant != tenant:
                raise KeyStoreInconsistent(
                    f"the key table matched practice {rec.tenant!r} for {tenant!r}: its "
                    "collation folds practice ids; run 'carnet init' to make them exact"
                )
            rec.check()
        return recs if kind is None else [r for r in recs if r.kind == kind]

    def _query_active(self, conn: sa.Connection, tenant: str) -> tuple[KeyRecord | None, set[str]]:
        """The tenant's active data key record (if any) and the states of all its data keys."""
        recs = self._tenant_rows(conn, tenant)
        active = [r for r in recs if r.state == ACTIVE]
        return (active[0] if active else None), {r.state for r in recs}

    def _active_dek(self, tenant: str, conn: sa.Connection | None = None) -> _Dek:
        """The tenant's active key, created if it has none and never had one.

        A practice with a destroyed key and no active one stays destroyed
        (``KeyDestroyed``) until :meth:`reenable`. With ``conn``, reads and a
        creation happen inside that connection's open transaction (SQLite,
        where a second connection would wait on the application's own write
        lock); otherwise in short transactions of their own.
        """
        for _attempt in range(5):
            if conn is None:
                with self.engine.connect() as own:
                    rec, states = self._query_active(own, tenant)
            else:
                rec, states = self._query_active(conn, tenant)
            if rec is not None:
                cached = self._keys.get(rec.key_id)
                dek = cached if cached is not None else self._unwrap(rec)
                self._active.put(tenant, dek)
                return dek
            if DESTROYED in states:
                raise self._destroyed(tenant)
            if states:
                raise KeyStoreInconsistent(
                    f"practice {tenant!r} has keys but no active one: "
                    f"run 'carnet keys rotate --tenant {tenant}'"
                )
            self._insert_key(tenant, conn)
        raise MasterKeyUnavailable(f"could not create or load an active key for tenant {tenant!r}")

    def _new_wrapped(self, tenant: str) -> tuple[bytes, bytes, bytes]:
        key_id = os.urandom(envelope.KEY_ID_SIZE)
        secret = os.urandom(32)
        wrapped = _off_loop(self._master.wrap, secret, {"tenant": tenant, "key_id": key_id.hex()})
        self.master_wraps += 1
        return key_id, secret, wrapped

    def _insert_row(
        self,
        conn: sa.Connection,
        tenant: str,
        key_id: bytes,
        wrapped: bytes,
        version: int | None = None,
        kind: str = DATA,
    ) -> int:
        """Insert a key version of ``kind`` (default: the next one) as its active key."""
        t = self.table
        now = utcnow()
        if version is None:
            version = (
                1
                + conn.execute(
                    sa.select(sa.func.coalesce(sa.func.max(t.c.version), 0)).where(
                        t.c.tenant == tenant, t.c.kind == kind if "kind" in t.c else sa.true()
                    )
                ).scalar_one()
            )
        conn.execute(
            t.insert().values(
                key_id=key_id.hex(),
                tenant=tenant,
                version=version,
                state=ACTIVE,
                **({"kind": kind} if "kind" in t.c else {}),
                active_tenant=tenant,
                master_key_uri=self._master.uri,
                wrapped_key=wrapped,
                created_at=now,
                updated_at=now,
            )
        )
        return int(version)

    def _writable(self, what: str, tenant: str | None = None) -> None:
        if self.read_only:
            who = f" for practice {tenant!r}" if tenant is not None else ""
            raise ConfigurationError(
                f"this KeyManager is read-only (a replica): cannot {what}{who}. Write through "
                "a KeyManager on the primary database"
            )

    def _insert_key(self, tenant: str, conn: sa.Connection | None = None) -> bytes | None:
        """Insert a tenant's first active key. Returns its id, or None when another process won.

        A first key is always version 1, so the UNIQUE (tenant, version)
        constraint lets a practice have a first key once, ever: if between our
        read and this insert another process created the practice's key and
        an operator destroyed it, the insert fails instead of bringing the
        destroyed practice back, and the caller's re-read finds it destroyed.
        """
        self._writable("create a first data key", tenant)
        key_id, secret, wrapped = self._new_wrapped(tenant)
        started = time.monotonic()
        failure: ConfigurationError | None = None
        try:
            if conn is None:
                with self.engine.begin() as own:
                    self._insert_row(own, tenant, key_id, wrapped, version=1)
            else:
                with conn.begin_nested():
                    self._insert_row(conn, tenant, key_id, wrapped, version=1)
        except sa.exc.IntegrityError:
            # Another process created the tenant's key first: the database's
            # unique constraints decided; the caller reloads theirs.
            return None
        except sa.exc.OperationalError as exc:
            if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
                raise
            failure = _sqlite_busy(conn, tenant, time.monotonic() - started)
        if failure is not None:
            # Raised outside the except block: no driver error chained to it.
            raise failure
        self.keys_created += 1
        self._keys.put(key_id, _Dek(key_id, tenant, secret))
        return key_id

    def shares_sqlite_database(self, bind: sa.Engine | sa.Connection) -> bool:
        """Whether ``bind`` is SQLite on the very database holding ``carnet_keys``.

        Then a key must be created on that connection (SQLite has one writer).
        """
        if bind.dialect.name != "sqlite":
            return False
        # By database file, not URL text: sqlite+aiosqlite:///f and sqlite:///f
        # are the same database, and so is the async engine's sync facade.
        theirs, ours = bind.engine.url.database, self._engine.url.database
        if not theirs or theirs == ":memory:" or not ours or ours == ":memory:":
            return bind.engine is self._engine
        return os.path.realpath(theirs) == os.path.realpath(ours)

    def ensure_key_in(self, conn: sa.Connection, tenant: str) -> bytes | None:
        """Load or create ``tenant``'s active key inside ``conn``'s open transaction.

        Returns the key id when this call created it (the caller must call
        :meth:`forget_key` if that transaction rolls back), else None.
        """
        created_before = self.keys_created
        dek = self._active_dek(_check_tenant(tenant), conn)
        return dek.key_id if self.keys_created != created_before else None

    def forget_key(self, tenant: str, key_id: bytes) -> None:
        """Drop a key from the caches (its creating transaction rolled back)."""
        self._active.pop(tenant)
        self._keys.pop(key_id)
        self._drop_fast_paths()

    def has_cached_active_key(self, tenant: str) -> bool:
        return self._active.peek(tenant)

    def ensure_key(self, tenant: str) -> KeyRecord:
        """Make sure ``tenant`` has an active key (creating it) and return its record."""
        dek = self._active_dek(_check_tenant(tenant))
        rec = self.get_key(dek.key_id)
        assert rec is not None  # noqa: S101 - just loaded or created
        return rec

    # -- key lifecycle -------------------------------------------------------------

    def get_key(self, key_id: bytes) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(self.table).where(self.table.c.key_id == key_id.hex())
            ).first()
        if row is None:
            return None
        rec = KeyRecord.from_row(row)
        # The key id column may fold case on an old table: the id must be the one asked.
        return rec if rec.key_id == key_id else None

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        q = sa.select(self.table).order_by(self.table.c.tenant, self.table.c.version)
        if tenant is not None:
            q = q.where(self.table.c.tenant == tenant)
        with self.engine.connect() as conn:
            recs = [KeyRecord.from_row(r) for r in conn.execute(q)]
        # Exact in Python too: a table still folding ids must not list another practice's keys.
        return recs if tenant is None else [r for r in recs if r.tenant == tenant]

    def _key_batches(self, batch_size: int) -> Iterator[list[KeyRecord]]:
        """Every key record in key-id order, a batch at a time (keyset paging, flat memory)."""
        last = ""
        t = self.table
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(
                    sa.select(t).where(t.c.key_id > last).order_by(t.c.key_id).limit(batch_size)
                ).all()
            if not rows:
                return
            yield [KeyRecord.from_row(r) for r in rows]
            last = rows[-1].key_id

    def iter_keys(self, batch_size: int = 1000) -> Iterator[KeyRecord]:
        """Every key record, in key-id order, a batch at a time (flat memory)."""
        for batch in self._key_batches(batch_size):
            yield from batch

    def tenants(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(self.table.c.tenant).distinct().order_by(self.table.c.tenant)
                ).scalars()
            )

    def rotate(self, tenant: str, *, create: bool = False) -> KeyRecord:
        """Make a new active DEK for ``tenant``; earlier ones stay readable (state ``inactive``).

        A practice with no key raises :class:`UnknownTenant` unless ``create``
        (then its first key is made); a destroyed practice raises
        :class:`KeyDestroyed` until :meth:`reenable`.
        """
        tenant = _check_tenant(tenant)
        key_id, secret, wrapped = self._new_wrapped(tenant)
        version = self._key_transaction(
            tenant, lambda conn: self._rotate_in(conn, tenant, key_id, wrapped, create)
        )
        self.keys_created += 1
        dek = _Dek(key_id, tenant, secret)
        self._keys.put(key_id, dek)
        self._active.put(tenant, dek)
        self._drop_fast_paths()
        log.info(
            "carnet: rotated data key of tenant %r to version %d (%s)",
            tenant,
            version,
            key_id.hex(),
        )
        rec = self.get_key(key_id)
        assert rec is not None  # noqa: S101
        return rec

    def _key_transaction(self, tenant: str, work: Callable[[sa.Connection], _T]) -> _T:
        """Run ``work`` in a transaction of its own, again if it lost a race.

        Another rotation, first-key creation, re-enable or destroy may commit
        between our read and our write (SQLite takes no row locks; PostgreSQL's
        READ COMMITTED does not show rows inserted after the read began;
        MariaDB's gap locks deadlock): the unique constraints, a compare-and-set
        or the database's deadlock detection then reject ours, nothing of it is
        written, and ``work`` reads and decides again.
        """
        self._writable("change data keys", tenant)
        for attempt in range(_RACE_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except (sa.exc.IntegrityError, _Raced):
                pass
            except sa.exc.DBAPIError as exc:
                if not lock_conflict(exc):
                    raise
            if attempt < _RACE_ATTEMPTS - 1:
                # Jitter, so that two processes retrying do not collide again.
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))  # noqa: S311
        raise KeyStoreInconsistent(
            f"the keys of tenant {tenant!r} kept changing concurrently: run again"
        )

    def _rotate_in(
        self, conn: sa.Connection, tenant: str, key_id: bytes, wrapped: bytes, create: bool
    ) -> int:
        t = self.table
        recs = self._tenant_rows(conn, tenant, lock=True)
        active = [r for r in recs if r.state == ACTIVE]
        if not recs:
            if not create:
                raise UnknownTenant(
                    tenant,
                    "; check the id, or pass create=True "
                    "('carnet keys rotate --create') to create its first key",
                )
            return self._insert_row(conn, tenant, key_id, wrapped, version=1)
        if not active and any(r.state == DESTROYED for r in recs):
            raise self._destroyed(tenant)
        now = utcnow()
        for cur in active:
            # Compare-and-set: the key must still be the active one we read, or
            # a destroy may have run since and the new key would outlive it.
            done = conn.execute(
                t.update()
                .where(
                    t.c.key_id == cur.key_id.hex(),
                    t.c.state == ACTIVE,
                    t.c.active_tenant == tenant,
                )
                .values(state=INACTIVE, active_tenant=None, updated_at=now)
            ).rowcount
            if done != 1:
                raise _Raced
        return self._insert_row(conn, tenant, key_id, wrapped)

    @staticmethod
    def _destroyed(tenant: str) -> KeyDestroyed:
        exc = KeyDestroyed(None, tenant)
        exc.args = (
            f"the data keys of tenant {tenant!r} were destroyed; it gets no new key unless "
            f"re-enabled ('carnet keys reenable --tenant {tenant}')",
        )
        return exc

    def reenable(self, tenant: str) -> KeyRecord:
        """Give a destroyed practice a new active DEK, so that it can be written again.

        Values sealed under its destroyed keys stay unreadable: re-enabling
        creates a new key, it restores nothing.
        """
        tenant = _check_tenant(tenant)
        key_id, secret, wrapped = self._new_wrapped(tenant)

        def work(conn: sa.Connection) -> int:
            recs = self._tenant_rows(conn, tenant, lock=True)
            if not recs:
                raise UnknownTenant(tenant, ": there is nothing to re-enable")
            if any(r.state == ACTIVE for r in recs):
                raise ConfigurationError(
                    f"practice {tenant!r} has an active key: it is not destroyed"
                )
            # The UNIQUE active marker makes a concurrent re-enable fail here;
            # its retry then finds the practice active.
            return self._insert_row(conn, tenant, key_id, wrapped)

        version = self._key_transaction(tenant, work)
        self.keys_created += 1
        dek = _Dek(key_id, tenant, secret)
        self._keys.put(key_id, dek)
        self._active.put(tenant, dek)
        self._drop_fast_paths()
        log.warning(
            "carnet: re-enabled tenant %r with a new data key, version %d (%s)",
            tenant,
            version,
            key_id.hex(),
        )
        rec = self.get_key(key_id)
        assert rec is not None  # noqa: S101
        return rec

    def retire(self, key_id: bytes) -> KeyRecord:
        """Erase one inactive key version. Values still under it become unreadable.

        The CLI checks that no row uses the key first; this call does not scan tables.
        """
        t = self.table
        self._writable("retire a data key")
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(t).where(t.c.key_id == key_id.hex()).with_for_update()
            ).first()
            if row is None:
                raise UnknownKey(key_id)
            if row.state == ACTIVE:
                raise ConfigurationError(
                    f"key {key_id.hex()} is the active key of tenant {row.tenant!r}: rotate first"
                )
            if row.state in (RETIRED, DESTROYED):
                return KeyRecord.from_row(row)
            conn.execute(
                t.update()
                .where(t.c.key_id == key_id.hex())
                .values(state=RETIRED, wrapped_key=None, updated_at=utcnow())
            )
        self._keys.pop(key_id)
        self._index_roots.pop(row.tenant)
        self._drop_fast_paths()
        log.info("carnet: retired data key %s of tenant %r", key_id.hex(), row.tenant)
        rec = self.get_key(key_id)
        assert rec is not None  # noqa: S101
        return rec

    def destroy(self, tenant: str) -> int:
        """Crypto-shred ``tenant``: erase every wrapped DEK; rows stay, reads raise KeyDestroyed.

        Returns the number of keys destroyed now (0 if it already was). A
        practice with no key at all raises :class:`UnknownTenant`: a typo must
        not look like a successful erasure. Afterwards the practice gets no
        new key (writes and rotations raise ``KeyDestroyed``) unless
        re-enabled with :meth:`reenable`.

        Other processes stop decrypting within the cache time-to-live. Copies of
        the wrapped keys in backups stay unwrappable until the master key they
        were wrapped under is itself retired (see docs/threat-model.md).
        """
        self._writable("destroy data keys", tenant)
        tenant = _check_tenant(tenant)
        t = self.table
        n = 0
        self._forget_tenant(tenant)

        def one_pass(conn: sa.Connection) -> int:
            # Every kind: the practice's blind-index roots are shredded with its data keys.
            recs = self._tenant_rows(conn, tenant, lock=True, kind=None)
            if not recs and n == 0:
                raise UnknownTenant(tenant, ": nothing was destroyed (check the id)")
            if all(r.state == DESTROYED for r in recs):
                return 0
            # By practice, not by the ids just read: SQLite takes no row lock, so a
            # rotation may commit between that read and this one atomic statement.
            # The comparison is exact: _tenant_rows refused a table that folds ids.
            return int(
                conn.execute(
                    t.update()
                    .where(t.c.tenant == tenant, t.c.state != DESTROYED)
                    .values(
                        state=DESTROYED, wrapped_key=None, active_tenant=None, updated_at=utcnow()
                    )
                ).rowcount
            )

        # Repeat until a pass finds no live key: a rotation or first-key
        # creation that read the practice before our first commit may commit
        # its new key after our locking read. Anything starting after our
        # commit sees a destroyed practice and refuses.
        for _pass in range(10):
            done = self._key_transaction(tenant, one_pass)
            if not done:
                break
            n += done
        else:
            raise KeyStoreInconsistent(
                f"new keys of tenant {tenant!r} kept appearing while destroying it: run again"
            )
        self._forget_tenant(tenant)
        log.warning("carnet: destroyed %d data key(s) of tenant %r", n, tenant)
        return int(n)

    def _forget_tenant(self, tenant: str) -> None:
        self._drop_fast_paths()
        self._active.pop(tenant)
        self._index_roots.pop(tenant)
        self._keys.drop_where(lambda dek: dek.tenant == tenant)

    def rewrap(
        self,
        to: str | MasterKey,
        *,
        batch_size: int = 200,
        progress: Callable[[int], None] | None = None,
    ) -> RewrapReport:
        """Rewrap every DEK under a new master key; data rows are not touched.

        Resumable: a killed run leaves each DEK under the old or the new master
        key (each row is one atomic compare-and-set), and a rerun finishes the
        rest. Afterwards this manager uses the new master key for new DEKs.
        """
        self._writable("rewrap data keys")
        new = open_master_key(to)
        self._masters.setdefault(new.uri, new)
        t = self.table
        done = already = destroyed = 0
        for batch in self._key_batches(batch_size):
            updates = []
            for rec in batch:
                if rec.wrapped_key is None:
                    destroyed += 1
                    continue
                if rec.master_key_uri == new.uri:
                    already += 1
                    continue
                ctx = wrap_context(rec.tenant, rec.key_id, rec.kind)
                secret = self._master_for(rec.master_key_uri).unwrap(rec.wrapped_key, ctx)
                self.master_unwraps += 1
                updates.append((rec, new.wrap(secret, ctx)))
                self.master_wraps += 1
            with self.engine.begin() as conn:
                for rec, wrapped in updates:
                    res = conn.execute(
                        t.update()
                        .where(
                            t.c.key_id == rec.key_id.hex(),
                            t.c.master_key_uri == rec.master_key_uri,
                            t.c.wrapped_key.is_not(None),
                        )
                        .values(master_key_uri=new.uri, wrapped_key=wrapped, updated_at=utcnow())
                    )
                    done += res.rowcount
            if progress is not None:
                progress(len(batch))
        self._master = new
        log.info("carnet: rewrapped %d data key(s) under %s", done, new.uri)
        return RewrapReport(
            rewrapped=done, already=already, skipped_destroyed=destroyed, master_key_uri=new.uri
        )

    # -- blind-index root keys -------------------------------------------------------

    # Kept in carnet_keys beside the data keys (kind 'index'), wrapped by the
    # same master key, one active per tenant. Separate from the data key so a
    # data-key rotation never forces re-indexing, and destroyed with it:
    # destroy() shreds every row of the tenant whatever its kind.

    def index_roots(self, tenant: str, *, create: bool = True) -> list[IndexRoot]:
        """The tenant's usable index roots, active first, then inactive ones newest first.

        Writes use the first; lookups try all, so rows keep being found while a
        re-index after :meth:`rotate_index_root` runs. With ``create`` a tenant
        without a root gets one; without it the list may be empty.
        """
        roots, _ = self.index_roots_in(None, _check_tenant(tenant), create=create)
        return roots

    def index_roots_in(
        self, conn: sa.Connection | None, tenant: str, *, create: bool = True
    ) -> tuple[list[IndexRoot], bytes | None]:
        """:meth:`index_roots`, reading and creating inside ``conn``'s transaction if given.

        Also returns the key id of a root this call created inside ``conn``
        (the caller calls :meth:`forget_index_roots` if that transaction rolls
        back), else None.
        """
        cached = self._index_roots.get(tenant)
        if cached is not None:
            return cached, None
        self._require_kinds()
        created: bytes | None = None
        for _attempt in range(5):
            if conn is None:
                with self.engine.connect() as own:
                    rows, states = self._query_index_roots(own, tenant)
            else:
                rows, states = self._query_index_roots(conn, tenant)
            if rows and rows[0].state == ACTIVE:
                roots = [self._unwrap_index_root(KeyRecord.from_row(r)) for r in rows]
                self._index_roots.put(tenant, roots)
                return roots, created
            if states and states <= {DESTROYED}:
                raise KeyDestroyed(None, tenant)
            if not create:
                return [self._unwrap_index_root(KeyRecord.from_row(r)) for r in rows], None
            created = self._insert_index_root(tenant, conn)
            if conn is None:
                created = None
        raise MasterKeyUnavailable(f"could not create or load an index root for tenant {tenant!r}")

    def _query_index_roots(
        self, conn: sa.Connection, tenant: str
    ) -> tuple[list[sa.Row[Any]], set[str]]:
        t = self.table
        rows = list(
            conn.execute(
                sa.select(t)
                .where(t.c.tenant == tenant, t.c.kind == INDEX, t.c.state.in_((ACTIVE, INACTIVE)))
                # active first (its marker is set), then the newest inactive ones
                .order_by(t.c.active_tenant.is_(None), t.c.version.desc())
            )
        )
        states: set[str] = set()
        if not rows or rows[0].state != ACTIVE:
            states = set(conn.execute(sa.select(t.c.state).where(t.c.tenant == tenant)).scalars())
        return rows, states

    def _unwrap_index_root(self, rec: KeyRecord) -> IndexRoot:
        if rec.wrapped_key is None:
            raise KeyRetired(rec.key_id, rec.tenant)
        ctx = wrap_context(rec.tenant, rec.key_id, INDEX)
        secret = self._master_for(rec.master_key_uri).unwrap(rec.wrapped_key, ctx)
        self.master_unwraps += 1
        return IndexRoot(rec.key_id, rec.version, secret)

    def _insert_index_root(self, tenant: str, conn: sa.Connection | None) -> bytes | None:
        key_id = os.urandom(envelope.KEY_ID_SIZE)
        wrapped = self._master.wrap(os.urandom(32), wrap_context(tenant, key_id, INDEX))
        self.master_wraps += 1
        try:
            if conn is None:
                with self.engine.begin() as own:
                    self._insert_row(own, tenant, key_id, wrapped, kind=INDEX)
            else:
                with conn.begin_nested():
                    self._insert_row(conn, tenant, key_id, wrapped, kind=INDEX)
        except sa.exc.IntegrityError:
            return None  # another process created it first: the next read loads theirs
        return key_id

    def forget_index_roots(self, tenant: str) -> None:
        """Drop a tenant's cached index roots (a creating transaction rolled back)."""
        self._index_roots.pop(tenant)

    def rotate_index_root(self, tenant: str) -> KeyRecord:
        """Make a new active index root for ``tenant``; the previous one stays for lookups.

        Index values written from now on use the new root; run
        :func:`carnet.searchable.reindex` to recompute the existing ones, then
        retire the old root (:meth:`retire`).
        """
        tenant = _check_tenant(tenant)
        self._require_kinds()
        key_id = os.urandom(envelope.KEY_ID_SIZE)
        wrapped = self._master.wrap(os.urandom(32), wrap_context(tenant, key_id, INDEX))
        self.master_wraps += 1
        t = self.table
        with self.engine.begin() as conn:
            if set(conn.execute(sa.select(t.c.state).where(t.c.tenant == tenant)).scalars()) == {
                DESTROYED
            }:
                raise KeyDestroyed(None, tenant)
            current = conn.execute(
                sa.select(t.c.key_id)
                .where(t.c.active_tenant == tenant, t.c.kind == INDEX)
                .with_for_update()
            ).first()
            if current is not None:
                conn.execute(
                    t.update()
                    .where(t.c.key_id == current.key_id, t.c.state == ACTIVE)
                    .values(state=INACTIVE, active_tenant=None, updated_at=utcnow())
                )
            version = self._insert_row(conn, tenant, key_id, wrapped, kind=INDEX)
        self._index_roots.pop(tenant)
        log.info("carnet: rotated index root of tenant %r to version %d", tenant, version)
        rec = self.get_key(key_id)
        assert rec is not None  # noqa: S101
        return rec

    # -- observability -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters: master-key calls and cache behaviour since creation (or reset)."""
        return {
            "master_unwraps": self.master_unwraps,
            "master_wraps": self.master_wraps,
            "master_calls": self.master_unwraps + self.master_wraps,
            "cache_hits": self._keys.hits + self._active.hits + self._fast_hits,
            "cache_misses": self._keys.misses + self._active.misses,
            "cached_keys": len(self._keys),
            "keys_created": self.keys_created,
            "legacy_plaintext_reads": self.legacy_plaintext_reads,
        }

    def reset_stats(self) -> None:
        self.master_unwraps = self.master_wraps = self.keys_created = 0
        self.legacy_plaintext_reads = 0
        self._keys.hits = self._keys.misses = self._active.hits = self._active.misses = 0
        self._fast_hits = 0

    def clear_cache(self) -> None:
        """Forget every unwrapped DEK (the next use of each costs one master-key call)."""
        self._keys.clear()
        self._active.clear()
        self._index_roots.clear()
        self._drop_fast_paths()

    def close(self) -> None:
        self.clear_cache()
        for mk in self._masters.values():
            mk.close()
        if self._twin is not None:
            self._twin.dispose()
        if self._key_async is not None:
            # Its connections belong to an event loop: drop them without I/O.
            self._key_async.sync_engine.dispose(close=False)

    async def aclose(self) -> None:
        """:meth:`close` for an async engine: also closes the key pool's connections."""
        if self._key_async is not None:
            await self._key_async.dispose()
            self._key_async = None
        self.close()


def _sqlite_busy(conn: sa.Connection | None, tenant: str, waited: float) -> ConfigurationError:
    """Why SQLite refused the write lock for a practice's first key, and what to change.

    SQLite waits for another connection's write (up to its busy timeout) unless
    this transaction already read the database: a reader cannot wait for a
    writer (the two would deadlock), so SQLite refuses at once.
    """
    timeout_ms = None
    if conn is not None:
        try:
            timeout_ms = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        except sa.exc.DBAPIError:  # pragma: no cover - the pragma always answers
            timeout_ms = None
    timeout = (timeout_ms or 0) / 1000
    if conn is not None and waited < max(0.5 * timeout, 0.05):
        return ConfigurationError(
            f"SQLite refused the write lock for practice {tenant!r}'s first key at once: this "
            "transaction had already read the database and another connection is writing, "
            "and SQLite cannot make a reader wait for a writer. Create the practice's key "
            "before the transaction (keys.ensure_key(practice)), or start the transaction "
            "with BEGIN IMMEDIATE; nothing was written"
        )
    return ConfigurationError(
        f"another connection held SQLite's write lock for {waited:.1f} s, past the busy "
        f"timeout{f' ({timeout:g} s)' if timeout else ''}, while practice {tenant!r}'s first "
        "key was being created: nothing was written. Retry, or raise the timeout "
        "(connect_args={'timeout': seconds})"
    )


def _engine_from_url(url: str) -> sa.Engine | AsyncEngine:
    try:
        parsed = sa.engine.make_url(url)
        if parsed.get_dialect().is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            return create_async_engine(parsed)
        return sa.create_engine(parsed)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigurationError(f"bad database URL: {exc}") from None


def _is_async_engine(bind: Any) -> bool:
    return hasattr(bind, "sync_engine")


# Async drivers and the synchronous driver of the same database, for the twin engine.
_SYNC_DRIVERS = {
    "aiosqlite": "pysqlite",
    "asyncpg": "psycopg",
    "psycopg_async": "psycopg",
    "psycopg": "psycopg",
    "aiomysql": "pymysql",
    "asyncmy": "pymysql",
}


def _sync_url(url: sa.URL) -> sa.URL:
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory aiosqlite database cannot be shared with carnet's synchronous key "
            "operations: use a database file"
        )
    sync = _SYNC_DRIVERS.get(driver)
    if sync is None:
        raise ConfigurationError(
            f"no synchronous driver known for {backend}+{driver}: give KeyManager a "
            "synchronous engine on the same database for key management"
        )
    return url.set(drivername=f"{backend}+{sync}")


def _in_greenlet() -> bool:
    try:
        from sqlalchemy.util.concurrency import in_greenlet
    except ImportError:  # pragma: no cover - SQLAlchemy without its asyncio extra
        return False
    try:
        return bool(in_greenlet())
    except ImportError:  # greenlet not installed: nothing async runs
        return False


def _off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """Call a master-key provider (KMS, HSM: blocking I/O, retries with sleeps).

    Inside SQLAlchemy's greenlets the event loop is waiting on us: run the call
    in a worker thread and let the loop go on meanwhile.
    """
    if _in_greenlet():
        import asyncio

        from sqlalchemy.util import await_only

        return await_only(asyncio.to_thread(fn, *args))
    return fn(*args)


def log_debug_enabled() -> bool:
    return logging.getLogger("sqlalchemy.engine").isEnabledFor(logging.DEBUG)
