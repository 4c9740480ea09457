"""The shared decrypt budget: one budget per principal for every process, in SQL or Redis.

A :class:`~carnet.audit.DecryptBudget` given ``store=`` keeps, per principal,
a log of the *reservations* every process made: ``(time, count)`` on the
store's clock. A process asks the store for a block of reads before it opens
a value; the store grants it, atomically, only if the reservations of the
last ``window + lease`` seconds plus this one stay within ``limit``. The
process then uses the block for at most ``lease`` seconds (measured on its
own monotonic clock from *before* it sent the request, so the block is dead
in the process before it leaves the store's span), and asks again when the
block is used up or old.

Why ``window + lease``: every disclosure under a block granted at store time
``t`` happens in ``[t, t + lease)``. Take any interval ``[s, s + window)``:
the disclosures in it come from blocks granted in ``(s - lease, s + window)``,
and when the last of those was granted the store checked every block
granted in the ``window + lease`` before it, which covers all of them. So
the guarantee is exact in the over direction: **at most ``limit``
disclosures by one principal in any interval of ``window`` seconds**,
across processes and machines, crashes included. The price is on the honest
side: a block counts for ``window + lease`` seconds, and reads reserved but
not used (at most one block per live process, and the block of a process
that died) count as read until they age out. See docs/audit.md.

The stores (docs/audit.md, "One budget for every process"):

SQL (SQLite, PostgreSQL, MariaDB)
    Table ``carnet_budget``: one row per principal holding its log (a short
    JSON list: at most ``limit / block`` entries are live). A reservation is
    one transaction that first updates the row (which takes its lock: a row
    lock on PostgreSQL and MariaDB, the write lock on SQLite), reads the log
    and the database's clock, and writes the new log.

Redis
    One sorted set per principal (``carnet:budget:<principal>``), scored by
    Redis' ``TIME``, changed by one Lua script: atomic by construction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import sqlalchemy as sa

from ._engines import make_engine
from .errors import BudgetStoreUnavailable, ConfigurationError, DecryptBudgetExceeded

log = logging.getLogger("carnet.audit")

BUDGET_TABLE = "carnet_budget"
REQUIRED = "required"
BEST_EFFORT = "best_effort"
MODES = (REQUIRED, BEST_EFFORT)

# Seconds a process waits, after the store failed, before it asks it again:
# a store that times out is not asked once per read.
RETRY_DOWN = 1.0
# Reservations that lost a race (a deadlock, a busy SQLite) before giving up.
ATTEMPTS = 20

Clock = Callable[[], float]


class BudgetStore(Protocol):
    """Where the reservations live. ``reserve`` is atomic per principal."""

    name: str

    def reserve(
        self,
        principal: str,
        need: int,
        want: int,
        limit: int,
        span: float,
        force: bool = False,
        release: tuple[str, int] | None = None,
    ) -> tuple[int, float, str]:
        """Grant between ``need`` and ``want`` reads, or 0; return (grant, retry after, tag).

        The grant is ``min(want, limit - live)`` when that is at least
        ``need`` (``live``: the reads reserved in the last ``span`` seconds of
        the store's clock), else 0, and then the second value is how many
        seconds until the oldest live reservation ages out. ``force``:
        record ``want`` whatever the log holds (reads a process disclosed on
        its own budget while the store was down). ``release``: (tag, reads)
        of this process's previous reservation that it will never use (its
        lease is dropped before the request leaves), given back first. The
        tag names the new reservation. Raises :class:`BudgetStoreUnavailable`.
        """
        ...


def _decide(
    entries: list[list[Any]],
    now: float,
    need: int,
    want: int,
    limit: int,
    span: float,
    force: bool,
    release: tuple[str, int] | None,
    tag: str,
) -> tuple[list[list[Any]], int, float]:
    """The rule both stores apply: (live entries after the grant, grant, retry after).

    An entry is ``[store time, reads, tag]``."""
    live = [e for e in entries if e[0] > now - span]
    if release is not None:
        for e in live:
            if e[2] == release[0]:
                e[1] = max(0, int(e[1]) - release[1])
        live = [e for e in live if e[1] > 0]
    used = sum(int(e[1]) for e in live)
    room = limit - used
    if force:
        grant = want
    elif room >= need:
        grant = min(want, room)
    else:
        grant = 0
    if grant > 0:
        live.append([now, grant, tag])
        return live, grant, 0.0
    oldest = min(e[0] for e in live) if live else now
    return live, 0, max(0.0, oldest + span - now)


class SQLBudgetStore:
    """The reservations in a ``carnet_budget`` table (the audit trail's database).

    ``clock``: None reads the database's own clock in the reservation's
    transaction (the store's clock of the guarantee); a callable replaces it
    (tests drive time).
    """

    def __init__(
        self,
        url: str | sa.Engine,
        *,
        table_name: str = BUDGET_TABLE,
        timeout: float = 2.0,
        create: bool = True,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(url, sa.Engine):
            self.engine = url
        else:
            self.engine = make_engine(url, batch=False, timeout=timeout, store="budget store")
        self.metadata = sa.MetaData()
        self.table = budget_table(self.metadata, table_name)
        self._clock = clock
        self._now = _now_sql(self.engine.dialect.name)
        self.name = f"{self.table.name} in {self.engine.url.render_as_string(hide_password=True)}"
        self._created = False
        if create:
            try:
                self._create()
            except BudgetStoreUnavailable as exc:
                # Reported again by the first reservation; the caller decides
                # (required: fail there; best_effort: fall back).
                log.error("carnet: %s (at start-up)", exc)

    def __repr__(self) -> str:
        return f"<SQLBudgetStore {self.name}>"

    def _create(self) -> None:
        try:
            self.metadata.create_all(self.engine)
        except sa.exc.SQLAlchemyError as exc:
            raise BudgetStoreUnavailable(self._down(exc)) from None
        self._created = True

    def _down(self, exc: BaseException) -> str:
        from .errors import describe_db_error

        return f"the decrypt budget's store ({self.name}) is unavailable: {describe_db_error(exc)}"

    def reserve(
        self,
        principal: str,
        need: int,
        want: int,
        limit: int,
        span: float,
        force: bool = False,
        release: tuple[str, int] | None = None,
    ) -> tuple[int, float, str]:
        failure: BudgetStoreUnavailable
        try:
            if not self._created:
                self._create()
            return self._reserve(principal, need, want, limit, span, force, release)
        except sa.exc.SQLAlchemyError as exc:
            failure = BudgetStoreUnavailable(self._down(exc))
        raise failure

    def _reserve(
        self,
        principal: str,
        need: int,
        want: int,
        limit: int,
        span: float,
        force: bool,
        release: tuple[str, int] | None,
    ) -> tuple[int, float, str]:
        from .keystore import lock_conflict

        t = self.table
        tag = _new_tag()
        for attempt in range(ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    # The update first: it takes the row's lock (SQLite: the
                    # database's write lock) before anything is read, so two
                    # reservations of one principal are serialized.
                    hit = conn.execute(
                        t.update().where(t.c.principal == principal).values(seq=t.c.seq + 1)
                    ).rowcount
                    if not hit:
                        conn.execute(t.insert().values(principal=principal, seq=1, log="[]"))
                    row = conn.execute(
                        sa.select(t.c.log, self._now).where(t.c.principal == principal)
                    ).one()
                    now = self._clock() if self._clock is not None else float(row[1])
                    entries = json.loads(row[0] or "[]")
                    live, grant, retry = _decide(
                        entries, now, need, want, limit, span, force, release, tag
                    )
                    if grant or release is not None or len(live) != len(entries):
                        conn.execute(
                            t.update()
                            .where(t.c.principal == principal)
                            .values(log=json.dumps(live, separators=(",", ":")))
                        )
                return grant, retry, tag
            except sa.exc.IntegrityError:
                pass  # another process inserted the principal's row first
            except sa.exc.DBAPIError as exc:
                if not lock_conflict(exc) or self.engine.dialect.name == "sqlite":
                    raise
            time.sleep(random.uniform(0.001, 0.01) * min(attempt + 1, 10))  # noqa: S311
        raise BudgetStoreUnavailable(
            f"the decrypt budget's store ({self.name}) kept losing the race for a principal's row"
        )

    def clear(self, principal: str | None = None) -> None:
        """Forget the reservations (of ``principal``, or everyone's): an operator's reset."""
        t = self.table
        with self.engine.begin() as conn:
            q = t.delete()
            if principal is not None:
                q = q.where(t.c.principal == principal)
            conn.execute(q)


def budget_table(metadata: sa.MetaData, name: str = BUDGET_TABLE) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("principal", sa.String(255), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False, default=0),
        # JSON [[store time, reads, tag], ...]: the reservations of the last window + lease.
        sa.Column("log", sa.Text, nullable=False),
    )


def _now_sql(dialect: str) -> sa.ColumnElement[Any]:
    """The database's clock as POSIX seconds (the store's clock of the guarantee)."""
    if dialect == "postgresql":
        return sa.literal_column("extract(epoch from clock_timestamp())::float8")
    if dialect in ("mysql", "mariadb"):
        return sa.literal_column("UNIX_TIMESTAMP(NOW(6))")
    if dialect == "sqlite":
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)")
    raise ConfigurationError(f"the decrypt budget has no SQL store for {dialect}")


# KEYS[1]: the principal's sorted set. ARGV: need, want, limit, span, force,
# now (empty: Redis' TIME), the new reservation's tag, the tag and reads
# released (empty: none). Members are "<reads>:<tag>".
_LUA = """
local now
if ARGV[6] ~= '' then
  now = tonumber(ARGV[6])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local need, want, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local span = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.6f', now - span))
local items = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local used, oldest = 0, nil
for i = 1, #items, 2 do
  local n, tag = string.match(items[i], '^(%d+):(.*)$')
  n = tonumber(n)
  local s = tonumber(items[i + 1])
  if ARGV[8] ~= '' and tag == ARGV[8] then
    redis.call('ZREM', KEYS[1], items[i])
    n = math.max(0, n - tonumber(ARGV[9]))
    if n > 0 then redis.call('ZADD', KEYS[1], items[i + 1], n .. ':' .. tag) end
  end
  if n > 0 then
    used = used + n
    if oldest == nil or s < oldest then oldest = s end
  end
end
local room = limit - used
local grant = 0
if ARGV[5] == '1' then
  grant = want
elseif room >= need then
  grant = math.min(want, room)
end
if grant > 0 then
  redis.call('ZADD', KEYS[1], string.format('%.6f', now), grant .. ':' .. ARGV[7])
  redis.call('PEXPIRE', KEYS[1], math.ceil(span * 1000) + 1000)
  return {grant, '0'}
end
if oldest == nil then oldest = now end
return {0, string.format('%.6f', math.max(0, oldest + span - now))}
"""


class RedisBudgetStore:
    """The reservations in Redis: ``redis://host:port/db`` (one sorted set per principal)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "carnet:budget:",
        timeout: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        try:
            import redis
        except ImportError:
            raise ConfigurationError(
                "a Redis budget store needs the redis package: pip install 'carnet[redis]'"
            ) from None
        self._redis = redis
        try:
            self.client = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        except ValueError:
            raise ConfigurationError("bad Redis URL (expected redis://host:port/db)") from None
        self.prefix = prefix
        self._clock = clock
        kw = self.client.connection_pool.connection_kwargs
        self.name = f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
        self._script = self.client.register_script(_LUA)

    def __repr__(self) -> str:
        return f"<RedisBudgetStore {self.name}>"

    def reserve(
        self,
        principal: str,
        need: int,
        want: int,
        limit: int,
        span: float,
        force: bool = False,
        release: tuple[str, int] | None = None,
    ) -> tuple[int, float, str]:
        tag = _new_tag()
        now = "" if self._clock is None else f"{self._clock():.6f}"
        rtag, rn = release if release is not None else ("", 0)
        failure: BudgetStoreUnavailable
        try:
            grant, retry = self._script(
                keys=[self.prefix + principal],
                args=[
                    need,
                    want,
                    limit,
                    repr(float(span)),
                    "1" if force else "0",
                    now,
                    tag,
                    rtag,
                    rn,
                ],
            )
            return int(grant), float(retry), tag
        except self._redis.exceptions.RedisError as exc:
            failure = BudgetStoreUnavailable(
                f"the decrypt budget's store ({self.name}) is unavailable: {type(exc).__name__}"
            )
        raise failure

    def clear(self, principal: str | None = None) -> None:
        if principal is not None:
            self.client.delete(self.prefix + principal)
            return
        for key in self.client.scan_iter(match=self.prefix + "*"):
            self.client.delete(key)


def _new_tag() -> str:
    # Unique across processes and hosts: names one reservation in the log.
    return os.urandom(8).hex()


def open_store(store: str | sa.Engine | BudgetStore, *, timeout: float) -> BudgetStore:
    """A store from a URL (``redis://``, ``rediss://``, or SQLAlchemy's), an Engine, or a store."""
    if isinstance(store, str):
        if store.startswith(("redis://", "rediss://", "unix://")):
            return RedisBudgetStore(store, timeout=timeout)
        return SQLBudgetStore(store, timeout=timeout)
    if isinstance(store, sa.Engine):
        return SQLBudgetStore(store, timeout=timeout)
    return store


class _Lease:
    __slots__ = ("expires", "left", "tag")

    def __init__(self, left: int, expires: float, tag: str) -> None:
        self.left = left
        self.expires = expires
        self.tag = tag


class SharedBudget:
    """The per-process half of a shared budget: leases of blocks reserved in the store.

    ``fallback``: the per-process budget charged in ``best_effort`` mode while
    the store cannot be reached (None in ``required`` mode).
    """

    def __init__(
        self,
        store: BudgetStore,
        limit: int,
        window: float,
        *,
        block: int,
        lease: float,
        mode: str,
        clock: Clock,
        fallback: Callable[[str, int], None] | None,
    ) -> None:
        if mode not in MODES:
            raise ConfigurationError(f"budget mode must be one of {', '.join(MODES)}")
        if block < 1 or not lease > 0:
            raise ConfigurationError("a shared decrypt budget needs block >= 1 and lease > 0")
        self.store = store
        self.limit = limit
        self.window = window
        self.block = block
        self.lease = lease
        self.span = window + lease
        self.mode = mode
        self._clock = clock
        self._fallback = fallback
        self._leases: dict[str, _Lease] = {}
        self._refused: dict[str, float] = {}
        # Reads disclosed on the per-process budget while the store was down,
        # recorded in the store (forced) when it answers again.
        self._debt: dict[str, int] = {}
        self._down_until = -math.inf
        self._down = False
        self._lock = threading.Lock()
        self._reserve_lock = threading.Lock()
        self.reservations = 0
        self.store_failures = 0
        self.fallback_reads = 0

    def charge(self, principal: str, n: int) -> None:
        if self._take(principal, n):
            return
        with self._reserve_lock:
            if self._take(principal, n):  # another thread reserved meanwhile
                return
            self._reserve(principal, n)

    def stop(self, principal: str) -> None:
        """A whole window's reads reserved at once: the principal is refused everywhere
        until it ages out. Its block in hand is dropped."""
        with self._lock:
            self._leases.pop(principal, None)
            self._refused[principal] = self._clock() + self.span
        try:
            self.store.reserve(principal, 0, self.limit, self.limit, self.span, force=True)
        except BudgetStoreUnavailable as exc:
            log.error("carnet: could not stop %r in the shared budget: %s", principal, exc)

    def _take(self, principal: str, n: int) -> bool:
        now = self._clock()
        with self._lock:
            lease = self._leases.get(principal)
            if lease is not None and lease.left >= n and lease.expires > now:
                lease.left -= n
                return True
            until = self._refused.get(principal)
            if until is not None:
                if until > now:
                    self._refuse(principal, n, until - now)
                del self._refused[principal]
        return False

    def _refuse(self, principal: str, n: int, wait: float) -> None:
        raise DecryptBudgetExceeded(
            f"principal {principal!r} exceeded its decrypt budget of {self.limit} "
            f"per {self.window:g}s (shared; {wait:.1f}s until reads free up)"
        )

    def _reserve(self, principal: str, n: int) -> None:
        t0 = self._clock()
        if t0 < self._down_until:
            self._store_down(principal, n, None)
            return
        with self._lock:
            # The previous block is dropped before the request leaves: what it
            # has left is given back, and can never be used after.
            old = self._leases.pop(principal, None)
        release = (old.tag, old.left) if old is not None and old.left > 0 else None
        try:
            self._pay_debt()
            grant, retry, tag = self.store.reserve(
                principal, n, max(self.block, n), self.limit, self.span, release=release
            )
        except BudgetStoreUnavailable as exc:
            self.store_failures += 1
            self._down_until = self._clock() + RETRY_DOWN
            self._store_down(principal, n, exc)
            return
        if self._down:
            self._down = False
            log.warning("carnet: the decrypt budget's store answers again (%s)", self.store.name)
        self.reservations += 1
        with self._lock:
            if grant >= n:
                # Measured from before the request left: the block dies here
                # before the store stops counting it.
                self._leases[principal] = _Lease(grant - n, t0 + self.lease, tag)
                return
            self._refused[principal] = t0 + min(retry, self.span)
        log.warning(
            "carnet: decrypt budget exceeded by %r: %d more would pass %d in %gs (shared)",
            principal,
            n,
            self.limit,
            self.window,
        )
        self._refuse(principal, n, retry)

    def _store_down(self, principal: str, n: int, exc: BudgetStoreUnavailable | None) -> None:
        if self._fallback is None:
            if exc is not None:
                log.error("carnet: %s; a read was refused (required mode)", exc)
                raise exc
            raise BudgetStoreUnavailable(
                f"the decrypt budget's store ({self.store.name}) is unavailable "
                "(failed less than a second ago); a read was refused (required mode)"
            )
        if not self._down:
            self._down = True
            log.error(
                "carnet: %s; falling back to the per-process budget (best_effort mode)",
                exc if exc is not None else self.store.name,
            )
        self._fallback(principal, n)
        with self._lock:
            self._debt[principal] = self._debt.get(principal, 0) + n
            self.fallback_reads += n

    def _pay_debt(self) -> None:
        with self._lock:
            debt, self._debt = self._debt, {}
        try:
            for principal, n in list(debt.items()):
                self.store.reserve(principal, 0, n, self.limit, self.span, force=True)
                del debt[principal]
        finally:
            if debt:
                with self._lock:
                    for p, n in debt.items():
                        self._debt[p] = self._debt.get(p, 0) + n
