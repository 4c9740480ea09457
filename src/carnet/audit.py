"""Audit events and a decrypt budget: notice and stop a bulk export through the application.

The leak that motivates carnet was a bulk read. Inside the application,
carnet cannot tell a legitimate screen from a scraping loop, but it can
count: every decryption is attributed to the principal in scope (a user, a
service account), aggregated per (principal, tenant, field), and checked
against an optional budget per time window::

    auditor = carnet.audit.Auditor(budget=carnet.audit.DecryptBudget(limit=500, window=60))
    auditor.install(keys)
    with carnet.audit.principal_scope("dr.martin"):
        ...  # the 501st decrypt within a minute raises DecryptBudgetExceeded

Events go to the ``carnet.audit`` logger (and an optional sink callable):
principal, tenant, field label, count; never a note.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigurationError, DecryptBudgetExceeded

if TYPE_CHECKING:
    from .manager import KeyManager

log = logging.getLogger("carnet.audit")
ANONYMOUS = "<none>"
_principal: ContextVar[str | None] = ContextVar("carnet_principal", default=None)


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


def current_principal() -> str:
    return _principal.get() or ANONYMOUS


@dataclass(frozen=True)
class AuditEvent:
    principal: str
    tenant: str
    field: str
    count: int
    start: float
    end: float


class DecryptBudget:
    """At most ``limit`` decryptions per principal in any fixed ``window`` of seconds.

    ``exempt`` principals (batch jobs that legitimately read everything, such as
    re-encryption) are counted but never stopped.
    """

    def __init__(self, limit: int, window: float, *, exempt: tuple[str, ...] = ()) -> None:
        if limit < 1 or window <= 0:
            raise ConfigurationError("a decrypt budget needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.exempt = frozenset(exempt)
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def charge(self, principal: str, n: int = 1) -> None:
        if principal in self.exempt:
            return
        now = time.monotonic()
        with self._lock:
            start, used = self._windows.get(principal, (now, 0))
            if now - start >= self.window:
                start, used = now, 0
            used += n
            self._windows[principal] = (start, used)
        if used > self.limit:
            log.warning(
                "carnet: decrypt budget exceeded by %r: %d decryptions in %.0fs (limit %d)",
                principal,
                used,
                self.window,
                self.limit,
            )
            raise DecryptBudgetExceeded(
                f"principal {principal!r} exceeded its decrypt budget of {self.limit} "
                f"per {self.window:g}s"
            )


class Auditor:
    """Counts decryptions per (principal, tenant, field), emits events, enforces a budget.

    Events are emitted every ``flush_every`` seconds (on the next decryption) and
    on :meth:`flush`; ``sink`` receives each :class:`AuditEvent` besides the log.
    """

    def __init__(
        self,
        *,
        budget: DecryptBudget | None = None,
        sink: Callable[[AuditEvent], None] | None = None,
        flush_every: float = 60.0,
    ) -> None:
        self.budget = budget
        self.sink = sink
        self.flush_every = flush_every
        self._counts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self._since = time.monotonic()
        self._lock = threading.Lock()

    def install(self, manager: KeyManager) -> Auditor:
        manager.decrypt_hook = self
        return self

    def __call__(self, tenant: str, field: str, count: int) -> None:
        principal = _principal.get() or ANONYMOUS
        if self.budget is not None:
            self.budget.charge(principal, count)
        self._counts[(principal, tenant, field)] += count
        if time.monotonic() - self._since >= self.flush_every:
            self.flush()

    def flush(self) -> list[AuditEvent]:
        with self._lock:
            counts, self._counts = self._counts, defaultdict(int)
            start, self._since = self._since, time.monotonic()
        events = [
            AuditEvent(p, t, f, n, start, self._since) for (p, t, f), n in sorted(counts.items())
        ]
        for ev in events:
            log.info(
                "carnet: decrypted %d value(s) of %s for tenant %r by principal %r",
                ev.count,
                ev.field,
                ev.tenant,
                ev.principal,
            )
            if self.sink is not None:
                self.sink(ev)
        return events
