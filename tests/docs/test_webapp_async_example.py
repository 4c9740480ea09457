"""examples/webapp/fastapi_async_app.py on a real AsyncEngine (asyncpg on PostgreSQL, aiosqlite,
asyncmy on MariaDB), through httpx's ASGI transport on one event loop: the round trip, the
refusals, strict mode failing closed, and concurrent requests of two practices held inside
the database together, each answered with its own practice's notes only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.util import await_only

import carnet
from support.paths import ROOT

sys.path.insert(0, str(ROOT / "examples"))

from webapp import fastapi_async_app  # noqa: E402
from webapp.models import Note  # noqa: E402

SECRET = "PLANTED-async-webapp-idees-suicidaires-31"
LYON, NANTES = "cabinet-lyon-3", "cabinet-nantes-1"
MARTIN = {"Authorization": "Bearer token-martin"}  # dr.martin, cabinet-lyon-3
PETIT = {"Authorization": "Bearer token-petit"}  # dr.petit, cabinet-nantes-1
ASYNC_DRIVER = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}


def _async_url(db_kind: str, db_url: str) -> str:
    url = sa.engine.make_url(db_url)
    if db_kind == "mariadb":
        url = url.set(drivername="mysql+asyncmy").difference_update_query(["charset"])
        url = url.update_query_dict({"charset": "utf8mb4"})
    else:
        url = url.set(drivername=ASYNC_DRIVER[db_kind])
    return url.render_as_string(hide_password=False)


Scenario = Callable[[AsyncEngine, carnet.KeyManager, httpx.AsyncClient], Awaitable[None]]


def run(db_kind: str, db_url: str, master_key_uri: str, scenario: Scenario) -> None:
    """The app on its AsyncEngine, a client on the same loop; carnet's defaults restored."""
    engine = create_async_engine(_async_url(db_kind, db_url), hide_parameters=True)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)

    async def main() -> None:
        try:
            await fastapi_async_app.create_tables(engine, keys)
            app = fastapi_async_app.create_app(engine, keys)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                await scenario(engine, keys, client)
        finally:
            await keys.aclose()
            await engine.dispose()

    try:
        asyncio.run(main())
    finally:
        keys.require_scope = False
        keys.decrypt_hook = None
        carnet.configure(None)
        keys.close()


async def seed(engine: AsyncEngine, practice: str, patient: str, bodies: list[str]) -> list[int]:
    with carnet.tenant_scope(practice):
        async with AsyncSession(engine) as s:
            rows = [Note(practice_id=practice, patient_id=patient, body=b) for b in bodies]
            s.add_all(rows)
            await s.flush()
            ids = [r.id for r in rows]
            await s.commit()
    return ids


async def stored(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list(await conn.execute(sa.text("SELECT practice_id, body FROM consultation_notes")))


def test_round_trip_and_refusals(
    db_kind: str, db_url: str, master_key_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario(engine: AsyncEngine, keys: carnet.KeyManager, c: httpx.AsyncClient) -> None:
        assert keys.require_scope  # create_app turned strict mode on
        r = await c.post("/patients/pat-1/notes", json={"body": SECRET}, headers=MARTIN)
        assert r.status_code == 201, r.text
        nid = r.json()["id"]
        assert SECRET not in r.text
        r = await c.get(f"/notes/{nid}", headers=MARTIN)
        assert r.json() == {"id": nid, "patient_id": "pat-1", "body": SECRET}
        ((practice, raw),) = await stored(engine)
        assert practice == LYON and SECRET.encode() not in bytes(raw)
        # Another practice: refused, naming nothing.
        r = await c.get(f"/notes/{nid}", headers=PETIT)
        assert r.status_code == 403 and SECRET not in r.text and LYON not in r.text
        assert (await c.get("/patients/pat-1/notes", headers=PETIT)).json() == {"notes": []}
        # No credential.
        r = await c.get(f"/notes/{nid}")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        # The submitted note is never echoed by a 422.
        r = await c.post("/patients/pat-1/notes", json={"body": [SECRET]}, headers=MARTIN)
        assert r.status_code == 422 and SECRET not in r.text

    run(db_kind, db_url, master_key_uri, scenario)
    assert SECRET not in caplog.text


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_strict_mode_refuses_a_request_whose_scope_is_lost(
    db_kind: str,
    db_url: str,
    master_key_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario(engine: AsyncEngine, keys: carnet.KeyManager, c: httpx.AsyncClient) -> None:
        (nid,) = await seed(engine, LYON, "pat-1", [SECRET])
        # The app's scope becomes a no-op (a scope entered where the endpoint does
        # not run): strict mode refuses instead of answering.
        with monkeypatch.context() as m:
            m.setattr(carnet, "tenant_scope", lambda practice: contextlib.nullcontext(practice))
            for r in (
                await c.get(f"/notes/{nid}", headers=MARTIN),
                await c.get("/patients/pat-1/notes", headers=MARTIN),
                await c.post("/patients/pat-1/notes", json={"body": "x"}, headers=MARTIN),
            ):
                assert r.status_code == 500, r.text
                assert SECRET not in r.text
        assert len(await stored(engine)) == 1

    run(db_kind, db_url, master_key_uri, scenario)
    assert "TenantRequired" in caplog.text and SECRET not in caplog.text


class Gate:
    """An asyncio barrier (asyncio.Barrier is Python 3.11+): opens when ``n`` have arrived."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.open = asyncio.Event()

    async def wait(self) -> None:
        self.arrived += 1
        if self.arrived >= self.n:
            self.open.set()
        await asyncio.wait_for(self.open.wait(), timeout=30)


REQUESTS = 40  # half per practice
HELD = 4  # per practice, held inside the database together


def test_concurrent_requests_of_two_practices(
    db_kind: str, db_url: str, master_key_uri: str
) -> None:
    def notes_of(practice: str) -> list[str]:
        return [f"{SECRET} {practice} {i}" for i in range(3)]

    async def scenario(engine: AsyncEngine, keys: carnet.KeyManager, c: httpx.AsyncClient) -> None:
        # The same patient id in both practices.
        await seed(engine, LYON, "pat-7", notes_of(LYON))
        await seed(engine, NANTES, "pat-7", notes_of(NANTES))
        for headers in (MARTIN, PETIT):  # data keys cached before the gate holds connections
            assert (await c.get("/patients/pat-7/notes", headers=headers)).status_code == 200

        gate = Gate(2 * HELD)
        seen = {LYON: 0, NANTES: 0}

        def hold(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
            # Runs inside SQLAlchemy's greenlet: await_only waits on the loop, and the
            # other requests go on meanwhile, up to the gate, in their own scopes.
            if "consultation_notes" not in statement:
                return
            for practice in seen:
                if practice in repr(params):
                    seen[practice] += 1
                    if seen[practice] <= HELD:
                        await_only(gate.wait())
                    return

        async def one(practice: str) -> tuple[str, int, str]:
            r = await c.get("/patients/pat-7/notes", headers=MARTIN if practice == LYON else PETIT)
            return practice, r.status_code, r.text

        event.listen(engine.sync_engine, "before_cursor_execute", hold)
        try:
            replies = await asyncio.gather(*(one(p) for p in [LYON, NANTES] * (REQUESTS // 2)))
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", hold)
        assert gate.open.is_set() and seen == {LYON: REQUESTS // 2, NANTES: REQUESTS // 2}
        for practice, status, text in replies:
            other = NANTES if practice == LYON else LYON
            assert status == 200, text
            assert [n["body"] for n in json.loads(text)["notes"]] == notes_of(practice)
            assert other not in text
        assert carnet.current_tenant() is None

    run(db_kind, db_url, master_key_uri, scenario)


def test_demo_app_serves_a_round_trip(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # The factory the README hands to uvicorn, in ./webapp-demo of the working directory.
    monkeypatch.chdir(tmp_path)
    app = fastapi_async_app.demo_app()
    keys = carnet.get_manager()

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.post("/patients/pat-1/notes", json={"body": SECRET}, headers=MARTIN)
            nid = r.json()["id"]
            assert (await c.get(f"/notes/{nid}", headers=MARTIN)).json()["body"] == SECRET
        await keys.aclose()
        assert keys.async_engine is not None
        await keys.async_engine.dispose()

    try:
        asyncio.run(main())
        assert SECRET.encode() not in (tmp_path / "webapp-demo" / "notes.db").read_bytes()
    finally:
        keys.require_scope = False
        keys.decrypt_hook = None
        carnet.configure(None)
        keys.close()
