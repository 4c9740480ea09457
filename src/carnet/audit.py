"""Audit events and a decrypt budget: notice and stop a bulk export through the application.

The leak that motivates carnet was a bulk read. Inside the application,
carnet cannot tell a legitimate screen from a scraping loop, but it can
count: every decryption (and, during a migration, every legacy plaintext
value a mixed-read column returns) is attributed to the principal in scope
(a user, a service account), aggregated per (principal, tenant, field), and
checked against an optional budget::

    auditor = carnet.audit.Auditor(budget=carnet.audit.DecryptBudget(limit=500, window=60))
    auditor.install(keys)
    with carnet.audit.principal_scope("dr.martin"):
        ...  # a 501st read within any 60 seconds raises DecryptBudgetExceeded

Events go to the ``carnet.audit`` logger (and an optional sink callable):
principal, tenant, field label, counts; never a note. With ``trail=`` (an
:class:`~carnet.trail.AuditTrail`) every disclosure is also written to the
durable, chained ``carnet_audit`` table, before the value is opened in
``required`` mode. See docs/audit.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlalchemy as sa

from . import budget_store
from .budget_store import BudgetStore
from .errors import ConfigurationError, DecryptBudgetExceeded
from .trail import ANONYMOUS, AuditTrail, _principal, audit_context, current_principal

if TYPE_CHECKING:
    from .manager import KeyManager

__all__ = [
    "ANONYMOUS",
    "AuditEvent",
    "AuditTrail",
    "Auditor",
    "DecryptBudget",
    "audit_context",
    "current_principal",
    "principal_scope",
]

log = logging.getLogger("carnet.audit")


@contextmanager
def principal_scope(principal: str) -> Iterator[str]:
    """Attribute the decryptions of a block to ``principal`` (a user or service id)."""
    if not principal:
        raise ConfigurationError("principal_scope needs a non-empty principal id")
    token = _principal.set(principal)
    try:
        yield principal
    finally:
        _principal.reset(token)


@dataclass(frozen=True)
class AuditEvent:
    """Reads of one field of one tenant by one principal between ``start`` and ``end``.

    ``count`` counts every note disclosed: decryptions and legacy plaintext
    values returned by a mixed-read column; ``legacy`` is how many of them
    were the latter. ``start`` and ``end`` are readings of the auditor's clock
    (``time.monotonic`` unless given).
    """

    principal: str
    tenant: str
    field: str
    count: int
    start: float
    end: float
    legacy: int = 0


Clock = Callable[[], float]

# Budgets drop the records of principals idle for a whole window when they
# track more principals than this and either a window has passed since the
# last sweep or the table doubled: amortized O(1) per new principal.
_SWEEP_MIN = 1024


class DecryptBudget:
    """Never more than ``limit`` decryptions by one principal in any ``window`` seconds.

    A sliding window, exact: for each principal the budget keeps the times of
    its allowed decryptions of the last ``window`` seconds (at most ``limit``
    of them). A decryption at time ``t`` is allowed when fewer than ``limit``
    were allowed in ``(t - window, t]``; otherwise it raises
    :class:`DecryptBudgetExceeded` and is not recorded, so a refused scraper
    does not push its own budget back. No instant is special: a burst
    straddling a minute boundary counts whole.

    ``exempt`` principals (batch jobs that legitimately read everything, such as
    re-encryption) are never stopped. ``clock`` returns seconds and must not go
    backwards (default ``time.monotonic``). Memory: about 32 bytes per
    decryption allowed in the last window, so at most ``32 * limit`` bytes per
    principal; principals idle for a window are dropped as the table grows.

    ``store``: one budget for every process (and machine) of the application.
    A URL (the audit trail's database, ``postgresql+psycopg://...``,
    ``sqlite:///...``, ``mysql+pymysql://...``; or ``redis://host:port/db``),
    an Engine, or a store object (:mod:`carnet.budget_store`). Each process
    reserves ``block`` reads at a time in the store and uses them for at most
    ``lease`` seconds (default ``window / 10``). The guarantee: at most
    ``limit`` disclosures by one principal in any interval of ``window``
    seconds of the store's clock, across all processes, crashes included;
    reads reserved but not used (at most one block per process) count as
    read, and a reservation counts for ``window + lease`` seconds, so honest
    use gets at least ``limit - processes * block`` per ``window + lease``
    (docs/audit.md). ``mode``: ``required`` (default) refuses a read the store
    cannot reserve (:class:`~carnet.errors.BudgetStoreUnavailable`);
    ``best_effort`` falls back to this per-process budget, says so at ERROR
    in the log, and records the reads it let through in the store when it
    answers again.
    """

    def __init__(
        self,
        limit: int,
        window: float,
        *,
        exempt: tuple[str, ...] = (),
        clock: Clock = time.monotonic,
        store: str | sa.Engine | BudgetStore | None = None,
        mode: str = budget_store.REQUIRED,
        block: int | None = None,
        lease: float | None = None,
        timeout: float = 2.0,
    ) -> None:
        if limit < 1 or not window > 0:
            raise ConfigurationError("a decrypt budget needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.exempt = frozenset(exempt)
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._sweep_at = _SWEEP_MIN
        self._swept = -math.inf
        self._lock = threading.Lock()
        self.shared: budget_store.SharedBudget | None = None
        if store is not None:
            if mode not in budget_store.MODES:
                raise ConfigurationError(
                    f"budget mode must be one of {', '.join(budget_store.MODES)}"
                )
            self.shared = budget_store.SharedBudget(
                budget_store.open_store(store, timeout=timeout),
                limit,
                window,
                block=block if block is not None else max(1, min(100, limit // 20)),
                lease=lease if lease is not None else window / 10,
                mode=mode,
                clock=clock,
                fallback=self._charge_here if mode == budget_store.BEST_EFFORT else None,
            )

    def install(self, manager: KeyManager) -> DecryptBudget:
        """Make this budget ``manager``'s decrypt hook on its own (no :class:`Auditor`
        counts, no events): the cheapest way to enforce it. Give an Auditor
        ``budget=`` instead to have both."""
        manager.decrypt_hook = self.hook()
        return self

    def hook(self) -> Callable[[str, str, int], None]:
        """The decrypt hook :meth:`install` sets: the principal in scope charged
        for every value about to open (legacy plaintext values included)."""
        pget, exempt = _principal.get, self.exempt
        shared = self.shared
        if shared is None:
            charge = self._charge_here

            def hook(tenant: str, field: str, count: int) -> None:
                p = pget() or ANONYMOUS
                if p not in exempt and count > 0:
                    charge(p, count)

            return hook
        # The shared budget's fast path inline: a read within the block in hand
        # costs a lock and a clock reading; the rest goes through charge().
        leases, lock, clock, slow = shared._leases, shared._lock, self._clock, shared.charge

        def shared_hook(tenant: str, field: str, count: int) -> None:
            p = pget() or ANONYMOUS
            if p in exempt or count <= 0:
                return
            with lock:
                lease = leases.get(p)
                if lease is not None and lease.left >= count and lease.expires > clock():
                    lease.left -= count
                    return
            slow(p, count)

        return shared_hook

    def stop(self, principal: str) -> None:
        """Use up ``principal``'s budget now: no read for the rest of the window (a decoy
        was opened). A shared budget records it in the store: every process stops it."""
        if self.shared is not None:
            self.shared.stop(principal)
        now = self._clock()
        with self._lock:
            times = self._recent.get(principal)
            if times is None:
                times = self._add(principal, now)
            times.clear()
            times.extend([now] * self.limit)

    def charge(self, principal: str, n: int = 1) -> None:
        """Record ``n`` decryptions by ``principal`` now, or raise if that breaks the budget."""
        if n <= 0 or principal in self.exempt:
            return
        if self.shared is not None:
            self.shared.charge(principal, n)
            return
        self._charge_here(principal, n)

    def _charge_here(self, principal: str, n: int) -> None:
        now = self._clock()
        window = self.window
        with self._lock:
            times = self._recent.get(principal)
            if times is None:
                times = self._add(principal, now)
            # Oldest first: drop those out of (now - window, now].
            while times and now - times[0] >= window:
                times.popleft()
            allowed = len(times) + n <= self.limit
            if allowed:
                if n == 1:
                    times.append(now)
                else:
                    times.extend([now] * n)
        if not allowed:
            log.warning(
                "carnet: decrypt budget exceeded by %r: %d more would pass %d in %gs",
                principal,
                n,
                self.limit,
                window,
            )
            raise DecryptBudgetExceeded(
                f"principal {principal!r} exceeded its decrypt budget of {self.limit} "
                f"per {window:g}s"
            )

    def _add(self, principal: str, now: float) -> deque[float]:
        recent = self._recent
        window = self.window
        if len(recent) >= self._sweep_at or (
            len(recent) > _SWEEP_MIN and now - self._swept >= window
        ):
            # A principal whose newest decryption is a window old has nothing
            # left in any window that still matters: forgetting it is exact.
            for p in [p for p, t in recent.items() if not t or now - t[-1] >= window]:
                del recent[p]
            self._sweep_at = max(_SWEEP_MIN, 2 * len(recent))
            self._swept = now
        times: deque[float] = deque()
        recent[principal] = times
        return times


class Auditor:
    """Counts reads of notes per (principal, tenant, field), emits events, enforces a budget.

    Events are emitted every ``flush_every`` seconds (on the next read) and on
    :meth:`flush`; ``sink`` receives each :class:`AuditEvent` besides the log.
    A legacy plaintext value returned by a mixed-read column during a
    migration discloses a note as a decryption does: it is counted and charged
    to the budget the same way (:meth:`legacy_read`).
    """

    def __init__(
        self,
        *,
        budget: DecryptBudget | None = None,
        sink: Callable[[AuditEvent], None] | None = None,
        flush_every: float = 60.0,
        clock: Clock = time.monotonic,
        trail: AuditTrail | None = None,
    ) -> None:
        self.budget = budget
        self.trail = trail
        self.sink = sink
        self.flush_every = flush_every
        self._clock = clock
        self._counts: defaultdict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._since = clock()
        self._lock = threading.Lock()

    def install(self, manager: KeyManager) -> Auditor:
        manager.decrypt_hook = self
        if self.trail is not None:
            from . import audit_rows

            audit_rows.activate(rows=self.trail.rows)
        return self

    def __call__(self, tenant: str, field: str, count: int) -> None:
        self._record(tenant, field, count, 0)

    def legacy_read(self, tenant: str, field: str, count: int) -> None:
        """A mixed-read column returned ``count`` legacy plaintext value(s)."""
        self._record(tenant, field, count, count)

    def _record(self, tenant: str, field: str, count: int, legacy: int) -> None:
        principal = _principal.get() or ANONYMOUS
        if self.budget is not None:
            self.budget.charge(principal, count)
        if self.trail is not None:
            # Before the value is opened: in required mode a read the trail
            # cannot record raises here, and nothing is disclosed.
            self.trail.disclosed(principal, tenant, field, count, legacy)
        with self._lock:
            c = self._counts[(principal, tenant, field)]
            c[0] += count
            c[1] += legacy
            due = self._clock() - self._since >= self.flush_every
        if due:
            self.flush()

    def flush(self) -> list[AuditEvent]:
        with self._lock:
            counts, self._counts = self._counts, defaultdict(lambda: [0, 0])
            start, self._since = self._since, self._clock()
            end = self._since
        events = [
            AuditEvent(p, t, f, n, start, end, legacy)
            for (p, t, f), (n, legacy) in sorted(counts.items())
        ]
        for ev in events:
            log.info(
                "carnet: decrypted %d value(s) of %s for tenant %r by principal %r%s",
                ev.count,
                ev.field,
                ev.tenant,
                ev.principal,
                f" ({ev.legacy} legacy plaintext)" if ev.legacy else "",
            )
            if self.sink is not None:
                self.sink(ev)
        return events
