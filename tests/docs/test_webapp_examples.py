"""The web applications of examples/webapp, through each framework's test client, on every backend.

Both apps take the practice and the principal from the bearer token, run in
strict mode (``require_scope=True``) with a decrypt budget, and answer
carnet's refusals with HTTP statuses that carry no note. Each test plants a
recognisable note and checks it never reaches a response or a log line where
it should not. The last test runs the ``pandas.read_sql`` snippet of
docs/quickstart.md as it is written there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.orm import Session

import carnet
from carnet.audit import DecryptBudget
from support.paths import ROOT

sys.path.insert(0, str(ROOT / "examples"))

from webapp import fastapi_app, flask_app  # noqa: E402
from webapp.models import Note, create_tables  # noqa: E402

SECRET = "PLANTED-webapp-violences-conjugales-58"
LYON, NANTES = "cabinet-lyon-3", "cabinet-nantes-1"
# The demonstration tokens of examples/webapp/common.py.
MARTIN = {"Authorization": "Bearer token-martin"}  # dr.martin, cabinet-lyon-3
BERNARD = {"Authorization": "Bearer token-bernard"}  # dr.bernard, cabinet-lyon-3
PETIT = {"Authorization": "Bearer token-petit"}  # dr.petit, cabinet-nantes-1


@dataclass
class Reply:
    status: int
    text: str
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """One interface over FastAPI's TestClient and Flask's test client."""

    def __init__(self, framework: str, app: Any) -> None:
        self.framework = framework
        self.app = app
        self._c = TestClient(app) if framework == "fastapi" else app.test_client()

    def _reply(self, r: Any) -> Reply:
        text = r.text if self.framework == "fastapi" else r.get_data(as_text=True)
        return Reply(r.status_code, text, r.headers)

    def get(self, url: str, headers: Mapping[str, str] | None = None) -> Reply:
        return self._reply(self._c.get(url, headers=dict(headers or {})))

    def post(self, url: str, body: Any, headers: Mapping[str, str] | None = None) -> Reply:
        return self._reply(self._c.post(url, json=body, headers=dict(headers or {})))


@pytest.fixture
def example_keys(engine: sa.Engine, master_key_uri: str) -> Iterator[carnet.KeyManager]:
    """A KeyManager whose tables the example's own ``create_tables`` made.

    The example's ``create_app`` makes it carnet's default manager, not this fixture.
    """
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    create_tables(engine, keys)
    try:
        yield keys
    finally:
        # create_app configures carnet for the whole process (strict mode, the
        # auditor): undo it so later tests start from carnet's defaults.
        keys.require_scope = False
        keys.decrypt_hook = None
        carnet.configure(None)


@pytest.fixture(params=["fastapi", "flask"])
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_client(
    framework: str, engine: sa.Engine, example_keys: carnet.KeyManager
) -> Callable[..., Client]:
    def make(budget: DecryptBudget | None = None) -> Client:
        module = fastapi_app if framework == "fastapi" else flask_app
        return Client(framework, module.create_app(engine, example_keys, budget=budget))

    return make


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    # The apps' and carnet's loggers, at every level.
    caplog.set_level(logging.DEBUG, logger="webapp")
    caplog.set_level(logging.DEBUG, logger="carnet")
    return caplog


def seed(engine: sa.Engine, practice: str, patient: str, bodies: list[str | None]) -> list[int]:
    """Write notes straight through the ORM (the scope strict mode asks for)."""
    with carnet.tenant_scope(practice), Session(engine) as s:
        rows = [Note(practice_id=practice, patient_id=patient, body=b) for b in bodies]
        s.add_all(rows)
        s.flush()
        ids = [r.id for r in rows]  # before the commit expires them: no decrypt
        s.commit()
        return ids


def stored(engine: sa.Engine) -> list[sa.Row[Any]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text("SELECT id, practice_id, body FROM consultation_notes")))


def test_write_read_round_trip(make_client: Callable[..., Client], engine: sa.Engine) -> None:
    c = make_client()
    created = c.post("/patients/pat-1/notes", {"body": SECRET}, MARTIN)
    assert created.status == 201, created.text
    nid = created.json()["id"]
    assert SECRET not in created.text  # the write answers with the id only

    expected = {"id": nid, "patient_id": "pat-1", "body": SECRET}
    assert c.get(f"/notes/{nid}", MARTIN).json() == expected
    # A colleague of the same practice reads it too: the key is the practice's.
    assert c.get(f"/notes/{nid}", BERNARD).json() == expected
    assert c.get("/patients/pat-1/notes", MARTIN).json() == {"notes": [{"id": nid, "body": SECRET}]}

    # Stored sealed, for the practice of the token (the client never named it).
    ((_, practice, raw),) = stored(engine)
    assert practice == LYON
    assert SECRET.encode() not in bytes(raw)
    with carnet.tenant_scope(LYON), engine.connect() as conn:
        assert conn.scalar(sa.select(Note.__table__.c.body)) == SECRET
    # create_tables left the database checks on the notes table, every one in force.
    from carnet import dbchecks

    with engine.connect() as conn:
        specs = dbchecks.specs_for(Note.__table__, engine.dialect.name)
        assert [s.column for s in specs] == ["body"]
        assert all(dbchecks.missing(conn, s) == [] for s in specs)
        assert dbchecks.mode_installed(conn, specs[0]) == "v2"


def test_another_practice_note_is_refused(
    make_client: Callable[..., Client], engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    c = make_client()
    nid = c.post("/patients/pat-1/notes", {"body": SECRET}, MARTIN).json()["id"]
    (empty,) = seed(engine, LYON, "pat-1", [None])

    for url in (f"/notes/{nid}", f"/notes/{empty}"):
        refused = c.get(url, PETIT)
        assert refused.status == 403, refused.text
        assert SECRET not in refused.text
        assert LYON not in refused.text  # nor whose note it is
    # Listing goes by the caller's practice: the same patient id there has no notes.
    listed = c.get("/patients/pat-1/notes", PETIT)
    assert listed.status == 200 and listed.json() == {"notes": []}
    assert SECRET not in logs.text


def test_no_auth_is_refused(make_client: Callable[..., Client], engine: sa.Engine) -> None:
    c = make_client()
    (nid,) = seed(engine, LYON, "pat-1", [SECRET])
    for headers in (
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "token-martin"},  # no scheme
        {"Authorization": "Basic dG9rZW4tbWFydGlu"},
        {"X-Practice": LYON},  # a practice the client names is not a credential
    ):
        for reply in (
            c.get(f"/notes/{nid}", headers),
            c.get("/patients/pat-1/notes", headers),
            c.post("/patients/pat-1/notes", {"body": "tentative"}, headers),
        ):
            assert reply.status == 401, (headers, reply.text)
            assert reply.headers["WWW-Authenticate"] == "Bearer"
            assert SECRET not in reply.text
    assert len(stored(engine)) == 1  # nothing was written


def test_decrypt_budget_stops_a_bulk_read(
    make_client: Callable[..., Client], engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    c = make_client(budget=DecryptBudget(limit=10, window=3600))
    ids = seed(engine, LYON, "pat-bulk", [f"{SECRET} {i}" for i in range(12)])

    assert c.get(f"/notes/{ids[0]}", MARTIN).status == 200  # 1 of 10
    bulk = c.get("/patients/pat-bulk/notes", MARTIN)  # 12 more
    assert bulk.status == 429, bulk.text
    assert bulk.headers["Retry-After"] == "3600"
    assert SECRET not in bulk.text
    # The window is spent for this principal, for single reads too...
    assert c.get(f"/notes/{ids[1]}", MARTIN).status == 429
    # ...and only for them: budgets are per principal, not per practice.
    assert c.get(f"/notes/{ids[1]}", BERNARD).json()["body"] == f"{SECRET} 1"
    assert "decrypt budget exceeded by 'dr.martin'" in logs.text
    assert SECRET not in logs.text


def test_strict_mode_refuses_a_request_whose_scope_is_lost(
    make_client: Callable[..., Client],
    engine: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    logs: pytest.LogCaptureFixture,
) -> None:
    c = make_client()
    (nid,) = seed(engine, LYON, "pat-1", [SECRET])
    # The apps' scope becomes a no-op, as when a scope is entered in a context
    # the endpoint does not run in: strict mode must refuse, not answer.
    monkeypatch.setattr(carnet, "tenant_scope", lambda practice: contextlib.nullcontext(practice))

    for reply in (
        c.get(f"/notes/{nid}", MARTIN),
        c.get("/patients/pat-1/notes", MARTIN),
        c.post("/patients/pat-1/notes", {"body": f"{SECRET} bis"}, MARTIN),
    ):
        assert reply.status == 500, reply.text
        assert SECRET not in reply.text
    assert len(stored(engine)) == 1
    assert "TenantRequired" in logs.text and SECRET not in logs.text


def test_invalid_payload_is_not_echoed(
    make_client: Callable[..., Client], engine: sa.Engine
) -> None:
    c = make_client()
    # FastAPI's default 422 repeats the input: here the input is a note.
    for payload in ({"text": SECRET}, {"body": [SECRET]}, {"body": ""}, [SECRET]):
        reply = c.post("/patients/pat-1/notes", payload, MARTIN)
        assert reply.status == 422, reply.text
        assert SECRET not in reply.text
    assert stored(engine) == []


# -- concurrent requests of two practices --------------------------------------------


def _notes_of(practice: str) -> list[str]:
    return [f"{practice} note {i}" for i in range(3)]


@contextlib.contextmanager
def overlapping(engine: sa.Engine, per_practice: int) -> Iterator[dict[str, int]]:
    """Hold the first note queries of each practice until all of them are in flight.

    Requests of both practices are then inside the database, between their
    scope and their decryption, at the same moment, whatever the scheduling.
    Yields how many note queries of each practice were seen.
    """
    barrier = threading.Barrier(2 * per_practice)
    lock = threading.Lock()
    seen = {LYON: 0, NANTES: 0}

    def hold(_conn: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        if "consultation_notes" not in statement:
            return
        for practice in seen:
            if practice in repr(params):
                with lock:
                    seen[practice] += 1
                    wait = seen[practice] <= per_practice
                if wait:
                    barrier.wait(timeout=30)
                return

    event.listen(engine, "before_cursor_execute", hold)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", hold)


def _check_replies(replies: list[tuple[str, int, str]]) -> None:
    for practice, status, text in replies:
        other = NANTES if practice == LYON else LYON
        assert status == 200, text
        bodies = [n["body"] for n in json.loads(text)["notes"]]
        assert bodies == _notes_of(practice)
        assert other not in text


REQUESTS = 40  # half per practice
HELD = 4  # per practice, held together at the barrier


def _seed_two_practices(engine: sa.Engine) -> None:
    # The same patient id in both practices: each numbers its own patients.
    seed(engine, LYON, "pat-7", list(_notes_of(LYON)))
    seed(engine, NANTES, "pat-7", list(_notes_of(NANTES)))


def test_fastapi_concurrent_requests_get_their_own_practice(
    engine: sa.Engine, example_keys: carnet.KeyManager
) -> None:
    app = fastapi_app.create_app(engine, example_keys)
    _seed_two_practices(engine)
    # One request per practice first, so the data keys are cached and no
    # request needs a second pooled connection while the barrier holds some.
    warm = TestClient(app)
    for headers in (MARTIN, PETIT):
        assert warm.get("/patients/pat-7/notes", headers=headers).status_code == 200

    async def one(client: httpx.AsyncClient, practice: str) -> tuple[str, int, str]:
        headers = MARTIN if practice == LYON else PETIT
        r = await client.get("/patients/pat-7/notes", headers=headers)
        return practice, r.status_code, r.text

    async def many() -> list[tuple[str, int, str]]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            practices = [LYON, NANTES] * (REQUESTS // 2)
            return list(await asyncio.gather(*(one(client, p) for p in practices)))

    with overlapping(engine, HELD) as seen:
        replies = asyncio.run(many())
    assert seen == {LYON: REQUESTS // 2, NANTES: REQUESTS // 2}
    _check_replies(replies)
    assert carnet.current_tenant() is None


def test_flask_concurrent_requests_get_their_own_practice(
    engine: sa.Engine, example_keys: carnet.KeyManager
) -> None:
    app = flask_app.create_app(engine, example_keys)
    _seed_two_practices(engine)
    for headers in (MARTIN, PETIT):  # cache the data keys, as above
        assert app.test_client().get("/patients/pat-7/notes", headers=headers).status_code == 200

    def one(practice: str) -> tuple[str, int, str]:
        headers = MARTIN if practice == LYON else PETIT
        r = app.test_client().get("/patients/pat-7/notes", headers=headers)
        return practice, r.status_code, r.get_data(as_text=True)

    with overlapping(engine, HELD) as seen, ThreadPoolExecutor(2 * HELD + 2) as pool:
        replies = list(pool.map(one, [LYON, NANTES] * (REQUESTS // 2)))
    assert seen == {LYON: REQUESTS // 2, NANTES: REQUESTS // 2}
    _check_replies(replies)
    assert carnet.current_tenant() is None


# -- a demonstration set-up ------------------------------------------------------------


def test_demo_app_serves_a_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The factory the README hands to uvicorn, in ./webapp-demo of the working directory.
    monkeypatch.chdir(tmp_path)
    app = fastapi_app.demo_app()
    keys = carnet.get_manager()
    try:
        c = Client("fastapi", app)
        nid = c.post("/patients/pat-1/notes", {"body": SECRET}, MARTIN).json()["id"]
        assert c.get(f"/notes/{nid}", MARTIN).json()["body"] == SECRET
        assert SECRET.encode() not in (tmp_path / "webapp-demo" / "notes.db").read_bytes()
    finally:
        keys.require_scope = False
        keys.decrypt_hook = None
        carnet.configure(None)
        keys.engine.dispose()


# -- pandas.read_sql under a scope (docs/quickstart.md) ----------------------------------


def pandas_snippet() -> str:
    text = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    block = text.split("<!-- pandas:start -->")[1].split("<!-- pandas:end -->")[0]
    return block.strip().removeprefix("```python").removesuffix("```")


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_pandas_read_sql_snippet(engine: sa.Engine, master_key_uri: str, strict: bool) -> None:
    # The quickstart's model, as the snippet refers to it.
    from support.models import Note as QuickstartNote
    from support.models import configured_keys

    lyon = [f"{SECRET} {i}" for i in range(5)]
    with configured_keys(engine, master_key_uri) as keys:
        with Session(engine) as s:
            s.add_all([QuickstartNote(practice_id=LYON, body=b) for b in lyon])
            # Another practice's rows in the same table: the snippet's filter
            # keeps them out of a read they would not open in.
            s.add(QuickstartNote(practice_id=NANTES, body="autre cabinet"))
            s.commit()
        keys.require_scope = strict
        try:
            namespace: dict[str, Any] = {"Note": QuickstartNote, "engine": engine}
            exec(compile(pandas_snippet(), "quickstart.md", "exec"), namespace)  # noqa: S102
            df, sealed = namespace["df"], namespace["sealed"]
            assert list(df.sort_values("id")["body"]) == lyon
            assert all(SECRET not in repr(v) for v in sealed["body"])
            with carnet.tenant_scope(LYON):
                assert [v.open(LYON) for v in sealed.sort_values("id")["body"]] == lyon
        finally:
            keys.require_scope = False
