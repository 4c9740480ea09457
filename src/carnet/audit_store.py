"""The ``carnet_audit`` table: a chain of HMAC'd records of every disclosure.

One record per (principal, practice, field, request context) and flush
interval: counts, a UTC time span, the writing process and host; or the
primary keys of rows disclosed (``rows``); or a blind-index search
(``search``: index, candidate and match counts); or a block reserved ahead
in ``required`` mode (``reserve``); or a ``checkpoint`` left by a prune.
Never a note, an identifier's value or key material.

The chain. Records are numbered ``seq`` 1, 2, 3… with no gap, in one chain
for the whole database. Each carries ``mac = HMAC-SHA256(audit key,
mac(seq - 1) || canonical(record))`` (genesis: 32 zero bytes), the
canonical form being the JSON array of every column but ``mac``, ``seq``
included. A writer appends a batch in one transaction: it reads the head
(highest ``seq``), computes the next records' MACs and inserts them; two
writers that read the same head collide on the ``seq`` primary key, the
loser rolls back and appends again on the new head. So every process
(every worker of every host) appends to the one chain, and ordering is the
database's commit order of those inserts.

The audit key is a key of kind ``audit`` in ``carnet_keys``, wrapped by the
master key like a data key (:mod:`carnet.keystore`); every process that
writes the trail unwraps it. What the chain proves and does not is written in
docs/audit.md ("What the chain proves").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ._engines import make_engine
from .errors import AuditStoreUnavailable, CarnetError, ConfigurationError
from .keystore import AUDIT, AUDIT_TENANT, lock_conflict, practice_id_type, wrap_context

if TYPE_CHECKING:
    from .manager import KeyManager

log = logging.getLogger("carnet.audit")

AUDIT_TABLE = "carnet_audit"
CHAIN_VERSION = 1
GENESIS = bytes(32)

READ = "read"  # counts of notes disclosed
ROWS = "rows"  # the row keys disclosed (rows=True)
SEARCH = "search"  # a blind-index search
RESERVE = "reserve"  # a block reserved ahead (required mode)
CHECKPOINT = "checkpoint"  # left by a prune: carries the chain forward
ALERT = "alert"  # a decoy note opened (carnet.decoys)
RECORD_KINDS = (READ, ROWS, SEARCH, RESERVE, CHECKPOINT, ALERT)

# Appends that lost the race for the head to another writer, before giving up.
APPEND_ATTEMPTS = 40

# The columns of the canonical form, in order (everything but mac).
_FIELDS = (
    "seq",
    "key_id",
    "kind",
    "principal",
    "practice",
    "field",
    "count",
    "legacy",
    "first_at",
    "last_at",
    "process",
    "host",
    "request_id",
    "route",
    "detail",
)


def audit_table(metadata: sa.MetaData, name: str = AUDIT_TABLE) -> sa.Table:
    """The audit table. Times are ISO-8601 UTC strings with microseconds and a ``Z``:
    they sort as text, and round-trip byte for byte on every backend (the MAC
    covers them)."""
    return sa.Table(
        name,
        metadata,
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("mac", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("principal", sa.String(255), nullable=True),
        sa.Column("practice", practice_id_type(), nullable=True),
        sa.Column("field", sa.String(255), nullable=True),
        sa.Column("count", sa.BigInteger, nullable=False, default=0),
        sa.Column("legacy", sa.BigInteger, nullable=False, default=0),
        sa.Column("first_at", sa.String(32), nullable=False),
        sa.Column("last_at", sa.String(32), nullable=False),
        sa.Column("process", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=True),
        sa.Column("route", sa.String(255), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Index(f"ix_{name}_practice_at", "practice", "first_at"),
        sa.Index(f"ix_{name}_principal_at", "principal", "first_at"),
        sa.Index(f"ix_{name}_kind", "kind"),
    )


def iso(ts: float) -> str:
    """A POSIX time as the trail writes it: ``2026-12-06T15:33:34.123456Z``."""
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_of(when: dt.datetime) -> str:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return iso(when.timestamp())


def canonical(rec: Mapping[str, Any]) -> bytes:
    body = [CHAIN_VERSION, *(rec.get(f) for f in _FIELDS)]
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chain_mac(key: bytes, prev: bytes, rec: Mapping[str, Any]) -> bytes:
    return hmac.new(key, prev + canonical(rec), hashlib.sha256).digest()


@dataclass
class VerifyReport:
    """What ``carnet audit verify`` found. ``first_bad`` is the ``seq`` of the first
    record that is missing or does not verify (None: the chain holds)."""

    records: int = 0
    first_seq: int | None = None
    head_seq: int = 0
    head_mac: str = ""
    first_bad: int | None = None
    problem: str | None = None
    checkpoints: int = 0

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_seq": self.first_seq,
            "head_seq": self.head_seq,
            "head_mac": self.head_mac,
            "first_bad": self.first_bad,
            "problem": self.problem,
            "checkpoints": self.checkpoints,
        }


@dataclass
class Head:
    seq: int
    mac: str


@dataclass
class _Keys:
    active_id: str
    secrets: dict[str, bytes] = field(default_factory=dict, repr=False)


class AuditStore:
    """The audit table on its own engine, and the audit key from ``manager``'s key table.

    ``url``: where the trail lives (default: the key table's database, on an
    engine of its own so a record is never written inside the application's
    transaction). An in-memory SQLite database has no second connection and
    is refused.
    """

    def __init__(
        self,
        manager: KeyManager,
        url: str | sa.Engine | None = None,
        *,
        table_name: str = AUDIT_TABLE,
        timeout: float = 5.0,
    ) -> None:
        self.manager = manager
        if isinstance(url, sa.Engine):
            self.engine = url
        else:
            if url is None:
                url = manager.engine.url.render_as_string(hide_password=False)
            self.engine = make_engine(url, batch=False, timeout=timeout, store="audit store")
        self.metadata = sa.MetaData()
        self.table = audit_table(self.metadata, table_name)
        self._keys: _Keys | None = None

    @property
    def name(self) -> str:
        """The store as named in messages: table and database, no password."""
        return f"{self.table.name} in {self.engine.url.render_as_string(hide_password=True)}"

    def __repr__(self) -> str:
        return f"<AuditStore {self.name}>"

    def create_schema(self) -> None:
        self.metadata.create_all(self.engine)

    def require_table(self) -> None:
        """Raise a clear error when the trail's table does not exist (a report on the
        wrong database, or before ``carnet init``)."""
        failure: CarnetError
        try:
            present = sa.inspect(self.engine).has_table(self.table.name)
        except sa.exc.SQLAlchemyError as exc:
            failure = AuditStoreUnavailable(self._down(exc))
        else:
            if present:
                return
            failure = ConfigurationError(
                f"no {self.name}: run 'carnet init' there, or give the trail's database "
                "with --store-url"
            )
        raise failure

    # -- the audit key ----------------------------------------------------------------

    def keys(self) -> _Keys:
        """The audit keys, unwrapped; the first audit key is created on first use."""
        k = self._keys
        if k is not None:
            return k
        m = self.manager
        store = m.store
        for _attempt in range(5):
            recs = store.audit_keys()
            usable = [r for r in recs if r.wrapped_key is not None]
            if usable:
                secrets = {}
                for rec in usable:
                    ctx = wrap_context(AUDIT_TENANT, rec.key_id, AUDIT)
                    assert rec.wrapped_key is not None  # noqa: S101 - filtered above
                    secrets[rec.key_id.hex()] = m._master_for(rec.master_key_uri).unwrap(
                        rec.wrapped_key, ctx
                    )
                    m.master_unwraps += 1
                k = _Keys(usable[0].key_id.hex(), secrets)
                self._keys = k
                return k
            m._writable("create the audit key")
            key_id, _secret, wrapped = m._new_wrapped(AUDIT_TENANT, AUDIT)
            store.insert_audit_key(key_id, wrapped, m.master_key.uri)
        raise ConfigurationError(
            f"could not create or load the audit key in {store.name}: a key table made before "
            "the audit trail refuses it until 'carnet init' (or the Alembic op) upgrades it"
        )

    # -- appending --------------------------------------------------------------------

    def append(self, records: Sequence[dict[str, Any]]) -> Head:
        """Append ``records`` (dicts of the columns but seq, mac, key_id) at the head of the
        chain, in one transaction; return the new head. Raises :class:`AuditStoreUnavailable`
        (naming the store, never a value) if the store cannot take them."""
        try:
            return self._append(records)
        except sa.exc.SQLAlchemyError as exc:
            failure = AuditStoreUnavailable(self._down(exc))
        raise failure

    def _down(self, exc: BaseException) -> str:
        from .errors import describe_db_error

        return f"the audit store ({self.name}) is unavailable: {describe_db_error(exc)}"

    def _append(self, records: Sequence[dict[str, Any]]) -> Head:
        keys = self.keys()
        secret = keys.secrets[keys.active_id]
        t = self.table
        for attempt in range(APPEND_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    head = conn.execute(
                        sa.select(t.c.seq, t.c.mac).order_by(t.c.seq.desc()).limit(1)
                    ).first()
                    seq, prev = (int(head.seq), bytes.fromhex(head.mac)) if head else (0, GENESIS)
                    rows = []
                    for r in records:
                        seq += 1
                        row = {**r, "seq": seq, "key_id": keys.active_id}
                        prev = chain_mac(secret, prev, row)
                        row["mac"] = prev.hex()
                        rows.append(row)
                    conn.execute(t.insert(), rows)
                return Head(seq, prev.hex())
            except sa.exc.IntegrityError:
                pass  # another writer took these seq numbers: append on the new head
            except sa.exc.DBAPIError as exc:
                # SQLite's busy timeout has already waited: a lock it could not
                # get in that time is an unavailable store, not a race.
                if not lock_conflict(exc) or self.engine.dialect.name == "sqlite":
                    raise
            time.sleep(random.uniform(0.001, 0.01) * min(attempt + 1, 10))  # noqa: S311
        raise AuditStoreUnavailable(
            f"the audit store ({self.name}) kept losing the race for the head of the chain"
        )

    # -- reading ----------------------------------------------------------------------

    def head(self) -> Head | None:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(t.c.seq, t.c.mac).order_by(t.c.seq.desc()).limit(1)
            ).first()
        return Head(int(row.seq), row.mac) if row else None

    def walk(self, batch: int = 1000, upto: int | None = None) -> Iterator[dict[str, Any]]:
        """Every record in chain order (keyset paging: flat memory)."""
        t = self.table
        last = -1
        while True:
            q = sa.select(t).where(t.c.seq > last).order_by(t.c.seq).limit(batch)
            if upto is not None:
                q = q.where(t.c.seq <= upto)
            with self.engine.connect() as conn:
                rows = [dict(r._mapping) for r in conn.execute(q)]
            if not rows:
                return
            yield from rows
            last = rows[-1]["seq"]

    def _checkpoint_anchors(self) -> dict[int, bytes]:
        t = self.table
        out: dict[int, bytes] = {}
        with self.engine.connect() as conn:
            for (detail,) in conn.execute(sa.select(t.c.detail).where(t.c.kind == CHECKPOINT)):
                try:
                    d = json.loads(detail or "{}")
                    out[int(d["pruned_through"])] = bytes.fromhex(d["anchor"])
                except (ValueError, KeyError, TypeError):
                    continue  # a forged or damaged checkpoint fails its own MAC in the walk
        return out

    def verify(
        self,
        *,
        head: Head | None = None,
        upto: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> VerifyReport:
        """Walk the chain; the first missing, altered, moved or inserted record is ``first_bad``.

        ``head``: a head of the chain recorded elsewhere (the log, a second
        sink): the chain must still hold that record with that MAC, which
        finds a removal of the newest records.
        """
        rep = VerifyReport()
        keys = self.keys()
        anchors: dict[int, bytes] | None = None
        prev = GENESIS
        expected: int | None = None
        for rec in self.walk(upto=upto):
            seq = int(rec["seq"])
            if expected is None:
                rep.first_seq = seq
                if seq != 1:
                    anchors = self._checkpoint_anchors()
                    anchor = anchors.get(seq - 1)
                    if anchor is None:
                        rep.first_bad = 1 if not anchors else max(anchors) + 1
                        if rep.first_bad >= seq:
                            rep.first_bad = seq - 1
                        rep.problem = (
                            f"the chain starts at record {seq} and no checkpoint accounts for "
                            "the records before it: records were removed"
                        )
                        return rep
                    prev = anchor
                expected = seq
            if seq != expected:
                rep.first_bad = expected
                rep.problem = f"record {expected} is missing (deleted)"
                return rep
            secret = keys.secrets.get(str(rec["key_id"]))
            want = chain_mac(secret, prev, rec) if secret is not None else None
            if want is None or not hmac.compare_digest(want.hex(), str(rec["mac"])):
                rep.first_bad = seq
                rep.problem = (
                    f"record {seq} does not verify: altered, moved, or inserted "
                    "(or a record before it was replaced)"
                )
                return rep
            if rec["kind"] == CHECKPOINT:
                rep.checkpoints += 1
            prev = want
            expected = seq + 1
            rep.records += 1
            rep.head_seq = seq
            rep.head_mac = want.hex()
            if progress is not None:
                progress(1)
        if head is not None and head.seq > 0:
            if head.seq > rep.head_seq:
                rep.first_bad = rep.head_seq + 1
                rep.problem = (
                    f"the chain ends at record {rep.head_seq} but record {head.seq} was seen "
                    "at its head: the newest records were removed"
                )
            else:
                mac = self._mac_of(head.seq)
                if mac is None or not hmac.compare_digest(mac, head.mac):
                    rep.first_bad = head.seq
                    rep.problem = f"record {head.seq} is not the one seen at the head earlier"
        return rep

    def _mac_of(self, seq: int) -> str | None:
        t = self.table
        with self.engine.connect() as conn:
            v = conn.execute(sa.select(t.c.mac).where(t.c.seq == seq)).scalar()
        return None if v is None else str(v)

    # -- pruning ----------------------------------------------------------------------

    def prune(
        self,
        before: dt.datetime,
        *,
        batch: int = 1000,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Remove the oldest records whose time span ended before ``before``.

        Only a prefix of the chain goes: records up to the first one that
        ended at or after ``before``. The prefix is verified first (a broken
        chain is not pruned: its evidence would go with it); a checkpoint
        record appended at the head then carries its last MAC forward, and
        only then are the records deleted, so a prune killed half-way leaves a
        chain that still verifies.
        """
        t = self.table
        cutoff = iso_of(before)
        with self.engine.connect() as conn:
            first_kept = conn.execute(
                sa.select(sa.func.min(t.c.seq)).where(t.c.last_at >= cutoff)
            ).scalar()
            upto = (
                conn.execute(sa.select(sa.func.max(t.c.seq))).scalar()
                if first_kept is None
                else int(first_kept) - 1
            )
            lowest = conn.execute(sa.select(sa.func.min(t.c.seq))).scalar()
        if upto is None or lowest is None or upto < int(lowest):
            return {"removed": 0, "pruned_through": None, "checkpoint": None}
        upto = int(upto)
        rep = self.verify(upto=upto)
        if not rep.ok:
            return {"removed": 0, "refused": rep.as_dict(), "pruned_through": None}
        now = iso(time.time())
        cp = self.append(
            [
                {
                    "kind": CHECKPOINT,
                    "principal": None,
                    "practice": None,
                    "field": None,
                    "count": upto - int(lowest) + 1,
                    "legacy": 0,
                    "first_at": now,
                    "last_at": now,
                    "process": process_id(),
                    "host": host_id(),
                    "request_id": None,
                    "route": None,
                    "detail": json.dumps(
                        {"pruned_through": upto, "anchor": rep.head_mac, "before": cutoff},
                        sort_keys=True,
                    ),
                }
            ]
        )
        removed = 0
        lo = int(lowest)
        while lo <= upto:
            hi = min(lo + batch - 1, upto)
            with self.engine.begin() as conn:
                done = conn.execute(t.delete().where(t.c.seq >= lo, t.c.seq <= hi)).rowcount
            removed += done
            if progress is not None:
                progress(done)
            lo = hi + 1
        return {"removed": removed, "pruned_through": upto, "checkpoint": cp.seq}


_PROCESS: str | None = None


def process_id() -> str:
    """This process: pid and a random tag (a pid is reused after a restart)."""
    global _PROCESS
    if _PROCESS is None or not _PROCESS.startswith(f"{os.getpid()}/"):
        _PROCESS = f"{os.getpid()}/{os.urandom(4).hex()}"
    return _PROCESS


def host_id() -> str:
    import socket

    return socket.gethostname()[:255]
