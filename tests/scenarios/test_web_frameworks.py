"""A tenant scope lost between a web framework's dependency and its endpoint fails closed.

FastAPI runs a synchronous (``def``) yield dependency in a thread pool, in a
copied context: a ``tenant_scope`` it enters is gone when the endpoint runs.
Without strict mode the ORM then opens any row under the row's own practice;
with ``carnet.configure(keys, require_scope=True)`` the read raises
``TenantRequired`` instead. The documented fixes (an ``async def`` dependency,
or Flask's request hooks) keep the scope, and a request of practice B never
reads practice A's note. Tested through each framework's test client.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

import carnet
from carnet.errors import CarnetError, TenantMismatch, TenantRequired
from support.models import Note

SECRET = "PLANTED-violences-conjugales-41"


@pytest.fixture(autouse=True)
def strict(keys: carnet.KeyManager, engine: sa.Engine) -> Iterator[None]:
    """A note of practice A and one of B, then strict mode, on the shared ``keys``.

    Every test here uses ``keys``; strict mode is undone afterwards.
    """
    with Session(engine) as s:
        s.add_all(
            [
                Note(id=1, practice_id="A", body=SECRET),
                Note(id=2, practice_id="B", body="note de B"),
            ]
        )
        s.commit()
    carnet.configure(keys, require_scope=True)
    try:
        yield
    finally:
        keys.require_scope = False


def _fastapi_app(engine: sa.Engine, dependency: str) -> object:
    from fastapi import Depends, FastAPI, Header, HTTPException

    app = FastAPI()

    def sync_scope(x_practice: str = Header()) -> Iterator[str]:
        with carnet.tenant_scope(x_practice):
            yield x_practice

    async def async_scope(x_practice: str = Header()) -> Iterator[str]:  # type: ignore[misc]
        with carnet.tenant_scope(x_practice):
            yield x_practice

    dep = sync_scope if dependency == "sync" else async_scope

    @app.get("/notes/{nid}")
    def read(nid: int, practice: str = Depends(dep)) -> dict[str, str | None]:  # noqa: B008
        try:
            with Session(engine) as s:
                n = s.get(Note, nid)
                return {"body": n.body if n else None}
        except TenantRequired:
            raise HTTPException(status_code=401, detail="no practice scope") from None
        except TenantMismatch:
            raise HTTPException(status_code=403, detail="another practice") from None

    return app


def test_fastapi_sync_dependency_scope_is_lost_and_strict_mode_refuses(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    client = TestClient(_fastapi_app(engine, "sync"))  # type: ignore[arg-type]
    r = client.get("/notes/1", headers={"X-Practice": "B"})
    # The scope entered by the dependency did not reach the endpoint: strict
    # mode refuses instead of returning practice A's note to practice B.
    assert r.status_code == 401
    assert SECRET not in r.text


def test_fastapi_async_dependency_keeps_the_scope(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    client = TestClient(_fastapi_app(engine, "async"))  # type: ignore[arg-type]
    own = client.get("/notes/1", headers={"X-Practice": "A"})
    assert own.status_code == 200 and own.json() == {"body": SECRET}
    other = client.get("/notes/1", headers={"X-Practice": "B"})
    assert other.status_code == 403 and SECRET not in other.text


def test_flask_request_hooks_keep_the_scope(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    from flask import Flask, abort, g, request

    app = Flask(__name__)

    @app.before_request
    def enter_scope() -> None:
        practice = request.headers.get("X-Practice")
        if practice:
            g.carnet_scope = carnet.tenant_scope(practice)
            g.carnet_scope.__enter__()

    @app.teardown_request
    def leave_scope(_exc: BaseException | None) -> None:
        scope = g.pop("carnet_scope", None)
        if scope is not None:
            scope.__exit__(None, None, None)

    @app.get("/notes/<int:nid>")
    def read(nid: int) -> dict[str, str | None]:
        try:
            with Session(engine) as s:
                n = s.get(Note, nid)
                return {"body": n.body if n else None}
        except TenantRequired:
            abort(401)
        except CarnetError:
            abort(403)

    client = app.test_client()
    assert client.get("/notes/1", headers={"X-Practice": "A"}).get_json() == {"body": SECRET}
    refused = client.get("/notes/1", headers={"X-Practice": "B"})
    assert refused.status_code == 403 and SECRET not in refused.get_data(as_text=True)
    assert client.get("/notes/1").status_code == 401  # no scope at all
    assert carnet.current_tenant() is None  # nothing leaks into the next request
