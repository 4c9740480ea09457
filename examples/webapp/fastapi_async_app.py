"""Consultation notes over HTTP with FastAPI on an ``AsyncEngine`` (asyncpg), strict mode on.

The same three endpoints as ``fastapi_app``, written ``async def`` end to end:

    POST /patients/{patient_id}/notes   {"body": "..."}  -> 201 {"id", "patient_id"}
    GET  /notes/{note_id}                                -> 200 {"id", "patient_id", "body"}
    GET  /patients/{patient_id}/notes                    -> 200 {"notes": [{"id", "body"}, ...]}

Per request: the ``async def`` dependency ``current_caller`` authenticates and
enters ``tenant_scope`` and ``principal_scope`` in the request's own context;
``db`` opens one ``AsyncSession`` inside that scope, and the ``async def``
endpoints run in the same context, so every note they load or write is
sealed and opened for the caller's practice. Requests of different practices
run interleaved on one event loop: each asyncio task has its own copy of the
context, so their scopes never mix. Strict mode (``require_scope=True``)
refuses any read or write that reaches the database without its scope.

carnet opens notes inside SQLAlchemy's greenlets and calls the master key
(KMS, HSM) in a worker thread, so the loop keeps serving other requests
while a practice's key is unwrapped (docs/quickstart.md, asyncio).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

import carnet
from carnet.audit import DecryptBudget, principal_scope
from carnet.errors import CarnetError

from .common import DEMO_TOKENS, Caller, authenticate, default_budget, install_carnet, refusal
from .models import Base, Note


async def current_caller(request: Request) -> AsyncIterator[Caller]:
    """Authenticate, then hold the caller's practice and principal in scope for the request."""
    who = authenticate(request.headers.get("authorization"), request.app.state.tokens)
    if who is None:
        raise HTTPException(401, "authentication required", {"WWW-Authenticate": "Bearer"})
    request.state.caller = who
    with carnet.tenant_scope(who.practice), principal_scope(who.principal):
        yield who


CurrentCaller = Annotated[Caller, Depends(current_caller)]


async def db(request: Request, who: CurrentCaller) -> AsyncIterator[AsyncSession]:
    """One session per request, opened inside the caller's scope (it depends on it)."""
    async with request.app.state.sessions() as session:
        yield session


Db = Annotated[AsyncSession, Depends(db)]


class NoteIn(BaseModel):
    body: str = Field(min_length=1, max_length=1_000_000)


def create_app(
    engine: AsyncEngine,
    keys: carnet.KeyManager,
    *,
    budget: DecryptBudget | None = None,
    tokens: Mapping[str, Caller] = DEMO_TOKENS,
) -> FastAPI:
    """The application on ``engine`` (``postgresql+asyncpg://…``); ``keys`` holds its data keys.

    Strict mode and the decrypt budget are process-wide: one application per process.
    """
    budget = budget if budget is not None else default_budget()
    install_carnet(keys, budget)  # carnet.configure(keys, require_scope=True) and the auditor
    app = FastAPI(title="carnet example: consultation notes (asyncio)")
    app.state.tokens = tokens
    # expire_on_commit=False: reading an attribute after the commit would
    # otherwise load (and decrypt) the row again, outside an await.
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)

    @app.exception_handler(CarnetError)
    async def carnet_refusal(request: Request, exc: CarnetError) -> JSONResponse:
        r = refusal(exc, getattr(request.state, "caller", None), budget)
        return JSONResponse({"detail": r.detail}, status_code=r.status, headers=dict(r.headers))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes the submitted input, which here is a note.
        errors = [{"loc": list(e.get("loc", ())), "type": e.get("type")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.post("/patients/{patient_id}/notes", status_code=201)
    async def create_note(
        patient_id: str, note: NoteIn, who: CurrentCaller, s: Db
    ) -> dict[str, object]:
        row = Note(practice_id=who.practice, patient_id=patient_id, body=note.body)
        s.add(row)
        await s.commit()
        return {"id": row.id, "patient_id": patient_id}

    @app.get("/notes/{note_id}")
    async def read_note(note_id: int, who: CurrentCaller, s: Db) -> dict[str, object]:
        # A note of another practice raises TenantMismatch while loading (the
        # scope guards the ORM); the check below covers a note without a body.
        row = await s.get(Note, note_id)
        if row is None:
            raise HTTPException(404, "no such note")
        if row.practice_id != who.practice:
            raise HTTPException(403, "forbidden")
        return {"id": row.id, "patient_id": row.patient_id, "body": row.body}

    @app.get("/patients/{patient_id}/notes")
    async def list_notes(patient_id: str, who: CurrentCaller, s: Db) -> dict[str, object]:
        rows = (
            await s.scalars(
                sa.select(Note)
                .where(Note.practice_id == who.practice, Note.patient_id == patient_id)
                .order_by(Note.id)
            )
        ).all()
        return {"notes": [{"id": r.id, "body": r.body} for r in rows]}

    return app


async def create_tables(engine: AsyncEngine, keys: carnet.KeyManager) -> None:
    """carnet's key table and the notes table. A real application uses its migrations."""
    await keys.create_schema_async()
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


def demo_app() -> FastAPI:
    """``uvicorn --factory webapp.fastapi_async_app:demo_app``: SQLite through aiosqlite and
    a key file in ./webapp-demo (production: ``postgresql+asyncpg://…`` and a KMS or HSM)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from .common import demo_setup

    # The tables, created synchronously before the server's event loop exists
    # (an async engine's connections belong to the loop that opened them).
    sync_engine, sync_keys = demo_setup()
    sync_keys.close()
    sync_engine.dispose()
    engine = create_async_engine(
        str(sync_engine.url).replace("sqlite://", "sqlite+aiosqlite://", 1), hide_parameters=True
    )
    master = sync_keys.master_key.uri
    return create_app(engine, carnet.KeyManager(engine, master_key=master))
