"""The durable audit trail: disclosures aggregated in memory, written to :class:`AuditStore`.

Two modes (docs/audit.md, "Guarantees"):

``best_effort`` (default)
    A read costs a dictionary update (an ORM load adds one to its result's
    count instead: :meth:`AuditTrail._tally`). Records are written every
    ``flush_every`` seconds by a background thread (and on :meth:`flush`,
    which a web app calls at the end of each request). A store that fails
    never blocks a read: the failure is logged at ERROR, counted, and the
    records stay in memory, merged, until a flush succeeds. Nothing is lost
    while the process lives; a crash loses at most the last interval's
    counts not yet flushed.

``required``
    Before a value is opened, the (principal, practice, field) it belongs
    to must hold a reservation committed to the store: a ``reserve`` record
    of ``block`` reads, written synchronously when the previous block is
    used up. With the store down the reservation fails and the read raises
    :class:`~carnet.errors.AuditStoreUnavailable` before anything is
    decrypted. So for each process and (principal, practice, field),
    reserved >= disclosed > reserved - block: the trail over-counts by less
    than one block and never under-counts, crash or not.

Rows (``rows=True``, or a column's ``info={"carnet_audit_rows": True}`` or
``{"carnet_audit_rows": "patient_id"}`` to name the attribute recorded) and
searches are recorded in the same buffers and flushed with the counts.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .audit_store import (
    ALERT,
    READ,
    RESERVE,
    ROWS,
    SEARCH,
    AuditStore,
    Head,
    host_id,
    iso,
    process_id,
)
from .errors import AuditStoreUnavailable, ConfigurationError

if TYPE_CHECKING:
    from .manager import KeyManager

log = logging.getLogger("carnet.audit")
json_log = logging.getLogger("carnet.audit.json")

BEST_EFFORT = "best_effort"
REQUIRED = "required"
MODES = (BEST_EFFORT, REQUIRED)

# Row keys per ``rows`` record: a long list is split, so no record grows unbounded.
ROWS_PER_RECORD = 500

_context: ContextVar[tuple[str | None, str | None]] = ContextVar(
    "carnet_audit_context", default=(None, None)
)
# The principal in scope (carnet.audit.principal_scope sets it).
ANONYMOUS = "<none>"
_principal: ContextVar[str | None] = ContextVar("carnet_principal", default=None)


def current_principal() -> str:
    """The principal in scope, or ``<none>``."""
    return _principal.get() or ANONYMOUS


@contextmanager
def audit_context(*, request_id: str | None = None, route: str | None = None) -> Iterator[None]:
    """Attach the application's own context (a request id, a route) to the records of a block."""
    token = _context.set(
        (
            None if request_id is None else str(request_id)[:255],
            None if route is None else str(route)[:255],
        )
    )
    try:
        yield
    finally:
        _context.reset(token)


# principal (None: ANONYMOUS), practice, field, (request id, route)
Key = tuple[str | None, str, str, tuple[str | None, str | None]]
# count, legacy, first read, end of the interval (POSIX times)
Agg = list[float]


class AuditTrail:
    """Records every disclosure durably; see the module docstring for the two modes.

    ``manager``: the KeyManager whose key table holds the audit key (and,
    unless ``url`` names another database, the ``carnet_audit`` table).
    ``head_every``: seconds between two heads of the chain written to the
    ``carnet.audit`` log and to ``head_sink`` (a second place, so a removal
    of the newest records can be found: ``carnet audit verify --head``).
    """

    def __init__(
        self,
        manager: KeyManager,
        url: str | sa.Engine | None = None,
        *,
        mode: str = BEST_EFFORT,
        flush_every: float = 1.0,
        block: int = 1000,
        rows: bool = False,
        head_every: float = 300.0,
        head_sink: Callable[[Head], None] | None = None,
        background: bool = True,
        timeout: float = 5.0,
        create: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"audit mode must be one of {', '.join(MODES)}")
        if block < 1 or not flush_every > 0:
            raise ConfigurationError("an audit trail needs block >= 1 and flush_every > 0")
        self.mode = mode
        self._required = mode == REQUIRED
        self.block = block
        self.rows = rows
        self.flush_every = flush_every
        self.head_every = head_every
        self.head_sink = head_sink
        self.store = AuditStore(manager, url, timeout=timeout)
        # The audit key is loaded (created on first use) now, from the key table:
        # later, inside an application's SQLite write transaction, creating it
        # could not commit.
        self.store.keys()
        # Whether the table still has to be created (a store down at start-up
        # gets it on the first flush that reaches it).
        self._create = create
        if create:
            failure = self._ensure_table()
            if failure is not None:
                if mode == REQUIRED:
                    raise failure
                log.error("carnet: %s (at start-up)", failure)
        self.process = process_id()
        self.host = host_id()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[Key, Agg] = {}
        self._rows: dict[Key, list[str]] = {}
        self._searches: list[dict[str, Any]] = []
        # Reservations per (principal, practice, field), whatever the request:
        # a block outlives the request that reserved it.
        self._reserved: dict[tuple[str | None, str, str], int] = {}
        self._used: dict[tuple[str | None, str, str], int] = {}
        # Counts kept by ORM results (:meth:`_tally`): the live ones by id, the
        # ones whose result is gone queued for the next settlement.
        self._tallies: dict[int, tuple[list[Any], weakref.ref[Any]]] = {}
        self._ended: collections.deque[list[Any]] = collections.deque()
        self._head_at = 0.0
        self._flushed_at = time.time()
        self.head: Head | None = None
        # Reads taken from the pending counts by flushes (the rest are pending).
        self._taken_reads = 0
        self._taken_legacy = 0
        self.records_written = 0
        self.store_failures = 0
        self.reservations = 0
        self.rows_recorded = 0
        self.searches = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(
                target=_run_flusher,
                args=(weakref.ref(self), self._stop, flush_every),
                name="carnet-audit-flush",
                daemon=True,
            )
            self._thread.start()
        atexit.register(_flush_at_exit, weakref.ref(self))

    def __repr__(self) -> str:
        return f"<AuditTrail {self.mode} {self.store.name}>"

    # -- the read path ----------------------------------------------------------------

    def __call__(self, tenant: str, field: str, count: int) -> None:
        """The decrypt hook (``trail.install(manager)``): ``count`` values are about to open."""
        # The read path, kept lean (about 0.3 µs): the principal None stands for
        # ANONYMOUS until the record is written; the interval's end (last_at) is
        # stamped when a flush takes it.
        key = (_principal.get(), tenant, field, _context.get())
        covered = True
        with self._lock:
            if self._required:
                # Within the reservation: counted under the same lock. Past it:
                # _add reserves a block first (or raises), outside this lock.
                rkey = key[:3]
                used = self._used.get(rkey, 0) + count
                covered = used <= self._reserved.get(rkey, 0)
                if covered:
                    self._used[rkey] = used
            if covered:
                agg = self._pending.get(key)
                if agg is None:
                    self._pending[key] = [count, 0, time.time(), 0.0]
                else:
                    agg[0] += count
        if not covered:
            self._add(key, count, 0)
        elif self._thread is None:
            self._flush_if_due()

    def legacy_read(self, tenant: str, field: str, count: int) -> None:
        """A mixed-read column returned ``count`` legacy plaintext value(s)."""
        self._add((_principal.get(), tenant, field, _context.get()), count, count)

    def install(self, manager: KeyManager) -> AuditTrail:
        """Make this trail ``manager``'s decrypt hook (without the in-process
        :class:`~carnet.audit.Auditor`; give the Auditor ``trail=`` for a budget too)."""
        from . import audit_rows

        manager.decrypt_hook = self._hook() if not self._required and self._thread else self
        audit_rows.activate(rows=self.rows)
        return self

    def _hook(self) -> Callable[[str, str, int], None]:
        """:meth:`__call__` of ``best_effort`` with a background flusher, as a closure:
        a plain function call costs less than an instance's ``__call__`` (about a
        fifth of the hook's cost). It carries ``trail`` and ``legacy_read`` as the
        trail itself does."""
        pget, cget, now = _principal.get, _context.get, time.time
        # acquire/release, not ``with``: about 0.1 µs less per value, a third of
        # the hook; the try keeps the lock from being held by a failed lookup.
        acquire, release = self._lock.acquire, self._lock.release

        def hook(tenant: str, field: str, count: int) -> None:
            key = (pget(), tenant, field, cget())
            acquire()
            try:
                pending = self._pending
                agg = pending.get(key)
                if agg is None:
                    pending[key] = [count, 0, now(), 0.0]
                else:
                    agg[0] += count
            finally:
                release()

        hook.trail = self  # type: ignore[attr-defined]
        hook.legacy_read = self.legacy_read  # type: ignore[attr-defined]
        # Only this hook counts per result: required mode reserves before each
        # value opens, and a trail without its flusher flushes as reads come.
        hook.tally = self._tally  # type: ignore[attr-defined]
        return hook

    def _tally(self, tenant: str, field: str, owner: object) -> list[Any]:
        """A count of ``field`` notes of ``tenant`` kept by one ORM result (``owner``,
        weakly referenced, lives as long as that result's loaders).

        The row getter of an ORM load adds one to ``cell[0]`` for each value it
        opens, in place of a call to the hook: the same count, aggregated per
        statement (docs/audit.md, "The record"), for a tenth of the hook's cost.
        The reader's thread is the only writer of ``cell[0]``; ``cell[1]`` (what
        was already taken into the pending counts) is written only under the
        trail's lock, by :meth:`_settle`, which every flush, :meth:`pending`
        and :meth:`counters` run first: a count is never lost nor taken twice,
        whether the result is alive, finished or collected. The record's
        principal and context are those in effect when the result opened its
        first note of ``tenant`` this way.
        """
        cell: list[Any] = [0, 0, (_principal.get(), tenant, field, _context.get()), time.time()]
        tallies, ended, ident = self._tallies, self._ended, id(cell)

        # Called as the owner is freed, on whatever thread frees it (within a
        # garbage collection too): no lock is taken, only a pop and an append,
        # each atomic; the settlement reads the count.
        def gone(_ref: object) -> None:
            ended.append(cell)
            tallies.pop(ident, None)

        tallies[ident] = (cell, weakref.ref(owner, gone))
        return cell

    def _settle(self) -> None:
        """Move what the ORM results' tallies counted into the pending counts
        (under ``self._lock``)."""
        ended, pending = self._ended, self._pending
        cells: list[list[Any]] = []
        while ended:  # a freed result appends; only a settlement (locked) pops
            cells.append(ended.popleft())
        while True:
            try:
                # A result freed meanwhile (a collection) pops from the dictionary.
                cells.extend(cell for cell, _ref in list(self._tallies.values()))
                break
            except RuntimeError:
                continue
        now = time.time()
        for cell in cells:
            n = cell[0]
            delta = n - cell[1]
            first, cell[3] = cell[3], now  # what is counted after this is read after it
            if not delta:
                continue
            cell[1] = n
            key = cell[2]
            agg = pending.get(key)
            if agg is None:
                pending[key] = [delta, 0, first, 0.0]
            else:
                agg[0] += delta
                if first < agg[2]:
                    agg[2] = first

    @property
    def trail(self) -> AuditTrail:
        # What carnet.audit_rows looks for on a manager's decrypt hook.
        return self

    def disclosed(self, principal: str, practice: str, field: str, count: int, legacy: int) -> None:
        """``count`` notes of ``field`` of ``practice`` are about to be disclosed to ``principal``.

        Called before the values are opened. In ``required`` mode this raises
        :class:`AuditStoreUnavailable` when no reservation covers them and
        none can be committed.
        """
        self._add((principal, practice, field, _context.get()), count, legacy)

    def _add(self, key: Key, count: int, legacy: int) -> None:
        if self._required:
            self._cover(key, count)
        with self._lock:
            agg = self._pending.get(key)
            if agg is None:
                self._pending[key] = [count, legacy, time.time(), 0.0]
            else:
                agg[0] += count
                agg[1] += legacy
        if self._thread is None:
            self._flush_if_due()

    def _flush_if_due(self) -> None:
        if time.time() - self._flushed_at >= self.flush_every:
            self.flush()

    def _cover(self, key: Key, count: int) -> None:
        with self._lock:
            rkey = key[:3]
            used = self._used.get(rkey, 0) + count
            reserved = self._reserved.get(rkey, 0)
            if used <= reserved:
                self._used[rkey] = used
                return
            need = used - reserved
            more = self.block * -(-need // self.block)
            # The write happens under the lock: the reads of this key wait for
            # their reservation rather than each reserving a block.
            now = time.time()
            rec = self._record(RESERVE, key, more, 0, now, now)
            try:
                head = self.store.append([rec])
            except AuditStoreUnavailable as exc:
                self.store_failures += 1
                self.last_error = str(exc)
                log.error("carnet: %s; a read was refused (required mode)", exc)
                raise
            self._reserved[rkey] = reserved + more
            self._used[rkey] = used
            self.reservations += 1
            self.records_written += 1
            self.head = head
        self._log_json(rec)

    def alert(self, principal: str, practice: str, field: str, detail: Mapping[str, Any]) -> bool:
        """Record an alert (a decoy note opened) now, in its own transaction, whatever the
        mode; True if the store took it. A failure is logged at ERROR, never raised:
        the alarm's other channels (the log, the hook) still go off."""
        now = time.time()
        rec = self._record(ALERT, (principal, practice, field, _context.get()), 1, 0, now, now)
        rec["detail"] = json.dumps(dict(detail), sort_keys=True)
        try:
            if self._create:
                self._ensure_table()
            head = self.store.append([rec])
        except Exception as exc:  # noqa: BLE001 - the alarm must not be silenced
            self.store_failures += 1
            self.last_error = type(exc).__name__
            log.error("carnet: could not record a decoy alert in the audit trail (%s)", exc)
            return False
        with self._lock:
            self.records_written += 1
            self.head = head
        self._log_json(rec)
        return True

    def row_disclosed(self, principal: str, practice: str, field: str, row: str) -> None:
        key = (principal, practice, field, _context.get())
        with self._lock:
            self._rows.setdefault(key, []).append(row)
            self.rows_recorded += 1

    def searched(
        self,
        principal: str,
        practice: str,
        index: str,
        candidates: int,
        matches: list[str],
    ) -> None:
        now = time.time()
        rec = self._record(
            SEARCH, (principal, practice, index, _context.get()), len(matches), 0, now, now
        )
        rec["detail"] = json.dumps(
            {"index": index, "candidates": candidates, "matches": len(matches), "rows": matches},
            sort_keys=True,
        )
        with self._lock:
            self._searches.append(rec)
            self.searches += 1

    # -- writing ----------------------------------------------------------------------

    def _record(
        self, kind: str, key: Key, count: int, legacy: int, first: float, last: float
    ) -> dict[str, Any]:
        principal, practice, field, (request_id, route) = key
        return {
            "kind": kind,
            "principal": principal if principal is not None else ANONYMOUS,
            "practice": practice,
            "field": field,
            "count": count,
            "legacy": legacy,
            "first_at": iso(first),
            "last_at": iso(last),
            "process": self.process,
            "host": self.host,
            "request_id": request_id,
            "route": route,
            "detail": None,
        }

    def _take(self) -> tuple[dict[Key, Agg], dict[Key, list[str]], list[dict[str, Any]]]:
        now = time.time()
        with self._lock:
            self._settle()
            pending, self._pending = self._pending, {}
            for agg in pending.values():
                agg[3] = now
                self._taken_reads += int(agg[0])
                self._taken_legacy += int(agg[1])
            rows, self._rows = self._rows, {}
            searches, self._searches = self._searches, []
        return pending, rows, searches

    def _put_back(
        self, pending: dict[Key, Agg], rows: dict[Key, list[str]], searches: list[dict[str, Any]]
    ) -> None:
        with self._lock:
            for key, agg in pending.items():
                self._taken_reads -= int(agg[0])
                self._taken_legacy -= int(agg[1])
                cur = self._pending.get(key)
                if cur is None:
                    self._pending[key] = agg
                else:
                    cur[0] += agg[0]
                    cur[1] += agg[1]
                    cur[2] = min(cur[2], agg[2])
            for key, keys in rows.items():
                self._rows.setdefault(key, [])[:0] = keys
            self._searches[:0] = searches

    def pending(self) -> int:
        """Records waiting to be written (after a store failure, until it returns)."""
        with self._lock:
            self._settle()
            return (
                len(self._pending)
                + sum(-(-len(v) // ROWS_PER_RECORD) for v in self._rows.values())
                + len(self._searches)
            )

    def flush(self) -> bool:
        """Write what is pending; True if the store took it (or nothing was pending).

        Never raises for a store failure: it is logged at ERROR, counted in
        ``store_failures``, and the records are kept for the next flush.
        """
        with self._flush_lock:
            self._flushed_at = time.time()
            pending, rows, searches = self._take()
            records: list[dict[str, Any]] = []
            for key, agg in sorted(pending.items(), key=lambda kv: kv[1][2]):
                records.append(self._record(READ, key, int(agg[0]), int(agg[1]), agg[2], agg[3]))
            for key, keys in rows.items():
                for i in range(0, len(keys), ROWS_PER_RECORD):
                    part = keys[i : i + ROWS_PER_RECORD]
                    now = time.time()
                    rec = self._record(ROWS, key, len(part), 0, now, now)
                    rec["detail"] = json.dumps({"rows": part})
                    records.append(rec)
            records.extend(searches)
            if not records:
                self._maybe_head()
                return True
            try:
                if self._create:
                    self._ensure_table()  # if it fails, so does the append, which reports
                head = self.store.append(records)
            except AuditStoreUnavailable as exc:
                self._put_back(pending, rows, searches)
                self.store_failures += 1
                self.last_error = str(exc)
                log.error(
                    "carnet: %s; %d audit record(s) kept in memory until it returns",
                    exc,
                    len(records),
                )
                return False
            except Exception as exc:  # noqa: BLE001 - keep the records whatever failed
                self._put_back(pending, rows, searches)
                self.store_failures += 1
                self.last_error = type(exc).__name__
                log.error("carnet: audit store write failed (%s); records kept", type(exc).__name__)
                return False
            self.records_written += len(records)
            self.head = head
            for rec in records:
                self._log_json(rec)
            self._maybe_head(force=False)
            return True

    def _ensure_table(self) -> AuditStoreUnavailable | None:
        try:
            self.store.create_schema()
        except sa.exc.SQLAlchemyError as exc:
            return AuditStoreUnavailable(self.store._down(exc))
        self._create = False
        return None

    def _maybe_head(self, force: bool = False) -> None:
        now = time.time()
        if self.head is None or not (force or now - self._head_at >= self.head_every):
            return
        self._head_at = now
        head = self.head
        json_log.info(json.dumps({"event": "carnet.audit.head", "seq": head.seq, "mac": head.mac}))
        log.info("carnet: audit chain head seq=%d mac=%s", head.seq, head.mac)
        if self.head_sink is not None:
            try:
                self.head_sink(head)
            except Exception as exc:  # noqa: BLE001 - a sink never breaks the trail
                log.error("carnet: audit head sink failed (%s)", type(exc).__name__)

    def _log_json(self, rec: Mapping[str, Any]) -> None:
        if json_log.isEnabledFor(logging.INFO):
            json_log.info(json.dumps({"event": "carnet.audit.record", **rec}, sort_keys=True))

    def counters(self) -> dict[str, int]:
        """Counters to scrape (docs/audit.md, "What to watch"): monotonic except ``pending``."""
        with self._lock:
            self._settle()
            reads = self._taken_reads + sum(int(a[0]) for a in self._pending.values())
            legacy = self._taken_legacy + sum(int(a[1]) for a in self._pending.values())
        return {
            "carnet_audit_reads_total": reads,
            "carnet_audit_legacy_reads_total": legacy,
            "carnet_audit_records_written_total": self.records_written,
            "carnet_audit_store_failures_total": self.store_failures,
            "carnet_audit_reservations_total": self.reservations,
            "carnet_audit_rows_total": self.rows_recorded,
            "carnet_audit_searches_total": self.searches,
            "carnet_audit_pending_records": self.pending(),
            "carnet_audit_head_seq": self.head.seq if self.head else 0,
        }

    def close(self) -> bool:
        """Stop the background flusher and write what is pending (True if all was written)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        ok = self.flush()
        self._maybe_head(force=True)
        return ok


def _run_flusher(ref: weakref.ref[AuditTrail], stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        trail = ref()
        if trail is None:
            return
        try:
            trail.flush()
        except Exception:  # noqa: BLE001 - the thread must outlive any failure
            log.exception("carnet: audit flush failed")
        del trail


def _flush_at_exit(ref: weakref.ref[AuditTrail]) -> None:
    trail = ref()
    if trail is not None:
        trail.close()
