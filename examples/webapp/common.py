"""What both applications share: who is calling, carnet's set-up, refusals as HTTP statuses.

Authentication here is a fixed table of bearer tokens, each naming a principal
(the user, for the audit trail and the decrypt budget) and the practice it
works for (the tenant). A real application takes both from its own
authentication (a session, an OpenID Connect token, an API key table), never
from a header the client chooses freely.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

import carnet
from carnet import decoys
from carnet.audit import Auditor, AuditTrail, DecryptBudget
from carnet.errors import (
    AuditStoreUnavailable,
    BudgetStoreUnavailable,
    CarnetError,
    DecoyOpened,
    DecryptBudgetExceeded,
    KeyDestroyed,
    MasterKeyUnavailable,
    TenantMismatch,
)

log = logging.getLogger("webapp")


@dataclass(frozen=True)
class Caller:
    principal: str
    practice: str


# Demonstration tokens only.
DEMO_TOKENS: Mapping[str, Caller] = {
    "token-martin": Caller("dr.martin", "cabinet-lyon-3"),
    "token-bernard": Caller("dr.bernard", "cabinet-lyon-3"),
    "token-petit": Caller("dr.petit", "cabinet-nantes-1"),
}


def authenticate(authorization: str | None, tokens: Mapping[str, Caller]) -> Caller | None:
    """The caller of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    found = None
    for known, caller in tokens.items():
        # Every token is compared, in constant time, so response time does not
        # tell how much of a guessed token was right.
        if hmac.compare_digest(known.encode(), token.strip().encode()):
            found = caller
    return found


def install_carnet(
    keys: carnet.KeyManager,
    budget: DecryptBudget | None,
    trail: AuditTrail | None = None,
    alert: Callable[[decoys.Alert], None] | None = None,
) -> Auditor:
    """Strict mode, the decrypt budget, the audit trail and the decoy alarm, process-wide:
    call once, at start-up.

    Strict mode makes every read and write of a note need a ``tenant_scope``
    matching the row's practice, so a scope lost between the request and the
    database fails closed. The auditor attributes each decryption to the
    principal in scope, stops one that reads more than its budget, and hands
    every disclosure to the durable trail (``carnet_audit``, docs/audit.md).
    A decoy note opened (a read no screen of this application makes) is
    refused, recorded in the trail as an alert, logged at CRITICAL, handed to
    ``alert`` (page the on-call), and its principal stopped for the rest of
    the budget's window, in every worker when the budget is shared.
    """
    carnet.configure(keys, require_scope=True)
    auditor = Auditor(budget=budget, trail=trail).install(keys)
    decoys.DecoyAlarm(hook=alert or _log_alert, trail=trail, stop=budget).install(keys)
    return auditor


def _log_alert(alert: decoys.Alert) -> None:
    log.critical(
        "decoy opened by %r (practice %r): page the on-call", alert.principal, alert.practice
    )


# The decoy patient of every practice: no screen lists it (the application never
# links to it, and a clinician's patient list leaves it out), so only a read of
# "every note" or a walk over patient ids ever opens its notes. A real
# application picks an id that looks like its others, kept in its configuration.
DECOY_PATIENT = os.environ.get("WEBAPP_DECOY_PATIENT", "PAT-0419")


def plant_decoys(engine: sa.Engine, keys: carnet.KeyManager, practice: str, count: int = 2) -> None:
    """Decoy notes for ``practice``'s decoy patient (the notes table's other columns
    filled here, so the library call rather than ``carnet decoys plant``)."""
    decoys.plant(
        keys,
        engine,
        "consultation_notes",
        "body",
        practice,
        count,
        other=lambda _i: {"patient_id": DECOY_PATIENT},
    )


def default_trail(keys: carnet.KeyManager) -> AuditTrail:
    """The audit trail in the key table's database (the notes' column names the patient
    recorded for each note opened, see models.py).

    ``required`` instead of the default ``best_effort`` refuses a read the
    trail cannot record (HTTP 503 below) instead of logging the failure.
    """
    return AuditTrail(keys)


def default_budget() -> DecryptBudget:
    """500 notes per principal per hour: a clinician reads tens of notes an hour; an
    export loop reads thousands. With ``WEBAPP_BUDGET_STORE`` (the database's URL, or
    ``redis://...``) the budget is one for every worker process: a scraper spread
    over four workers gets 500, not 2,000 (docs/audit.md, "One budget for every
    process")."""
    store = os.environ.get("WEBAPP_BUDGET_STORE")
    if store:
        return DecryptBudget(limit=500, window=3600, store=store, block=10)
    return DecryptBudget(limit=500, window=3600)


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str
    headers: Mapping[str, str]


def refusal(exc: CarnetError, caller: Caller | None, budget: DecryptBudget | None) -> Refusal:
    """The HTTP answer to a carnet error: a fixed message, never ``str(exc)``.

    carnet's messages hold no note text, but they name practices (a
    ``TenantMismatch`` names the practice a note belongs to), which a client of
    another practice has no business learning.
    """
    who = caller.principal if caller else None
    where = caller.practice if caller else None
    if isinstance(exc, DecryptBudgetExceeded):
        # carnet.audit has already logged the alert; the window bounds the wait.
        retry = str(int(budget.window)) if budget is not None else "60"
        return Refusal(429, "decrypt budget exceeded", {"Retry-After": retry})
    if isinstance(exc, DecoyOpened):
        # The alarm is raised (log, trail, hook); the caller learns nothing of it.
        return Refusal(404, "not found", {})
    if isinstance(exc, BudgetStoreUnavailable):
        # required mode: the shared budget could not be checked, nothing was disclosed.
        log.error("decrypt budget store unavailable: a read of %r was refused", who)
        return Refusal(503, "temporarily unavailable", {"Retry-After": "30"})
    if isinstance(exc, TenantMismatch):
        log.warning("refused a note of another practice to %r (practice %r)", who, where)
        return Refusal(403, "forbidden", {})
    if isinstance(exc, KeyDestroyed):
        return Refusal(410, "this note was erased", {})
    if isinstance(exc, AuditStoreUnavailable):
        # required mode: the read could not be recorded, so nothing was disclosed.
        log.error("audit trail unavailable: a read of %r was refused", who)
        return Refusal(503, "temporarily unavailable", {"Retry-After": "30"})
    if isinstance(exc, MasterKeyUnavailable):
        return Refusal(503, "temporarily unavailable", {"Retry-After": "30"})
    # TenantRequired lands here: a request that reached the database without
    # its scope is a bug in the application, not the client's fault.
    log.error("carnet refused a request of %r (practice %r): %s", who, where, type(exc).__name__)
    return Refusal(500, "internal error", {})


def demo_setup(directory: str = "webapp-demo") -> tuple[sa.Engine, carnet.KeyManager]:
    """A SQLite database and a file master key in ``directory``, for trying the apps by hand.

    A file master key is for development only: production keeps the master
    key in a KMS, an HSM or the OS keyring (docs/providers.md).
    """
    from .models import create_tables

    home = Path(directory).resolve()
    home.mkdir(exist_ok=True)
    master = "file://" + str(home / "master.key")
    if not (home / "master.key").exists():
        carnet.create_master_key(master).close()
    engine = sa.create_engine(f"sqlite:///{home / 'notes.db'}")
    keys = carnet.KeyManager(engine, master_key=master)
    create_tables(engine, keys)
    return engine, keys
