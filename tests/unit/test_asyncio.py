"""carnet with asyncio: AsyncEngine, AsyncSession and AsyncConnection on real async drivers.

aiosqlite, asyncpg and psycopg (async) on PostgreSQL, aiomysql on MariaDB. The
KeyManager takes the AsyncEngine itself; master-key calls made inside
SQLAlchemy's greenlets run in a worker thread, so the event loop keeps
serving other tasks while a cold practice's key is unwrapped (KMS through
moto's server over HTTP).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

import carnet
from carnet.errors import TenantMismatch
from support.kms_server import FaultProxy
from support.models import Base, Note, comments, core_metadata

ASYNC_DRIVERS = {
    "sqlite": ["sqlite+aiosqlite"],
    "postgresql": ["postgresql+asyncpg", "postgresql+psycopg"],
    "mariadb": ["mysql+asyncmy"],
}


def _async_urls(db_kind: str, db_url: str) -> list[str]:
    url = sa.engine.make_url(db_url)
    out = []
    for driver in ASYNC_DRIVERS[db_kind]:
        u = url.set(drivername=driver)
        if driver == "mysql+asyncmy":
            u = u.difference_update_query(["charset"]).update_query_dict({"charset": "utf8mb4"})
        out.append(u.render_as_string(hide_password=False))
    return out


async def _setup(engine: AsyncEngine, keys: carnet.KeyManager) -> None:
    await keys.create_schema_async()
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.run_sync(core_metadata.create_all)


def _run(db_kind: str, db_url: str, master_key_uri: str, scenario: Callable[..., object]) -> None:
    for url in _async_urls(db_kind, db_url):
        engine = create_async_engine(url)
        keys = carnet.KeyManager(engine, master_key=master_key_uri)
        carnet.configure(keys)

        async def main(engine: AsyncEngine = engine, keys: carnet.KeyManager = keys) -> None:
            try:
                await _setup(engine, keys)
                await scenario(engine, keys)  # type: ignore[misc]
                async with engine.begin() as conn:
                    await conn.execute(Note.__table__.delete())
                    await conn.execute(comments.delete())
            finally:
                await keys.aclose()
                await engine.dispose()

        try:
            asyncio.run(main())
        finally:
            carnet.configure(None)
            keys.close()


def test_async_orm_and_core_round_trip(db_kind: str, db_url: str, master_key_uri: str) -> None:
    async def scenario(engine: AsyncEngine, keys: carnet.KeyManager) -> None:
        async with AsyncSession(engine) as s:
            s.add_all(
                [
                    Note(id=1, practice_id="p1", body="un", summary="u"),
                    Note(id=2, practice_id="p2", body="deux"),
                ]
            )
            await s.commit()
        async with AsyncSession(engine) as s:
            got = {n.id: (n.practice_id, n.body) for n in (await s.scalars(sa.select(Note))).all()}
        assert got == {1: ("p1", "un"), 2: ("p2", "deux")}
        async with AsyncSession(engine) as s:
            n = await s.get(Note, 1)
            assert n is not None
            n.practice_id = "p2"  # moved: re-sealed inside the async flush
            await s.commit()
        with carnet.tenant_scope("p2"):
            async with engine.begin() as conn:
                await conn.execute(comments.insert(), [{"id": 1, "text": "commentaire"}])
                rows = (await conn.execute(sa.select(comments.c.text))).scalars().all()
            assert rows == ["commentaire"]
            async with AsyncSession(engine) as s:
                n = await s.get(Note, 1)
                assert n is not None and (n.body, n.summary) == ("un", "u")
        with carnet.tenant_scope("p1"):
            async with AsyncSession(engine) as s:
                with pytest.raises(TenantMismatch):
                    await s.get(Note, 2)
        # Key management from async code: a worker thread, through the synchronous twin.
        before = max(r.version for r in await asyncio.to_thread(keys.list_keys, "p1"))
        rec = await asyncio.to_thread(keys.rotate, "p1")
        assert rec.version == before + 1
        assert {r.tenant for r in await asyncio.to_thread(keys.list_keys)} == {"p1", "p2"}

    _run(db_kind, db_url, master_key_uri, scenario)


def test_concurrent_tasks_keep_their_scopes_apart(
    db_kind: str, db_url: str, master_key_uri: str
) -> None:
    practices = [f"cab-{i}" for i in range(8)]

    async def one(engine: AsyncEngine, practice: str, n: int) -> list[str]:
        with carnet.tenant_scope(practice):
            async with AsyncSession(engine) as s:
                s.add(Note(id=n, practice_id=practice, body=f"note de {practice} #{n}"))
                await s.commit()
            await asyncio.sleep(0)  # let the other tasks run in between
            async with AsyncSession(engine) as s:
                notes = (await s.scalars(sa.select(Note).where(Note.practice_id == practice))).all()
                return [x.body or "" for x in notes]

    async def scenario(engine: AsyncEngine, keys: carnet.KeyManager) -> None:
        results = await asyncio.gather(
            *(one(engine, practices[i % len(practices)], i + 1) for i in range(40))
        )
        for i, bodies in enumerate(results):
            practice = practices[i % len(practices)]
            assert bodies and all(b.startswith(f"note de {practice} #") for b in bodies)

    _run(db_kind, db_url, master_key_uri, scenario)


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_aiosqlite_key_table_in_the_same_file_does_not_deadlock(
    db_kind: str, tmp_path: Path, master_key_uri: str
) -> None:
    path = tmp_path / "clinic.db"
    url = f"sqlite+aiosqlite:///{path}"

    async def main() -> float:
        engine = create_async_engine(url)
        keys = carnet.KeyManager(engine, master_key=master_key_uri)
        carnet.configure(keys)
        try:
            await _setup(engine, keys)
            t0 = time.monotonic()
            async with AsyncSession(engine) as s:
                s.add(Note(id=1, practice_id="first", body="un"))
                await s.flush()  # holds the write lock from here on
                s.add(Note(id=2, practice_id="second", body="deux"))
                s.add(Note(id=3, practice_id="third", body="trois"))
                await s.commit()
            took = time.monotonic() - t0
            keys.clear_cache()
            async with AsyncSession(engine) as s:
                bodies = sorted(n.body or "" for n in (await s.scalars(sa.select(Note))).all())
            assert bodies == ["deux", "trois", "un"]
            return took
        finally:
            carnet.configure(None)
            await keys.aclose()
            await engine.dispose()

    assert asyncio.run(main()) < 2.0  # SQLite's busy timeout is 5 s: no wait on ourselves


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_cold_kms_unwraps_do_not_stall_the_event_loop(
    db_kind: str,
    db_url: str,
    master_key_uri: str,
    kms_proxy: FaultProxy,
    kms_key_arns: tuple[str, str],
    record_property: Callable[[str, object], None],
) -> None:
    url = _async_urls(db_kind, db_url)[0]
    kms = f"aws-kms://{kms_key_arns[0]}"
    practices = [f"cab-{i:02d}" for i in range(50)]

    async def main() -> float:
        engine = create_async_engine(url)
        keys = carnet.KeyManager(engine, master_key=kms)
        carnet.configure(keys)
        try:
            await _setup(engine, keys)
            async with AsyncSession(engine) as s:
                s.add_all(
                    Note(id=i + 1, practice_id=p, body=f"note {p}") for i, p in enumerate(practices)
                )
                await s.commit()
            keys.clear_cache()
            # A KMS 60 ms away: an unwrap run on the loop would stall it that long.
            kms_proxy.fault = lambda n, target: (
                ("slow", 0.06) if target.endswith(".Decrypt") else None
            )
            stalls: list[float] = []
            done = asyncio.Event()

            async def ticker() -> None:
                last = time.monotonic()
                while not done.is_set():
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    stalls.append(now - last - 0.005)
                    last = now

            # What is measured is a master-key call on the loop, not the
            # interpreter's own pauses: late in a long test run (a large heap) a
            # full garbage collection can stall any loop for most of a second,
            # as one CI run saw (0.8 s).
            gc.collect()
            gc.disable()
            try:
                tick = asyncio.create_task(ticker())
                await asyncio.sleep(0.02)
                async with AsyncSession(engine) as s:
                    notes = (await s.scalars(sa.select(Note))).all()
                done.set()
                await tick
            finally:
                gc.enable()
            assert sorted(n.body or "" for n in notes) == sorted(f"note {p}" for p in practices)
            assert keys.stats()["master_unwraps"] == 50
            return max(stalls)
        finally:
            carnet.configure(None)
            await keys.aclose()
            await engine.dispose()

    longest = asyncio.run(main())
    record_property("longest_loop_stall_ms", round(longest * 1000, 1))
    print(
        f"\nlongest event-loop stall while unwrapping 50 keys through KMS: {longest * 1000:.1f} ms"
    )
    assert longest < 0.050
