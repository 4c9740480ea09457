"""KeyManager: master keys, data keys and the value-level encrypt/decrypt.

It composes the key table's SQL (:class:`carnet.keystore.KeyStore`, wrapped
bytes only) and the cache of unwrapped keys (:class:`carnet.cache.KeyCache`);
what it owns itself is the master-key registry, wrapping and unwrapping, the
key lifecycle's rules, the counters and the audit hook. Dependencies point
one way: envelope format and providers below, the SQLAlchemy type and the
batch engine above.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import envelope
from ._engines import KeyEngines, log_debug_enabled, off_loop
from .cache import Dek, IndexRoot, KeyCache
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
)
from .keystore import (
    ACTIVE,
    DATA,
    DECOY,
    DESTROYED,
    INDEX,
    RETIRED,
    KeyRecord,
    KeyStore,
    destroyed_error,
    key_anomalies,
    wrap_context,
)
from .providers.base import MasterKey, open_master_key

if TYPE_CHECKING:
    # Only for annotations: the asyncio extension needs greenlet, an optional extra.
    from sqlalchemy.ext.asyncio import AsyncEngine

# carnet.manager.IndexRoot and log_debug_enabled stay importable from here.
__all__ = [
    "ENV_DATABASE_URL",
    "ENV_MASTER_KEY",
    "ENV_PREVIOUS_MASTER_KEYS",
    "DecryptHook",
    "EnvSettings",
    "IndexRoot",
    "KeyManager",
    "RewrapReport",
    "env_settings",
    "log_debug_enabled",
    "split_master_keys",
]

log = logging.getLogger("carnet")
_KEY_ID = envelope.KEY_ID
_monotonic = time.monotonic

DecryptHook = Callable[[str, str, int], None]


@dataclass
class RewrapReport:
    rewrapped: int
    already: int
    skipped_destroyed: int
    master_key_uri: str


# -- the environment, read the one way (the CLI and KeyManager.from_env) ------------------------

ENV_DATABASE_URL = "CARNET_DATABASE_URL"
ENV_MASTER_KEY = "CARNET_MASTER_KEY"
ENV_PREVIOUS_MASTER_KEYS = "CARNET_PREVIOUS_MASTER_KEYS"


def split_master_keys(raw: str | None) -> tuple[str, ...]:
    """``CARNET_PREVIOUS_MASTER_KEYS``'s comma-separated URIs, blanks dropped, order kept."""
    return tuple(u.strip() for u in (raw or "").split(",") if u.strip())


@dataclass(frozen=True)
class EnvSettings:
    """What the ``CARNET_*`` variables configure: the CLI's and :meth:`KeyManager.from_env`'s."""

    database_url: str | None
    master_key: str | None
    previous_master_keys: tuple[str, ...]

    def __repr__(self) -> str:
        # A database URL may carry a password: only whether it is set.
        return (
            f"EnvSettings(database_url={'set' if self.database_url else None}, "
            f"master_key={self.master_key!r}, previous_master_keys={self.previous_master_keys!r})"
        )


def env_settings(environ: Mapping[str, str] | None = None) -> EnvSettings:
    """Read ``CARNET_DATABASE_URL``, ``CARNET_MASTER_KEY`` and ``CARNET_PREVIOUS_MASTER_KEYS``.

    An empty variable counts as unset, as it does for the CLI's options.
    """
    env = os.environ if environ is None else environ
    return EnvSettings(
        database_url=env.get(ENV_DATABASE_URL) or None,
        master_key=env.get(ENV_MASTER_KEY) or None,
        previous_master_keys=split_master_keys(env.get(ENV_PREVIOUS_MASTER_KEYS)),
    )


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

    ``store`` (the key table's SQL) and ``cache`` (the unwrapped keys) are
    its parts; the methods below are the way to use them.
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
        self._engines = KeyEngines(bind)
        self.async_engine: AsyncEngine | None = self._engines.async_engine
        self._master = open_master_key(master_key)
        self._masters: dict[str, MasterKey] = {self._master.uri: self._master}
        for prev in previous_master_keys:
            mk = open_master_key(prev)
            self._masters.setdefault(mk.uri, mk)
        self.store = KeyStore(self._engines.current, table_name)
        self.metadata = self.store.metadata
        self.cache = KeyCache(cache_size, cache_ttl)
        # The fast-path dicts and the index-root cache themselves (never replaced):
        # a value costs one lookup, as before the cache was a part of its own.
        self._sealers = self.cache.sealers
        self._openers = self.cache.openers
        self._index_roots = self.cache.index_roots
        self._fast_hits = 0
        self.master_wraps = 0
        self.master_unwraps = 0
        self.keys_created = 0
        self.legacy_plaintext_reads = 0
        self.decrypt_hook: DecryptHook | None = None
        # What a decoy note opened does (carnet.decoys.DecoyAlarm; None: log and refuse).
        self.decoy_alarm: Any = None
        self._decoy_ids: dict[bytes, bool] = {}
        # Strict mode: application seals and opens need a matching tenant_scope
        # (see carnet.configure).
        self.require_scope = require_scope
        # A read replica: reads keys, never writes the key table.
        self.read_only = read_only
        if self._engines.primary.echo == "debug" or log_debug_enabled():
            warnings.warn(
                "SQLAlchemy echo='debug' logs result rows: decrypted notes read through "
                "tenant_scope would reach the log. Turn it off where real data is read.",
                stacklevel=2,
            )

    @classmethod
    def from_env(
        cls,
        bind: sa.Engine | AsyncEngine | str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **options: Any,
    ) -> KeyManager:
        """A manager configured as the ``carnet`` command line is, from ``CARNET_*`` variables.

        ``CARNET_MASTER_KEY`` is the master key, ``CARNET_PREVIOUS_MASTER_KEYS``
        (comma-separated) the former ones that may still wrap data keys (after
        a master rotation, or for a restored backup), and ``CARNET_DATABASE_URL``
        the database of ``carnet_keys`` unless ``bind`` (the application's own
        engine, usually) is given. The providers' own variables
        (``CARNET_KMS_*``, ``CARNET_PKCS11_*``) apply as for the CLI.
        ``options`` are the constructor's (``cache_ttl``, ``require_scope``…).
        A missing variable is a :class:`ConfigurationError` naming it.
        """
        env = env_settings(environ)
        if env.master_key is None:
            raise ConfigurationError(f"no master key: set {ENV_MASTER_KEY}")
        if bind is None:
            if env.database_url is None:
                raise ConfigurationError(
                    f"no database: set {ENV_DATABASE_URL} or pass the application's engine"
                )
            bind = env.database_url
        return cls(
            bind,
            env.master_key,
            previous_master_keys=env.previous_master_keys,
            **options,
        )

    # -- configuration -------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        """The engine of the key table, usable from the calling code.

        For an async engine: its sync facade inside SQLAlchemy's greenlets
        (statements of an AsyncSession or AsyncConnection), else a synchronous
        engine on the same database (created on first use).
        """
        return self._engines.current()

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
        return self.cache.ttl

    def __repr__(self) -> str:
        return (
            f"<KeyManager {self._engines.primary.url!r} master={self._master.uri} "
            f"table={self.store.name}>"
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
        return self.store.create_schema()

    @property
    def table(self) -> sa.Table:
        """The key table, in the shape the database has.

        A table made before key kinds keeps working for data keys until
        :meth:`create_schema` (``carnet init``) upgrades it; blind-index roots
        need the upgrade.
        """
        return self.store.table

    # -- value level ---------------------------------------------------------------

    # The hot paths: one dict lookup per value once a (tenant, label) or
    # (key id, label, tenant) has been seen, with the same expiry as the cached
    # DEK, so a destroyed key stops working within the cache time-to-live. A
    # live entry's deadline is ahead (the cache's DeadlineWatch ends it); any
    # other is compared with the clock.

    def encrypt(self, plaintext: bytes, *, tenant: str, label: str) -> bytes:
        """Seal ``plaintext`` under the tenant's active DEK (created on first use)."""
        sealer = self._sealers.get((tenant, label))
        if sealer is None or (not sealer.live and sealer.expires <= time.monotonic()):
            sealer = self._sealer(tenant, label)
        else:
            self._fast_hits += 1
        return sealer.seal(plaintext)

    def _sealer(self, tenant: str, label: str) -> envelope.Sealer:
        active = self.cache.active
        dek = active.get(tenant)
        if dek is None:
            dek = self._active_dek(_check_tenant(tenant))
        expires = active.expiry(tenant) or time.monotonic()
        sealer = envelope.Sealer(dek.cipher, dek.key_id, label, tenant, expires)
        self.cache.put_sealer(tenant, label, sealer)
        return sealer

    def decrypt(self, blob: bytes, *, tenant: str, label: str) -> bytes:
        """Open a value sealed for ``tenant`` and ``label``; raise a carnet error otherwise."""
        opener = self._openers.get((blob[_KEY_ID], label, tenant))
        if opener is None or (not opener.live and opener.expires <= time.monotonic()):
            opener = self._opener(envelope.key_id_of(blob), tenant, label)
        else:
            self._fast_hits += 1
        if self.decrypt_hook is not None:
            # Charged before the value is opened: a read the budget refuses
            # never has its text in a frame an error reporter could record.
            self.decrypt_hook(tenant, label, 1)
        return opener.open(blob)

    def _opener(self, key_id: bytes, tenant: str, label: str) -> envelope.Opener:
        keys = self.cache.keys
        dek = keys.get(key_id)
        if dek is None:
            rec = self.get_key(key_id)
            if rec is not None and rec.kind == DECOY:
                return self._decoy_opener(rec, tenant, label)
            dek = self._dek_for(key_id, _check_tenant(tenant), rec)
        if dek.tenant != tenant:
            # A value of another practice: copied into this row, or read under the
            # wrong scope. The key's tenant is metadata, so naming it leaks nothing.
            raise TenantMismatch(tenant, dek.tenant)
        expires = keys.expiry(key_id) or time.monotonic()
        opener = envelope.Opener(dek.cipher, key_id, label, tenant, expires)
        self.cache.put_opener(key_id, label, tenant, opener)
        return opener

    def encrypt_text(self, text: str, *, tenant: str, label: str) -> bytes:
        return self._seal_text(text, tenant, label)

    def decrypt_text(self, blob: bytes, *, tenant: str, label: str) -> str:
        return self._open_text(blob, tenant, label)

    # The column type's per-value calls: :meth:`encrypt` and :meth:`decrypt`
    # in one frame, positional, for text. Anything but a warm cached sealer or
    # opener takes the full path; the decrypt hook is called in either.

    def _seal_text(self, text: str, tenant: str, label: str) -> bytes:
        sealer = self._sealers.get((tenant, label))
        if sealer is None or (not sealer.live and sealer.expires <= _monotonic()):
            return self.encrypt(text.encode("utf-8"), tenant=tenant, label=label)
        self._fast_hits += 1
        return sealer.seal(text.encode("utf-8"))

    def _open_text(self, blob: bytes, tenant: str, label: str) -> str:
        opener = self._openers.get((blob[_KEY_ID], label, tenant))
        if opener is None or (not opener.live and opener.expires <= _monotonic()):
            return self.decrypt(blob, tenant=tenant, label=label).decode("utf-8")
        hook = self.decrypt_hook
        if hook is not None:
            # Charged before the value is opened, as in decrypt(): a refused
            # read never has its text in this frame.
            hook(tenant, label, 1)
        self._fast_hits += 1
        text = opener.open_text(blob)
        return text if text is not None else opener.open(blob).decode("utf-8")

    def key_id_of(self, blob: bytes) -> bytes:
        return envelope.key_id_of(blob)

    # -- wrapping ------------------------------------------------------------------

    def _master_for(self, uri: str) -> MasterKey:
        mk = self._masters.get(uri)
        if mk is None:
            raise MasterKeyUnavailable(
                f"a data key is wrapped by master key {uri}, which this KeyManager was not "
                "given; pass it as master_key or in previous_master_keys"
            )
        return mk

    def _unwrap(self, rec: KeyRecord) -> Dek:
        rec.check()
        if rec.state == DESTROYED:
            raise KeyDestroyed(rec.key_id, rec.tenant)
        if rec.state == RETIRED or rec.wrapped_key is None:
            raise KeyRetired(rec.key_id, rec.tenant)
        ctx = wrap_context(rec.tenant, rec.key_id, rec.kind)
        secret = off_loop(self._master_for(rec.master_key_uri).unwrap, rec.wrapped_key, ctx)
        self.master_unwraps += 1
        dek = Dek(rec.key_id, rec.tenant, secret)
        if rec.kind == DATA:
            # Only data keys are cached as such: an index root must never
            # become the AES key of a value whose header names it.
            self.cache.keys.put(rec.key_id, dek)
        return dek

    def _new_wrapped(self, tenant: str, kind: str = DATA) -> tuple[bytes, bytes, bytes]:
        """A new key: its id, its secret, and the secret wrapped by the current master key."""
        key_id = os.urandom(envelope.KEY_ID_SIZE)
        secret = os.urandom(32)
        wrapped = off_loop(self._master.wrap, secret, wrap_context(tenant, key_id, kind))
        self.master_wraps += 1
        return key_id, secret, wrapped

    def check_unwrap(self, rec: KeyRecord) -> None:
        """Unwrap ``rec``'s data key under its master key (raises the carnet error if
        it does not open), caching it as a read would."""
        self._unwrap(rec)

    # -- data keys -----------------------------------------------------------------

    def _decoy_opener(self, rec: KeyRecord, tenant: str, label: str) -> envelope.Opener:
        """A decoy note is about to be opened: the alarm (carnet.decoys), which refuses
        by default. Let through, its opener is never cached: every read alarms."""
        from . import decoys

        decoys.opened(self, rec, _check_tenant(tenant), label)
        dek = self._unwrap(rec)  # not cached: only data keys are
        if dek.tenant != tenant:
            raise TenantMismatch(tenant, dek.tenant)
        return envelope.Opener(dek.cipher, rec.key_id, label, tenant, time.monotonic())

    def is_decoy(self, key_id: bytes) -> bool:
        """Whether ``key_id`` names a decoy key: carnet's own commands skip such values
        by their header, without opening them (and so without an alarm)."""
        if self.cache.keys.get(key_id) is not None:
            return False  # only data keys are cached
        known = self._decoy_ids.get(key_id)
        if known is None:
            rec = self.get_key(key_id)
            known = rec is not None and rec.kind == DECOY
            if len(self._decoy_ids) > 100_000:
                self._decoy_ids.clear()
            self._decoy_ids[key_id] = known
        return known

    def _dek_for(self, key_id: bytes, tenant: str, rec: KeyRecord | None = None) -> Dek:
        if rec is None:
            rec = self.get_key(key_id)
        if rec is None or rec.kind != DATA:
            # An index root key never decrypts a value, whatever a header names.
            raise UnknownKey(key_id)
        return self._unwrap(rec)

    def _active_dek(self, tenant: str, conn: sa.Connection | None = None) -> Dek:
        """The tenant's active key, created if it has none and never had one.

        A practice with a destroyed key and no active one stays destroyed
        (``KeyDestroyed``) until :meth:`reenable`. With ``conn``, reads and a
        creation happen inside that connection's open transaction (SQLite,
        where a second connection would wait on the application's own write
        lock); otherwise in short transactions of their own.
        """
        for _attempt in range(5):
            rec, states = self.store.active(conn, tenant)
            if rec is not None:
                cached = self.cache.keys.get(rec.key_id)
                dek = cached if cached is not None else self._unwrap(rec)
                self.cache.active.put(tenant, dek)
                return dek
            if DESTROYED in states:
                raise destroyed_error(tenant)
            if states:
                # Only a destroyed practice has keys and no active one; rows
                # edited to look otherwise get no new key either.
                raise KeyStoreInconsistent(
                    f"practice {tenant!r} has keys but no active one: it was destroyed, or "
                    "carnet_keys was edited ('carnet doctor' says which); only "
                    f"'carnet keys reenable --tenant {tenant}' gives it a new key"
                )
            self._insert_key(tenant, conn)
        raise MasterKeyUnavailable(f"could not create or load an active key for tenant {tenant!r}")

    def _writable(self, what: str, tenant: str | None = None) -> None:
        if self.read_only:
            who = f" for practice {tenant!r}" if tenant is not None else ""
            raise ConfigurationError(
                f"this KeyManager is read-only (a replica): cannot {what}{who}. Write through "
                "a KeyManager on the primary database"
            )

    def _insert_key(self, tenant: str, conn: sa.Connection | None = None) -> bytes | None:
        """Insert a tenant's first active key. Returns its id, or None when another process won."""
        self._writable("create a first data key", tenant)
        key_id, secret, wrapped = self._new_wrapped(tenant)
        if not self.store.insert_first(conn, tenant, key_id, wrapped, self._master.uri):
            return None
        self.keys_created += 1
        self.cache.keys.put(key_id, Dek(key_id, tenant, secret))
        return key_id

    def _shares_sqlite_database(self, bind: sa.Engine | sa.Connection) -> bool:
        """Whether ``bind`` is SQLite on the very database holding ``carnet_keys``.

        Then a key must be created on that connection (SQLite has one writer).
        """
        return self._engines.shares_sqlite_database(bind)

    def _ensure_key_in(self, conn: sa.Connection, tenant: str) -> bytes | None:
        """Load or create ``tenant``'s active key inside ``conn``'s open transaction.

        Returns the key id when this call created it (the caller must call
        :meth:`_forget_key` if that transaction rolls back), else None.
        """
        created_before = self.keys_created
        dek = self._active_dek(_check_tenant(tenant), conn)
        return dek.key_id if self.keys_created != created_before else None

    def _forget_key(self, tenant: str, key_id: bytes) -> None:
        """Drop a key from the caches (its creating transaction rolled back)."""
        self.cache.forget_key(tenant, key_id)

    def _has_cached_active_key(self, tenant: str) -> bool:
        return self.cache.active.peek(tenant)

    def ensure_key(self, tenant: str) -> KeyRecord:
        """Make sure ``tenant`` has an active key (creating it) and return its record."""
        dek = self._active_dek(_check_tenant(tenant))
        return self._record(dek.key_id)

    # -- key lifecycle -------------------------------------------------------------

    def get_key(self, key_id: bytes) -> KeyRecord | None:
        return self.store.get(key_id)

    def _record(self, key_id: bytes) -> KeyRecord:
        rec = self.store.get(key_id)
        assert rec is not None  # noqa: S101 - just loaded or written
        return rec

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        return self.store.list_keys(tenant)

    def iter_keys(self, batch_size: int = 1000) -> Iterator[KeyRecord]:
        """Every key record, in key-id order, a batch at a time (flat memory)."""
        for batch in self.store.batches(batch_size):
            yield from batch

    def tenants(self) -> list[str]:
        return self.store.tenants()

    def key_anomalies(self) -> list[str]:
        """Edits of the key table that its rows betray (see :func:`keystore.key_anomalies`)."""
        out: list[str] = []
        for tenant in self.store.tenants():
            with self.store.engine.connect() as conn:
                try:
                    out.extend(key_anomalies(self.store.rows(conn, tenant)))
                except KeyStoreInconsistent as exc:  # a row incoherent on its own
                    out.append(str(exc))
        return out

    def rotate(self, tenant: str, *, create: bool = False) -> KeyRecord:
        """Make a new active DEK for ``tenant``; earlier ones stay readable (state ``inactive``).

        A practice with no key raises :class:`UnknownTenant` unless ``create``
        (then its first key is made); a destroyed practice raises
        :class:`KeyDestroyed` until :meth:`reenable`.
        """
        tenant = _check_tenant(tenant)
        key_id, secret, wrapped = self._new_wrapped(tenant)
        self._writable("change data keys", tenant)
        version = self.store.rotate(tenant, key_id, wrapped, self._master.uri, create=create)
        self.keys_created += 1
        self.cache.put_active(Dek(key_id, tenant, secret))
        log.info(
            "carnet: rotated data key of tenant %r to version %d (%s)",
            tenant,
            version,
            key_id.hex(),
        )
        return self._record(key_id)

    def reenable(self, tenant: str) -> KeyRecord:
        """Give a destroyed practice a new active DEK, so that it can be written again.

        Values sealed under its destroyed keys stay unreadable: re-enabling
        creates a new key, it restores nothing.
        """
        tenant = _check_tenant(tenant)
        key_id, secret, wrapped = self._new_wrapped(tenant)
        self._writable("change data keys", tenant)
        version = self.store.reenable(tenant, key_id, wrapped, self._master.uri)
        self.keys_created += 1
        self.cache.put_active(Dek(key_id, tenant, secret))
        log.warning(
            "carnet: re-enabled tenant %r with a new data key, version %d (%s)",
            tenant,
            version,
            key_id.hex(),
        )
        return self._record(key_id)

    def retire(self, key_id: bytes) -> KeyRecord:
        """Erase one inactive key version. Values still under it become unreadable.

        The CLI checks that no row uses the key first; this call does not scan tables.
        """
        self._writable("retire a data key")
        before, changed = self.store.retire(key_id)
        if not changed:
            return before
        self.cache.forget_retired(before.tenant, key_id)
        log.info("carnet: retired data key %s of tenant %r", key_id.hex(), before.tenant)
        return self._record(key_id)

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
        self.cache.forget_practice(tenant)
        n = self.store.destroy(tenant)
        self.cache.forget_practice(tenant)
        log.warning("carnet: destroyed %d data key(s) of tenant %r", n, tenant)
        return int(n)

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
        done = already = destroyed = 0
        for batch in self.store.batches(batch_size):
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
            done += self.store.rewrap(updates, new.uri)
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
        roots, _ = self._index_roots_in(None, _check_tenant(tenant), create=create)
        return roots

    def _index_roots_in(
        self, conn: sa.Connection | None, tenant: str, *, create: bool = True
    ) -> tuple[list[IndexRoot], bytes | None]:
        """:meth:`index_roots`, reading and creating inside ``conn``'s transaction if given.

        Also returns the key id of a root this call created inside ``conn``
        (the caller calls :meth:`_forget_index_roots` if that transaction rolls
        back), else None.
        """
        cached = self._index_roots.get(tenant)
        if cached is not None:
            return cached, None
        self.store.require_kinds()
        created: bytes | None = None
        for _attempt in range(5):
            recs, states = self.store.index_roots(conn, tenant)
            if recs and recs[0].state == ACTIVE:
                roots = [self._unwrap_index_root(rec) for rec in recs]
                self.cache.index_roots.put(tenant, roots)
                return roots, created
            if states and states <= {DESTROYED}:
                raise KeyDestroyed(None, tenant)
            if not create:
                return [self._unwrap_index_root(rec) for rec in recs], None
            key_id, _secret, wrapped = self._new_index_root(tenant)
            inserted = self.store.insert_index_root(conn, tenant, key_id, wrapped, self._master.uri)
            created = key_id if inserted and conn is not None else None
        raise MasterKeyUnavailable(f"could not create or load an index root for tenant {tenant!r}")

    def _unwrap_index_root(self, rec: KeyRecord) -> IndexRoot:
        if rec.wrapped_key is None:
            raise KeyRetired(rec.key_id, rec.tenant)
        ctx = wrap_context(rec.tenant, rec.key_id, INDEX)
        secret = self._master_for(rec.master_key_uri).unwrap(rec.wrapped_key, ctx)
        self.master_unwraps += 1
        return IndexRoot(rec.key_id, rec.version, secret)

    def _new_index_root(self, tenant: str) -> tuple[bytes, bytes, bytes]:
        key_id = os.urandom(envelope.KEY_ID_SIZE)
        secret = os.urandom(32)
        wrapped = self._master.wrap(secret, wrap_context(tenant, key_id, INDEX))
        self.master_wraps += 1
        return key_id, secret, wrapped

    def _forget_index_roots(self, tenant: str) -> None:
        """Drop a tenant's cached index roots (a creating transaction rolled back)."""
        self.cache.index_roots.pop(tenant)

    def rotate_index_root(self, tenant: str) -> KeyRecord:
        """Make a new active index root for ``tenant``; the previous one stays for lookups.

        Index values written from now on use the new root; run
        :func:`carnet.searchable.reindex` to recompute the existing ones, then
        retire the old root (:meth:`retire`).
        """
        tenant = _check_tenant(tenant)
        self.store.require_kinds()
        key_id, _secret, wrapped = self._new_index_root(tenant)
        version = self.store.rotate_index_root(tenant, key_id, wrapped, self._master.uri)
        self.cache.index_roots.pop(tenant)
        log.info("carnet: rotated index root of tenant %r to version %d", tenant, version)
        return self._record(key_id)

    # -- observability -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counters: master-key calls and cache behaviour since creation (or reset)."""
        cache = self.cache.stats()
        return {
            "master_unwraps": self.master_unwraps,
            "master_wraps": self.master_wraps,
            "master_calls": self.master_unwraps + self.master_wraps,
            "cache_hits": cache["cache_hits"] + self._fast_hits,
            "cache_misses": cache["cache_misses"],
            "cached_keys": cache["cached_keys"],
            "keys_created": self.keys_created,
            "legacy_plaintext_reads": self.legacy_plaintext_reads,
        }

    def reset_stats(self) -> None:
        self.master_unwraps = self.master_wraps = self.keys_created = 0
        self.legacy_plaintext_reads = 0
        self.cache.reset_stats()
        self._fast_hits = 0

    def clear_cache(self) -> None:
        """Forget every unwrapped DEK (the next use of each costs one master-key call)."""
        self.cache.clear()

    def close(self) -> None:
        self.clear_cache()
        for mk in self._masters.values():
            mk.close()
        self._engines.close()

    async def aclose(self) -> None:
        """:meth:`close` for an async engine: also closes the key pool's connections."""
        await self._engines.aclose()
        self.close()
