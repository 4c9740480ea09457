"""Consultation notes over HTTP with Flask, strict mode, a decrypt budget and the audit trail.

The same three endpoints as the FastAPI application. Flask serves a whole
request in one thread and one context, so the scopes are entered in
``before_request`` (after authentication) and left in ``teardown_request``,
which runs whatever happened in the view.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import sqlalchemy as sa
from flask import Flask, abort, g, jsonify, request
from sqlalchemy.orm import sessionmaker
from werkzeug.exceptions import HTTPException

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

MAX_NOTE = 1_000_000


def create_app(
    engine: sa.Engine,
    keys: carnet.KeyManager,
    *,
    budget: DecryptBudget | None = None,
    trail: AuditTrail | None = None,
    tokens: Mapping[str, Caller] = DEMO_TOKENS,
    alert: Callable[[Alert], None] | None = None,
) -> Flask:
    budget = budget if budget is not None else default_budget()
    install_carnet(keys, budget, trail, alert)
    sessions = sessionmaker(engine)
    app = Flask(__name__)

    @app.before_request
    def enter_scopes() -> None:
        who = authenticate(request.headers.get("Authorization"), tokens)
        if who is None:
            abort(401)
        g.caller = who
        g.carnet_scopes = stack = ExitStack()
        stack.enter_context(carnet.tenant_scope(who.practice))
        stack.enter_context(principal_scope(who.principal))
        # The trail's records carry the request id and the route's rule
        # (``/notes/<int:note_id>``), never the path with its identifiers.
        rule = request.url_rule.rule if request.url_rule is not None else None
        request_id = request.headers.get("X-Request-ID") or uuid.uuid4().hex
        stack.enter_context(audit_context(request_id=request_id[:64], route=rule))

    @app.teardown_request
    def leave_scopes(_exc: BaseException | None) -> None:
        # Leaves the scopes in the context that entered them, so nothing of
        # this request's practice is left for the next request on the thread.
        stack = g.pop("carnet_scopes", None)
        if stack is not None:
            stack.close()

    @app.errorhandler(CarnetError)
    def carnet_refusal(exc: CarnetError) -> Any:
        r = refusal(exc, g.get("caller"), budget)
        return jsonify(detail=r.detail), r.status, dict(r.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        # JSON like the FastAPI app; the description is Flask's generic text.
        headers = {"WWW-Authenticate": "Bearer"} if exc.code == 401 else {}
        return jsonify(detail=exc.name.lower()), exc.code or 500, headers

    @app.post("/patients/<patient_id>/notes")
    def create_note(patient_id: str) -> Any:
        payload = request.get_json(silent=True)
        body = payload.get("body") if isinstance(payload, dict) else None
        # A bad payload is answered without echoing it: it may be a note.
        if not isinstance(body, str) or not 0 < len(body) <= MAX_NOTE:
            abort(422)
        with sessions() as s:
            row = Note(practice_id=g.caller.practice, patient_id=patient_id, body=body)
            s.add(row)
            s.flush()
            # The id before the commit: after it, reading row.id reloads the whole
            # expired row, body included, a decryption the audit trail records.
            note_id = row.id
            s.commit()
            return {"id": note_id, "patient_id": patient_id}, 201

    @app.get("/notes/<int:note_id>")
    def read_note(note_id: int) -> Any:
        with sessions() as s:
            # Loading a note of another practice raises TenantMismatch (the
            # scope guards the ORM); the check below also covers a note whose
            # body is empty, which carnet has nothing to refuse.
            row = s.get(Note, note_id)
            if row is None:
                abort(404)
            if row.practice_id != g.caller.practice:
                abort(403)
            return {"id": row.id, "patient_id": row.patient_id, "body": row.body}

    @app.get("/patients/<patient_id>/notes")
    def list_notes(patient_id: str) -> Any:
        with sessions() as s:
            rows = s.scalars(
                sa.select(Note)
                .where(Note.practice_id == g.caller.practice, Note.patient_id == patient_id)
                .order_by(Note.id)
            ).all()
            return {"notes": [{"id": r.id, "body": r.body} for r in rows]}

    return app


if __name__ == "__main__":
    from .common import demo_setup

    # Flask's development server; run from examples/: python -m webapp.flask_app
    engine, keys = demo_setup()
    create_app(engine, keys, trail=default_trail(keys)).run()
