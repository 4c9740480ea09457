"""Engines: carnet's one engine factory, and the key table's engines.

:func:`make_engine` turns a database URL into an engine for every caller (the
command line, the batch engine and its worker processes, a ``KeyManager``
given a URL); on SQLite it can tell when a statement waits for a lock.

An async engine's key-table statements run through its sync facade inside
SQLAlchemy's greenlets (an AsyncSession flush or load), and through a
synchronous twin on the same database elsewhere (key management from
ordinary code, a thread). Also :func:`off_loop`, which keeps a blocking
master-key call off the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import sqlalchemy as sa

from .errors import ConfigurationError

if TYPE_CHECKING:
    # Only for annotations: the asyncio extension needs greenlet, an optional extra.
    from sqlalchemy.ext.asyncio import AsyncEngine

_T = TypeVar("_T")

# Async drivers and the synchronous driver of the same database, for the twin engine.
SYNC_DRIVERS = {
    "aiosqlite": "pysqlite",
    "asyncpg": "psycopg",
    "psycopg_async": "psycopg",
    "psycopg": "psycopg",
    "aiomysql": "pymysql",
    "asyncmy": "pymysql",
}


SQLITE_LOCK_TIMEOUT = 30.0  # seconds a batch engine waits for another connection's SQLite lock


@overload
def make_engine(
    url: str,
    *,
    batch: bool = ...,
    lock_notice: Callable[[str], None] | None = ...,
    allow_async: Literal[False] = ...,
    timeout: float | None = ...,
    store: str | None = ...,
) -> sa.Engine: ...


@overload
def make_engine(
    url: str,
    *,
    batch: bool = ...,
    lock_notice: Callable[[str], None] | None = ...,
    allow_async: bool,
    timeout: float | None = ...,
    store: str | None = ...,
) -> sa.Engine | AsyncEngine: ...


def make_engine(
    url: str,
    *,
    batch: bool = True,
    lock_notice: Callable[[str], None] | None = None,
    allow_async: bool = False,
    timeout: float | None = None,
    store: str | None = None,
) -> sa.Engine | AsyncEngine:
    """carnet's one engine factory: a database URL to an engine.

    ``batch`` (the command line, the batch engine, a worker process): time-outs
    suited to work next to a live application, and ``hide_parameters``, so a
    failed statement never prints its parameters (a note it compared against,
    during a re-encryption or a migration). Without it (a ``KeyManager`` given
    a URL), SQLAlchemy's defaults. ``lock_notice`` is told (on SQLite) when a
    statement waits for another connection's lock, and when it gets it, so a
    wait is never silent. ``allow_async``: an async driver's URL gives an
    :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.

    ``store`` names a store that writes beside the application on a connection
    of its own (``"audit store"``, ``"budget store"``): its errors name it, an
    in-memory SQLite URL is refused (another connection would see another,
    empty database), connections are checked before use (``pool_pre_ping``),
    and ``timeout`` (seconds) bounds both SQLite's lock wait and a server's
    connection, instead of the batch defaults.

    A bad URL or a missing driver is a :class:`ConfigurationError`; the engine
    connects lazily, so an unreachable server shows at first use.
    """
    what = store or "database"
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigurationError(
            f"bad {what} URL (expected e.g. postgresql+psycopg://...)"
        ) from None
    backend = parsed.get_backend_name()
    if store is not None and backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise ConfigurationError(
            f"the {store} needs a connection of its own: an in-memory SQLite database "
            "has none; give it a file (or another database) by URL"
        )
    options: dict[str, Any] = {}
    if batch or store is not None:
        connect_args: dict[str, Any] = {}
        if backend == "sqlite":
            # SQLite has one writer: wait for the application's write to finish
            # instead of failing the batch at once.
            connect_args["timeout"] = SQLITE_LOCK_TIMEOUT if timeout is None else timeout
        elif backend in ("postgresql", "mysql", "mariadb"):
            connect_args["connect_timeout"] = 10 if timeout is None else max(1, int(timeout))
        options = {"connect_args": connect_args, "hide_parameters": True}
        if store is not None:
            options["pool_pre_ping"] = True
    try:
        if allow_async and parsed.get_dialect().is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            return create_async_engine(parsed, **options)
        engine = sa.create_engine(parsed, **options)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        if store is not None:
            # The URL may carry a password: the error's kind only.
            raise ConfigurationError(f"bad {store} URL: {type(exc).__name__}") from None
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


def is_async_engine(bind: Any) -> bool:
    return hasattr(bind, "sync_engine")


def sync_url(url: sa.URL) -> sa.URL:
    backend, driver = url.get_backend_name(), url.get_driver_name()
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigurationError(
            "an in-memory aiosqlite database cannot be shared with carnet's synchronous key "
            "operations: use a database file"
        )
    sync = SYNC_DRIVERS.get(driver)
    if sync is None:
        raise ConfigurationError(
            f"no synchronous driver known for {backend}+{driver}: give KeyManager a "
            "synchronous engine on the same database for key management"
        )
    return url.set(drivername=f"{backend}+{sync}")


def in_greenlet() -> bool:
    try:
        from sqlalchemy.util.concurrency import in_greenlet as _in
    except ImportError:  # pragma: no cover - SQLAlchemy without its asyncio extra
        return False
    try:
        return bool(_in())
    except ImportError:  # greenlet not installed: nothing async runs
        return False


def off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """Call a master-key provider (KMS, HSM: blocking I/O, retries with sleeps).

    Inside SQLAlchemy's greenlets the event loop is waiting on us: run the call
    in a worker thread and let the loop go on meanwhile.
    """
    if in_greenlet():
        import asyncio

        from sqlalchemy.util import await_only

        return await_only(asyncio.to_thread(fn, *args))
    return fn(*args)


def log_debug_enabled() -> bool:
    return logging.getLogger("sqlalchemy.engine").isEnabledFor(logging.DEBUG)


class KeyEngines:
    """The engine of the key table as the calling code can use it.

    ``bind`` is an Engine, an AsyncEngine or a database URL. For a synchronous
    engine :meth:`current` is that engine; for an async one, its sync facade
    inside SQLAlchemy's greenlets (on a small pool of its own) and a
    synchronous twin on the same database elsewhere, each created on first use.
    """

    def __init__(self, bind: sa.Engine | AsyncEngine | str) -> None:
        if isinstance(bind, str):
            bind = make_engine(bind, batch=False, allow_async=True)
        self.async_engine: AsyncEngine | None = None
        if is_async_engine(bind):
            self.async_engine = bind  # type: ignore[assignment]
            bind = bind.sync_engine  # type: ignore[union-attr]
        # The engine given (an async engine's sync facade): its URL names the database.
        self.primary: sa.Engine = bind  # type: ignore[assignment]
        self._twin: sa.Engine | None = None
        self._key_async: AsyncEngine | None = None

    def current(self) -> sa.Engine:
        if self.async_engine is None:
            return self.primary
        if in_greenlet():
            # A pool of its own: the application's tasks may hold every
            # connection of theirs while their flushes wait for a first key.
            if self._key_async is None:
                from sqlalchemy.ext.asyncio import create_async_engine

                self._key_async = create_async_engine(self.primary.url, pool_size=2, max_overflow=8)
            return self._key_async.sync_engine
        if self._twin is None:
            self._twin = sa.create_engine(sync_url(self.primary.url))
        return self._twin

    def shares_sqlite_database(self, bind: sa.Engine | sa.Connection) -> bool:
        """Whether ``bind`` is SQLite on the very database of the key table."""
        if bind.dialect.name != "sqlite":
            return False
        # By database file, not URL text: sqlite+aiosqlite:///f and sqlite:///f
        # are the same database, and so is the async engine's sync facade.
        theirs, ours = bind.engine.url.database, self.primary.url.database
        if not theirs or theirs == ":memory:" or not ours or ours == ":memory:":
            return bind.engine is self.primary
        return os.path.realpath(theirs) == os.path.realpath(ours)

    def close(self) -> None:
        if self._twin is not None:
            self._twin.dispose()
        if self._key_async is not None:
            # Its connections belong to an event loop: drop them without I/O.
            self._key_async.sync_engine.dispose(close=False)

    async def aclose(self) -> None:
        """Also closes the key pool's connections, on the event loop."""
        if self._key_async is not None:
            await self._key_async.dispose()
            self._key_async = None


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


def safe_url(engine: sa.Engine) -> str:
    """The engine's URL as it may be printed: without its password."""
    return engine.url.render_as_string(hide_password=True)
