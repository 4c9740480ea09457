"""Consultation notes over HTTP with FastAPI, strict mode, a decrypt budget and the audit trail.

    POST /patients/{patient_id}/notes   {"body": "..."}  -> 201 {"id", "patient_id"}
    GET  /notes/{note_id}                                -> 200 {"id", "patient_id", "body"}
    GET  /patients/{patient_id}/notes                    -> 200 {"notes": [{"id", "body"}, ...]}

Where the scope is entered matters. ``current_caller`` is an ``async def``
dependency: FastAPI runs it in the request's own context, so the
``tenant_scope`` and ``principal_scope`` it enters are still there when the
endpoint runs. The endpoints are plain ``def`` with a synchronous SQLAlchemy
``Session``: FastAPI runs them in its thread pool, in a copy of that context,
scope included, and the event loop is never blocked by the database. A
synchronous (``def``) dependency would run in a copy of its own and its scope
would be lost; strict mode then refuses the read instead of answering it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Annotated

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.orm import sessionmaker

import carnet
from carnet.audit import AuditTrail, DecryptBudget, audit_context, principal_scope
from carnet.decoys import Alert
from carnet.errors import CarnetError

from .common import (
    DEMO_TOKENS,
    Caller,
    authenticate,
    default_budget,
    default_trail,
    install_carnet,
    refusal,
)
from .models import Note


async def current_caller(request: Request) -> AsyncIterator[Caller]:
    """Authenticate, then hold the caller's practice and principal in scope for the request."""
    who = authenticate(request.headers.get("authorization"), request.app.state.tokens)
    if who is None:
        raise HTTPException(401, "authentication required", {"WWW-Authenticate": "Bearer"})
    # The practice and the principal come from the credential, never from the
    # request's path or body.
    request.state.caller = who
    # The audit trail's records of this request carry its id and route
    # template (never the path itself: it may hold a patient's identifier).
    route = getattr(request.scope.get("route"), "path", None)
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    with (
        carnet.tenant_scope(who.practice),
        principal_scope(who.principal),
        audit_context(request_id=request_id[:64], route=route),
    ):
        yield who


CurrentCaller = Annotated[Caller, Depends(current_caller)]


class NoteIn(BaseModel):
    body: str = Field(min_length=1, max_length=1_000_000)


def create_app(
    engine: sa.Engine,
    keys: carnet.KeyManager,
    *,
    budget: DecryptBudget | None = None,
    trail: AuditTrail | None = None,
    tokens: Mapping[str, Caller] = DEMO_TOKENS,
    alert: Callable[[Alert], None] | None = None,
) -> FastAPI:
    budget = budget if budget is not None else default_budget()
    install_carnet(keys, budget, trail, alert)
    sessions = sessionmaker(engine)
    app = FastAPI(title="carnet example: consultation notes")
    app.state.tokens = tokens

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
    def create_note(patient_id: str, note: NoteIn, who: CurrentCaller) -> dict[str, object]:
        with sessions() as s:
            row = Note(practice_id=who.practice, patient_id=patient_id, body=note.body)
            s.add(row)
            s.flush()
            # The id before the commit: after it, reading row.id reloads the whole
            # expired row, body included, a decryption the audit trail records.
            note_id = row.id
            s.commit()
            return {"id": note_id, "patient_id": patient_id}

    @app.get("/notes/{note_id}")
    def read_note(note_id: int, who: CurrentCaller) -> dict[str, object]:
        with sessions() as s:
            # Loading a note of another practice raises TenantMismatch (the
            # scope guards the ORM); the check below also covers a note whose
            # body is empty, which carnet has nothing to refuse.
            row = s.get(Note, note_id)
            if row is None:
                raise HTTPException(404, "no such note")
            if row.practice_id != who.practice:
                raise HTTPException(403, "forbidden")
            return {"id": row.id, "patient_id": row.patient_id, "body": row.body}

    @app.get("/patients/{patient_id}/notes")
    def list_notes(patient_id: str, who: CurrentCaller) -> dict[str, object]:
        with sessions() as s:
            rows = s.scalars(
                sa.select(Note)
                .where(Note.practice_id == who.practice, Note.patient_id == patient_id)
                .order_by(Note.id)
            ).all()
            return {"notes": [{"id": r.id, "body": r.body} for r in rows]}

    return app


def demo_app() -> FastAPI:
    """``uvicorn --factory webapp.fastapi_app:demo_app``: SQLite and a key file in ./webapp-demo."""
    from .common import demo_setup

    engine, keys = demo_setup()
    return create_app(engine, keys, trail=default_trail(keys))
