"""The ``carnet_keys`` table: wrapped data keys, one row per key version.

States::

    active    encrypts and decrypts; exactly one per tenant and kind (enforced
              by UNIQUE (kind, active_tenant), where ``active_tenant`` holds
              the tenant id only while the key is active: a NULL in a unique
              constraint collides with nothing on any backend, so this works
              where partial indexes do not, e.g. MariaDB)
    inactive  decrypts only, after a rotation
    retired   material erased after re-encryption moved every value away
    destroyed material erased by crypto-shredding the whole tenant

Practice ids are exact strings: ``tenant`` and ``active_tenant`` compare
byte for byte on every backend. SQLite (BINARY) and PostgreSQL (deterministic
collations, no padding for VARCHAR) do so by default; MariaDB's default
collations fold case and accents and ignore trailing spaces, so there the two
columns use ``utf8mb4_nopad_bin`` (``utf8mb4_bin`` would still pad spaces).
A table created before that is converted by :func:`make_practice_ids_exact`.

Kinds::

    data      a data key (DEK): AES-256-GCM key of the tenant's field values
    index     a blind-index root key: HKDF input of the tenant's blind-index
              keys (see carnet.indexkeys); never encrypts anything
    audit     the audit trail's HMAC key (see carnet.audit_store); one active
              for the whole database, under the practice id ``""`` that no
              practice can have; never encrypts anything
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from .errors import (
    ConfigurationError,
    KeyDestroyed,
    KeyStoreInconsistent,
    UnknownKey,
    UnknownTenant,
)

log = logging.getLogger("carnet")

ACTIVE = "active"
INACTIVE = "inactive"
RETIRED = "retired"
DESTROYED = "destroyed"
STATES = (ACTIVE, INACTIVE, RETIRED, DESTROYED)
DATA = "data"
INDEX = "index"
AUDIT = "audit"
# A practice's decoy key: seals decoy notes, which no legitimate read opens
# (carnet.decoys). Its rows look like a data key's but for this kind.
DECOY = "decoy"
KINDS = (DATA, INDEX, AUDIT, DECOY)
# The practice id of the audit key: carnet refuses an empty practice id for a
# value, so no practice's keys (nor its destroy) can ever name it.
AUDIT_TENANT = ""
_KIND_CHECK = "kind IN ('data', 'index', 'audit', 'decoy')"

_T = TypeVar("_T")

# Tries of a key-table change that lost a race to another process before giving up.
RACE_ATTEMPTS = 8

# MariaDB collation comparing code points exactly, without padding trailing spaces.
EXACT_COLLATION = "utf8mb4_nopad_bin"
_PRACTICE_COLUMNS = ("tenant", "active_tenant")


def practice_id_type(length: int = 255) -> sa.types.TypeEngine[str]:
    """VARCHAR that compares practice ids exactly on every backend."""
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="utf8mb4", collation=EXACT_COLLATION), "mysql", "mariadb"
    )


def keys_table(metadata: sa.MetaData, name: str = "carnet_keys", *, kinds: bool = True) -> sa.Table:
    """The key table; ``kinds=False``: its shape before key kinds (read until upgraded)."""
    if kinds:
        per_kind: list[sa.schema.SchemaItem] = [
            sa.Column("kind", sa.String(8), nullable=False, default=DATA, server_default=DATA),
            sa.Column("active_tenant", practice_id_type(), nullable=True),
            sa.UniqueConstraint("tenant", "kind", "version", name=f"uq_{name}_tenant_kind_version"),
            sa.UniqueConstraint("kind", "active_tenant", name=f"uq_{name}_kind_active"),
            sa.CheckConstraint(_KIND_CHECK, name=f"ck_{name}_kind"),
        ]
    else:
        per_kind = [
            sa.Column("active_tenant", practice_id_type(), nullable=True, unique=True),
            sa.UniqueConstraint("tenant", "version", name=f"uq_{name}_tenant_version"),
        ]
    return sa.Table(
        name,
        metadata,
        # hex, not binary: a BLOB cannot be a MariaDB primary key without a prefix length.
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("tenant", practice_id_type(), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("master_key_uri", sa.String(1024), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        *per_kind,
        sa.CheckConstraint(
            "state IN ('active', 'inactive', 'retired', 'destroyed')", name=f"ck_{name}_state"
        ),
    )


def lock_conflict(exc: sa.exc.DBAPIError) -> bool:
    """Deadlock, lock wait time-out, serialization failure or busy SQLite: worth a retry."""
    orig = exc.orig
    code = (getattr(orig, "args", None) or [None])[0]
    return (
        code in (1205, 1213)
        or getattr(orig, "sqlstate", None) in ("40001", "40P01", "55P03")
        or "database is locked" in str(orig).lower()
    )


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class KeyRecord:
    """A row of ``carnet_keys``. ``wrapped_key`` is excluded from ``repr``."""

    key_id: bytes
    tenant: str
    version: int
    state: str
    master_key_uri: str
    created_at: dt.datetime
    updated_at: dt.datetime
    wrapped_key: bytes | None = field(default=None, repr=False)
    active_tenant: str | None = None
    kind: str = DATA

    def check(self) -> None:
        """Raise unless the row is coherent: a known state, and an active marker
        present exactly when active and naming the row's own practice. A row
        that fails this (tampered, or damaged by hand) is never used."""
        marked = self.active_tenant is not None
        if (
            self.state not in STATES
            or marked != (self.state == ACTIVE)
            or (marked and self.active_tenant != self.tenant)
        ):
            raise KeyStoreInconsistent(
                f"key row {self.key_id.hex()} is inconsistent (state {self.state!r}, practice "
                f"{self.tenant!r}, active marker {self.active_tenant!r}): refusing to use it"
            )

    @classmethod
    def from_row(cls, row: sa.Row[object] | sa.RowMapping) -> KeyRecord:
        m = row._mapping if isinstance(row, sa.Row) else row
        wrapped = m["wrapped_key"]
        return cls(
            key_id=bytes.fromhex(m["key_id"]),
            tenant=m["tenant"],
            version=m["version"],
            state=m["state"],
            master_key_uri=m["master_key_uri"],
            created_at=m["created_at"],
            updated_at=m["updated_at"],
            wrapped_key=bytes(wrapped) if wrapped is not None else None,
            active_tenant=m.get("active_tenant"),
            kind=m.get("kind", DATA),
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly description without key material."""
        return {
            "key_id": self.key_id.hex(),
            "tenant": self.tenant,
            "version": self.version,
            "state": self.state,
            "kind": self.kind,
            "master_key_uri": self.master_key_uri,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }


def wrap_context(tenant: str, key_id: bytes, kind: str = DATA) -> dict[str, str]:
    """The context a key's wrap authenticates (docs/format.md).

    Index root keys also bind their kind, so a wrapped root relabelled as a
    data key in the table does not unwrap as one. Data keys keep the context
    they always had, so existing wraps stay valid.
    """
    ctx = {"tenant": tenant, "key_id": key_id.hex()}
    if kind != DATA:
        ctx["kind"] = kind
    return ctx


class _Raced(Exception):
    """A compare-and-set on the key table found the row changed since it was read."""


def key_anomalies(recs: list[KeyRecord]) -> list[str]:
    """What in one practice's key rows only an edit of the table explains.

    Without a signature over the key table, SQL access can forge any
    consistent set of rows (renumber the versions too); this catches the
    edits that leave the rows inconsistent with how carnet writes them: a
    rotation rolled back by moving the active marker to an older key, a
    destroyed or retired key given a state that needs key material.
    """
    out: list[str] = []
    data = [r for r in recs if r.kind == DATA]
    if not data:
        return out
    tenant = data[0].tenant
    active = [r for r in data if r.state == ACTIVE]
    newest = max(data, key=lambda r: r.version)
    for rec in active:
        if rec.version != newest.version:
            out.append(
                f"practice {tenant!r}: the active data key is version {rec.version}, but "
                f"version {newest.version} exists: a rotation was rolled back by editing "
                "carnet_keys"
            )
    if not active and any(r.state in (ACTIVE, INACTIVE) for r in data):
        out.append(f"practice {tenant!r}: keys that hold key material but none is active")
    for rec in data:
        if rec.state in (ACTIVE, INACTIVE) and rec.wrapped_key is None:
            out.append(
                f"practice {tenant!r}: data key version {rec.version} is {rec.state} but holds "
                "no key material (a destroyed or retired key whose state was edited)"
            )
    return out


def destroyed_error(tenant: str) -> KeyDestroyed:
    """The error of a practice whose keys were destroyed and that is not re-enabled."""
    exc = KeyDestroyed(None, tenant)
    exc.args = (
        f"the data keys of tenant {tenant!r} were destroyed; it gets no new key unless "
        f"re-enabled ('carnet keys reenable --tenant {tenant}')",
    )
    return exc


class KeyStore:
    """The key table's SQL: reads and writes of wrapped keys, nothing else.

    It stores and returns wrapped bytes and :class:`KeyRecord` rows; it never
    sees a master key or an unwrapped key (the caller wraps before a write
    and unwraps after a read). Writes that can lose a race with another
    process (a first key, a rotation, a re-enable, a destroy) are decided by
    the table's unique constraints and compare-and-sets, and retried.

    ``engine`` is an Engine, or a callable returning the engine usable from
    the calling code (an async engine's facade or twin, see carnet._engines).
    """

    def __init__(
        self, engine: sa.Engine | Callable[[], sa.Engine], table_name: str = "carnet_keys"
    ) -> None:
        self._engine = engine
        self.metadata = sa.MetaData()
        self._kinds_table = keys_table(self.metadata, table_name)
        self._table: sa.Table | None = None  # the shape found in the database, on first use

    @property
    def engine(self) -> sa.Engine:
        e = self._engine
        return e if isinstance(e, sa.Engine) else e()

    @property
    def name(self) -> str:
        return self._kinds_table.name

    def __repr__(self) -> str:
        return f"<KeyStore {self.name}>"

    # -- schema --------------------------------------------------------------------

    def create_schema(self) -> list[str]:
        """Create the table if it is missing; upgrade one made before key kinds or the
        audit key; make its practice ids exact; create ``carnet_audit`` beside it.
        Returns the columns converted (usually none)."""
        engine = self.engine
        self.metadata.create_all(engine)
        from .keystore_upgrade import add_audit_kind, add_key_kinds

        add_key_kinds(engine, self._kinds_table)
        add_audit_kind(engine, self._kinds_table)
        # The audit trail's default home is the key table's database.
        from .audit_store import AUDIT_TABLE, audit_table

        audit_table(sa.MetaData(), AUDIT_TABLE).create(engine, checkfirst=True)
        self._table = self._kinds_table
        from .keystore_upgrade import make_practice_ids_exact

        return make_practice_ids_exact(engine, self.table)

    @property
    def table(self) -> sa.Table:
        """The key table, in the shape the database has (found on first use)."""
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

    def require_kinds(self) -> None:
        if "kind" not in self.table.c:
            raise ConfigurationError(
                f"{self.table.name} was made before key kinds: run 'carnet init' (or "
                "KeyManager.create_schema()) once to upgrade it, see docs/format.md"
            )

    # -- reads ---------------------------------------------------------------------

    def rows(
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

    def active(self, conn: sa.Connection | None, tenant: str) -> tuple[KeyRecord | None, set[str]]:
        """The tenant's active data key record (if any) and the states of all its data keys.

        Inside ``conn``'s transaction if given, else in a connection of its own.
        """
        if conn is None:
            with self.engine.connect() as own:
                recs = self.rows(own, tenant)
        else:
            recs = self.rows(conn, tenant)
        active = [r for r in recs if r.state == ACTIVE]
        return (active[0] if active else None), {r.state for r in recs}

    def get(self, key_id: bytes) -> KeyRecord | None:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.key_id == key_id.hex())).first()
        if row is None:
            return None
        rec = KeyRecord.from_row(row)
        # The key id column may fold case on an old table: the id must be the one asked.
        return rec if rec.key_id == key_id else None

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        t = self.table
        q = sa.select(t).order_by(t.c.tenant, t.c.version)
        if tenant is not None:
            q = q.where(t.c.tenant == tenant)
        with self.engine.connect() as conn:
            recs = [KeyRecord.from_row(r) for r in conn.execute(q)]
        # Exact in Python too: a table still folding ids must not list another practice's keys.
        return recs if tenant is None else [r for r in recs if r.tenant == tenant]

    def batches(self, batch_size: int) -> Iterator[list[KeyRecord]]:
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

    def tenants(self) -> list[str]:
        """The practices with keys (the audit key's ``""`` is no practice)."""
        t = self.table
        with self.engine.connect() as conn:
            return [
                p
                for p in conn.execute(
                    sa.select(t.c.tenant).distinct().order_by(t.c.tenant)
                ).scalars()
                if p != AUDIT_TENANT
            ]

    def index_roots(
        self, conn: sa.Connection | None, tenant: str
    ) -> tuple[list[KeyRecord], set[str]]:
        """The tenant's active and inactive index roots, active first then newest first;
        and, unless the first is active, the states of all the tenant's keys."""
        if conn is None:
            with self.engine.connect() as own:
                return self.index_roots(own, tenant)
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
        return [KeyRecord.from_row(r) for r in rows], states

    def audit_keys(self, conn: sa.Connection | None = None) -> list[KeyRecord]:
        """The audit trail's keys (kind ``audit``), active first, then newest first."""
        if conn is None:
            with self.engine.connect() as own:
                return self.audit_keys(own)
        self.require_kinds()
        t = self.table
        rows = conn.execute(
            sa.select(t)
            .where(t.c.kind == AUDIT, t.c.tenant == AUDIT_TENANT)
            .order_by(t.c.active_tenant.is_(None), t.c.version.desc())
        )
        recs = [KeyRecord.from_row(r) for r in rows]
        for rec in recs:
            rec.check()
        return recs

    def decoy_keys(self, tenant: str, conn: sa.Connection | None = None) -> list[KeyRecord]:
        """The decoy keys of practice ``tenant`` (kind ``decoy``), active first."""
        if conn is None:
            with self.engine.connect() as own:
                return self.decoy_keys(tenant, own)
        self.require_kinds()
        recs = self.rows(conn, tenant, kind=DECOY)
        return sorted(recs, key=lambda r: (r.state != ACTIVE, -r.version))

    def insert_decoy_key(
        self, tenant: str, key_id: bytes, wrapped: bytes, master_key_uri: str
    ) -> bool:
        """Insert a practice's decoy key; False when another process won (its key is used)."""
        try:
            with self.engine.begin() as conn:
                self.insert(conn, tenant, key_id, wrapped, master_key_uri, version=1, kind=DECOY)
        except sa.exc.IntegrityError:
            return False
        except sa.exc.OperationalError as exc:
            if (getattr(exc.orig, "args", None) or [None])[0] != 4025:
                raise
            return False
        return True

    def insert_audit_key(self, key_id: bytes, wrapped: bytes, master_key_uri: str) -> bool:
        """Insert the first audit key; False when another process won (its key is used)."""
        try:
            with self.engine.begin() as conn:
                self.insert(
                    conn, AUDIT_TENANT, key_id, wrapped, master_key_uri, version=1, kind=AUDIT
                )
        except sa.exc.IntegrityError:
            return False  # another process won, or a kind check from before the trail
        except sa.exc.OperationalError as exc:
            # MariaDB reports a failed CHECK as error 4025, not an integrity error.
            if (getattr(exc.orig, "args", None) or [None])[0] != 4025:
                raise
            return False
        return True

    # -- writes --------------------------------------------------------------------

    def insert(
        self,
        conn: sa.Connection,
        tenant: str,
        key_id: bytes,
        wrapped: bytes,
        master_key_uri: str,
        *,
        version: int | None = None,
        kind: str = DATA,
    ) -> int:
        """Insert a wrapped key of ``kind`` (default: the next version) as the active one."""
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
                master_key_uri=master_key_uri,
                wrapped_key=wrapped,
                created_at=now,
                updated_at=now,
            )
        )
        return int(version)

    def insert_first(
        self,
        conn: sa.Connection | None,
        tenant: str,
        key_id: bytes,
        wrapped: bytes,
        master_key_uri: str,
    ) -> bool:
        """Insert a tenant's first data key (version 1); False when another process won.

        A first key is always version 1, so the UNIQUE (tenant, version)
        constraint lets a practice have a first key once, ever: if between the
        caller's read and this insert another process created the practice's
        key and an operator destroyed it, the insert fails instead of bringing
        the destroyed practice back, and the caller's re-read finds it
        destroyed. With ``conn``, inside its open transaction (a savepoint).
        """
        started = time.monotonic()
        failure: ConfigurationError | None = None
        try:
            if conn is None:
                with self.engine.begin() as own:
                    self.insert(own, tenant, key_id, wrapped, master_key_uri, version=1)
            else:
                with conn.begin_nested():
                    self.insert(conn, tenant, key_id, wrapped, master_key_uri, version=1)
        except sa.exc.IntegrityError:
            # Another process created the tenant's key first: the database's
            # unique constraints decided; the caller reloads theirs.
            return False
        except sa.exc.OperationalError as exc:
            if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
                raise
            failure = _sqlite_busy(conn, tenant, time.monotonic() - started)
        if failure is not None:
            # Raised outside the except block: no driver error chained to it.
            raise failure
        return True

    def insert_index_root(
        self,
        conn: sa.Connection | None,
        tenant: str,
        key_id: bytes,
        wrapped: bytes,
        master_key_uri: str,
    ) -> bool:
        """Insert a tenant's first index root; False when another process won."""
        try:
            if conn is None:
                with self.engine.begin() as own:
                    self.insert(own, tenant, key_id, wrapped, master_key_uri, kind=INDEX)
            else:
                with conn.begin_nested():
                    self.insert(conn, tenant, key_id, wrapped, master_key_uri, kind=INDEX)
        except sa.exc.IntegrityError:
            return False  # another process created it first: the next read loads theirs
        return True

    def transaction(self, tenant: str, work: Callable[[sa.Connection], _T]) -> _T:
        """Run ``work`` in a transaction of its own, again if it lost a race.

        Another rotation, first-key creation, re-enable or destroy may commit
        between our read and our write (SQLite takes no row locks; PostgreSQL's
        READ COMMITTED does not show rows inserted after the read began;
        MariaDB's gap locks deadlock): the unique constraints, a compare-and-set
        or the database's deadlock detection then reject ours, nothing of it is
        written, and ``work`` reads and decides again.
        """
        for attempt in range(RACE_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except (sa.exc.IntegrityError, _Raced):
                pass
            except sa.exc.DBAPIError as exc:
                if not lock_conflict(exc):
                    raise
            if attempt < RACE_ATTEMPTS - 1:
                # Jitter, so that two processes retrying do not collide again.
                time.sleep(random.uniform(0.005, 0.05) * (attempt + 1))  # noqa: S311
        raise KeyStoreInconsistent(
            f"the keys of tenant {tenant!r} kept changing concurrently: run again"
        )

    def rotate(
        self, tenant: str, key_id: bytes, wrapped: bytes, master_key_uri: str, *, create: bool
    ) -> int:
        """Make the wrapped key the tenant's active data key; the previous one becomes
        inactive. Returns its version."""

        def work(conn: sa.Connection) -> int:
            t = self.table
            recs = self.rows(conn, tenant, lock=True)
            active = [r for r in recs if r.state == ACTIVE]
            if not recs:
                if not create:
                    raise UnknownTenant(
                        tenant,
                        "; check the id, or pass create=True "
                        "('carnet keys rotate --create') to create its first key",
                    )
                return self.insert(conn, tenant, key_id, wrapped, master_key_uri, version=1)
            if not active and not any(r.state == DESTROYED for r in recs):
                # PostgreSQL's READ COMMITTED locking read re-checks only the rows
                # it first found: a rotation committed meanwhile shows its old key
                # inactive and not its new one. A new statement sees both.
                recs = self.rows(conn, tenant, lock=True)
                active = [r for r in recs if r.state == ACTIVE]
            if not active:
                # Only a destroyed practice has keys and no active one. Its rows'
                # states are no proof: SQL access can rewrite "destroyed" as
                # "retired". Whatever they say, only reenable gives it a key back.
                raise destroyed_error(tenant)
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
            return self.insert(conn, tenant, key_id, wrapped, master_key_uri)

        return self.transaction(tenant, work)

    def reenable(self, tenant: str, key_id: bytes, wrapped: bytes, master_key_uri: str) -> int:
        """Make the wrapped key the active data key of a practice without one. Its version."""

        def work(conn: sa.Connection) -> int:
            recs = self.rows(conn, tenant, lock=True)
            if not recs:
                raise UnknownTenant(tenant, ": there is nothing to re-enable")
            if any(r.state == ACTIVE for r in recs):
                raise ConfigurationError(
                    f"practice {tenant!r} has an active key: it is not destroyed"
                )
            # The UNIQUE active marker makes a concurrent re-enable fail here;
            # its retry then finds the practice active.
            return self.insert(conn, tenant, key_id, wrapped, master_key_uri)

        return self.transaction(tenant, work)

    def retire(self, key_id: bytes) -> tuple[KeyRecord, bool]:
        """Erase one inactive key's wrapped material. Returns its row before, and whether
        this call retired it (False: it already was retired or destroyed)."""
        t = self.table
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(t).where(t.c.key_id == key_id.hex()).with_for_update()
            ).first()
            if row is None:
                raise UnknownKey(key_id)
            rec = KeyRecord.from_row(row)
            if rec.state == ACTIVE:
                raise ConfigurationError(
                    f"key {key_id.hex()} is the active key of tenant {rec.tenant!r}: rotate first"
                )
            if rec.state in (RETIRED, DESTROYED):
                return rec, False
            conn.execute(
                t.update()
                .where(t.c.key_id == key_id.hex())
                .values(state=RETIRED, wrapped_key=None, updated_at=utcnow())
            )
        return rec, True

    def destroy(self, tenant: str) -> int:
        """Erase every wrapped key of ``tenant``, every kind; the number erased now.

        A practice with no key at all raises :class:`UnknownTenant`.
        """
        t = self.table
        n = 0

        def one_pass(conn: sa.Connection) -> int:
            # Every kind: the practice's blind-index roots are shredded with its data keys.
            recs = self.rows(conn, tenant, lock=True, kind=None)
            if not recs and n == 0:
                raise UnknownTenant(tenant, ": nothing was destroyed (check the id)")
            if all(r.state == DESTROYED for r in recs):
                return 0
            # By practice, not by the ids just read: SQLite takes no row lock, so a
            # rotation may commit between that read and this one atomic statement.
            # The comparison is exact: rows() refused a table that folds ids.
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
            done = self.transaction(tenant, one_pass)
            if not done:
                break
            n += done
        else:
            raise KeyStoreInconsistent(
                f"new keys of tenant {tenant!r} kept appearing while destroying it: run again"
            )
        return n

    def rotate_index_root(
        self, tenant: str, key_id: bytes, wrapped: bytes, master_key_uri: str
    ) -> int:
        """Make the wrapped key the tenant's active index root; the previous one becomes
        inactive. Returns its version."""
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
            return self.insert(conn, tenant, key_id, wrapped, master_key_uri, kind=INDEX)

    def rewrap(self, updates: list[tuple[KeyRecord, bytes]], master_key_uri: str) -> int:
        """Store each record's key wrapped anew under ``master_key_uri``, in one transaction.

        Each row is a compare-and-set on its previous master key: a row changed
        since it was read (rewrapped, retired, destroyed) is left alone.
        Returns how many rows changed.
        """
        t = self.table
        done = 0
        with self.engine.begin() as conn:
            for rec, wrapped in updates:
                res = conn.execute(
                    t.update()
                    .where(
                        t.c.key_id == rec.key_id.hex(),
                        t.c.master_key_uri == rec.master_key_uri,
                        t.c.wrapped_key.is_not(None),
                    )
                    .values(master_key_uri=master_key_uri, wrapped_key=wrapped, updated_at=utcnow())
                )
                done += res.rowcount
        return done


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
