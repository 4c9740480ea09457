"""Engines for the key table: URLs, async engines and their synchronous twins.

An async engine's key-table statements run through its sync facade inside
SQLAlchemy's greenlets (an AsyncSession flush or load), and through a
synchronous twin on the same database elsewhere (key management from
ordinary code, a thread). Also :func:`off_loop`, which keeps a blocking
master-key call off the event loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

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


def engine_from_url(url: str) -> sa.Engine | AsyncEngine:
    try:
        parsed = sa.engine.make_url(url)
        if parsed.get_dialect().is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            return create_async_engine(parsed)
        return sa.create_engine(parsed)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigurationError(f"bad database URL: {exc}") from None


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
            bind = engine_from_url(bind)
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


def safe_url(engine: sa.Engine) -> str:
    """The engine's URL as it may be printed: without its password."""
    return engine.url.render_as_string(hide_password=True)
