"""examples/webapp with the trail, a shared budget and decoys together: a clinician's
screens never open a decoy; a walk over patient ids does, gets a bland 404, is recorded
in the trail as an alert, pages through the hook, and is stopped in every worker."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

import carnet
from carnet.audit import AuditTrail, DecryptBudget
from carnet.decoys import Alert
from support.paths import ROOT

sys.path.insert(0, str(ROOT / "examples"))

from webapp import fastapi_app, flask_app  # noqa: E402
from webapp.common import DECOY_PATIENT, plant_decoys  # noqa: E402
from webapp.models import create_tables  # noqa: E402

SECRET = "PLANTED-webapp-decoy-note-33"
MARTIN = {"Authorization": "Bearer token-martin"}
BERNARD = {"Authorization": "Bearer token-bernard"}


@pytest.fixture
def webapp_keys(engine: sa.Engine, master_key_uri: str) -> Iterator[carnet.KeyManager]:
    webapp_keys = carnet.KeyManager(engine, master_key=master_key_uri)
    create_tables(engine, webapp_keys)
    try:
        yield webapp_keys
    finally:
        webapp_keys.require_scope = False
        webapp_keys.decrypt_hook = None
        webapp_keys.decoy_alarm = None
        carnet.configure(None)


def _text(r: Any) -> str:
    return r.get_data(as_text=True) if hasattr(r, "get_data") else str(r.text)


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
def test_trail_shared_budget_and_decoys_together(
    webapp_keys: carnet.KeyManager,
    engine: sa.Engine,
    db_url: str,
    tmp_path: Path,
    framework: str,
) -> None:
    trail = AuditTrail(webapp_keys, background=False)
    # The budget in the application's database, shared by every worker.
    budget = DecryptBudget(limit=500, window=3600, store=db_url, block=10)
    alerts: list[Alert] = []
    module: Any = fastapi_app if framework == "fastapi" else flask_app
    app = module.create_app(engine, webapp_keys, budget=budget, trail=trail, alert=alerts.append)
    client: Any = TestClient(app) if framework == "fastapi" else app.test_client()
    for i in range(3):
        r = client.post(f"/patients/PAT-{i}/notes", json={"body": f"{SECRET} {i}"}, headers=MARTIN)
        assert r.status_code == 201
    plant_decoys(engine, webapp_keys, "cabinet-lyon-3")
    # The screens a clinician uses never meet a decoy.
    for i in range(3):
        r = client.get(f"/patients/PAT-{i}/notes", headers=BERNARD)
        assert r.status_code == 200 and SECRET in _text(r)
    assert alerts == []
    # A walk over patient ids reaches the decoy patient: refused like a missing page.
    r = client.get(f"/patients/{DECOY_PATIENT}/notes", headers=MARTIN)
    assert r.status_code == 404
    assert [(a.principal, a.practice) for a in alerts] == [("dr.martin", "cabinet-lyon-3")]
    # Stopped for the rest of the window: its next read of a real note too...
    r = client.get("/patients/PAT-0/notes", headers=MARTIN)
    assert r.status_code == 429
    # ...and in another worker process sharing the budget.
    with pytest.raises(carnet.errors.DecryptBudgetExceeded):
        DecryptBudget(limit=500, window=3600, store=db_url).charge("dr.martin")
    # The colleague is not.
    assert client.get("/patients/PAT-1/notes", headers=BERNARD).status_code == 200
    assert trail.flush()
    recs = list(trail.store.walk())
    assert [(x["principal"], x["practice"]) for x in recs if x["kind"] == "alert"] == [
        ("dr.martin", "cabinet-lyon-3")
    ]
    assert trail.store.verify().ok
    trail.close()
    trail.store.engine.dispose()
