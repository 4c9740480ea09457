"""examples/webapp with the audit trail: each request's reads recorded with its id and route,
and "who opened this patient's file" answered by ``carnet audit report --row``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from fastapi.testclient import TestClient

import carnet
from carnet.audit import AuditTrail
from carnet.cli import cli
from support.paths import ROOT

sys.path.insert(0, str(ROOT / "examples"))

from webapp import fastapi_app, flask_app  # noqa: E402
from webapp.models import create_tables  # noqa: E402

SECRET = "PLANTED-webapp-audit-note-91"
MARTIN = {"Authorization": "Bearer token-martin", "X-Request-ID": "req-42"}


@pytest.fixture
def webapp_keys(engine: sa.Engine, master_key_uri: str) -> Iterator[carnet.KeyManager]:
    webapp_keys = carnet.KeyManager(engine, master_key=master_key_uri)
    create_tables(engine, webapp_keys)
    try:
        yield webapp_keys
    finally:
        webapp_keys.require_scope = False
        webapp_keys.decrypt_hook = None
        carnet.configure(None)


@pytest.mark.parametrize("framework", ["fastapi", "flask"])
@pytest.mark.parametrize("mode", ["best_effort", "required"])
def test_webapp_reads_are_in_the_trail(
    webapp_keys: carnet.KeyManager,
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    framework: str,
    mode: str,
) -> None:
    trail = AuditTrail(webapp_keys, mode=mode, background=False)
    module: Any = fastapi_app if framework == "fastapi" else flask_app
    app = module.create_app(engine, webapp_keys, trail=trail)
    client: Any = TestClient(app) if framework == "fastapi" else app.test_client()
    r = client.post("/patients/PAT-7/notes", json={"body": SECRET}, headers=MARTIN)
    assert r.status_code == 201
    note_id = r.json()["id"] if framework == "fastapi" else r.get_json()["id"]
    assert client.get(f"/notes/{note_id}", headers=MARTIN).status_code == 200
    assert trail.flush()
    recs = list(trail.store.walk())
    reads = [r for r in recs if r["kind"] == "read" and "note_id" in str(r["route"])]
    assert [(r["principal"], r["practice"], r["count"], r["request_id"]) for r in reads] == [
        ("dr.martin", "cabinet-lyon-3", 1, "req-42")
    ]
    assert reads[0]["route"] in ("/notes/{note_id}", "/notes/<int:note_id>")
    # Every record of the trail names the route template, never a patient's id.
    assert all("PAT-7" not in str(r["route"]) for r in recs)
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "PAT-7", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert [h["principal"] for h in json.loads(res.output)["readers"]] == ["dr.martin"]
    assert SECRET not in json.dumps(recs, default=str)
    trail.close()
    trail.store.engine.dispose()
