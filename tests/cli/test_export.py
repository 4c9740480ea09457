"""`carnet export`: a practice's rows decrypted to JSON Lines (mode 0600), read back and compared
with the database; resumed after SIGKILL; audited as reads; and the one-patient library call."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet import export as ex
from carnet.audit import Auditor, principal_scope

SECRET = "PLANTED-export-secret"
APP = textwrap.dedent(
    """
    import datetime as dt

    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    import carnet


    class Base(DeclarativeBase):
        pass


    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        practice_id: Mapped[str] = mapped_column(sa.String(64))
        patient_id: Mapped[str] = mapped_column(sa.String(64))
        seen_on: Mapped[dt.date] = mapped_column(sa.Date)
        body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
        summary: Mapped[str | None] = mapped_column(
            carnet.EncryptedText(tenant="practice_id", storage="text")
        )


    class Letter(Base):
        __tablename__ = "letters"
        ref: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
        cabinet: Mapped[str] = mapped_column(sa.String(64))
        content: Mapped[str | None] = mapped_column(
            carnet.EncryptedText(tenant="cabinet", label="courriers.texte")
        )
    """
)
P1, P2 = "cabinet-lyon-3", "cabinet-nantes-1"


def _load(directory: Path, name: str) -> ModuleType:
    path = directory / f"{name}.py"
    path.write_text(APP)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _env(db_url: str, mk: str) -> dict[str, str]:
    env = dict(os.environ, CARNET_DATABASE_URL=db_url, CARNET_MASTER_KEY=mk)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _cli(args: list[str], db_url: str, mk: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "carnet", *args],
        env=_env(db_url, mk),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _fill(module: ModuleType, db_url: str, mk: str, n: int) -> None:
    keys = carnet.KeyManager(db_url, master_key=mk)
    keys.create_schema()
    module.Base.metadata.create_all(keys.engine)
    carnet.configure(keys)
    try:
        with Session(keys.engine) as s:
            for i in range(n):
                p = (P1, P2)[i % 2]
                s.add(
                    module.Note(
                        id=i,
                        practice_id=p,
                        patient_id=f"pat-{i % 7}",
                        seen_on=dt.date(2026, 1, 1) + dt.timedelta(days=i % 300),
                        body=None if i % 11 == 0 else f"{SECRET} {p} body {i} é",
                        summary=f"{p} résumé {i}",
                    )
                )
                if i % 3 == 0:
                    s.add(module.Letter(ref=f"L{i:05d}", cabinet=p, content=f"{p} lettre {i}"))
            s.commit()
    finally:
        carnet.configure(None)
        keys.close()
        keys.engine.dispose()


def _database_view(module: ModuleType, db_url: str, mk: str, practice: str) -> dict[str, Any]:
    """What the application reads for the practice, through the ORM: what the file must hold."""
    keys = carnet.KeyManager(db_url, master_key=mk)
    carnet.configure(keys)
    try:
        with Session(keys.engine) as s, carnet.tenant_scope(practice):
            notes = s.scalars(sa.select(module.Note).where(module.Note.practice_id == practice))
            letters = s.scalars(sa.select(module.Letter).where(module.Letter.cabinet == practice))
            return {
                "notes": {
                    (n.id,): {
                        "id": n.id,
                        "practice_id": n.practice_id,
                        "patient_id": n.patient_id,
                        "seen_on": n.seen_on.isoformat(),
                        "body": n.body,
                        "summary": n.summary,
                    }
                    for n in notes
                },
                "letters": {
                    (x.ref,): {"ref": x.ref, "cabinet": x.cabinet, "content": x.content}
                    for x in letters
                },
            }
    finally:
        carnet.configure(None)
        keys.close()
        keys.engine.dispose()


def _file_view(path: Path) -> dict[str, Any]:
    header, rows = ex.read_export(path)
    out: dict[str, dict[tuple[Any, ...], Any]] = {t: {} for t in header["tables"]}
    for r in rows:
        key = tuple(r["pk"])
        assert key not in out[r["table"]], f"row {key} written twice"
        out[r["table"]][key] = r["row"]
    return out


@pytest.fixture
def app(
    db_url: str, master_key_uri: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[str, ModuleType, str, str]:
    name = "export_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")
    module = _load(tmp_path, name)
    _fill(module, db_url, master_key_uri, 60)
    return name, module, db_url, master_key_uri


def test_export_read_back_equals_the_database(
    app: tuple[str, ModuleType, str, str], tmp_path: Path
) -> None:
    name, module, url, mk = app
    out = tmp_path / "export" / "lyon.jsonl"
    out.parent.mkdir()
    r = _cli(
        ["export", "--tenant", P1, "--app", f"{name}:Base", "--out", str(out), "--json"],
        url,
        mk,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    expected = _database_view(module, url, mk, P1)
    assert _file_view(out) == expected
    raw = out.read_text(encoding="utf-8")
    assert P2 not in raw  # nothing of the other practice
    rep = json.loads(r.stdout)
    assert rep["tables"] == {"letters": 10, "notes": 30}
    # Audited as reads: each value opened, by field, under the export's principal.
    audit = {(e["field"], e["principal"]): e["count"] for e in rep["audit"]}
    user = rep["principal"]
    assert user.startswith("carnet-export")
    bodies = sum(1 for v in expected["notes"].values() if v["body"] is not None)
    assert audit == {
        ("notes.body", user): bodies,
        ("notes.summary", user): 30,
        ("courriers.texte", user): 10,
    }
    # Run again: the finished file is left as it is.
    before = out.read_bytes()
    r = _cli(
        ["export", "--tenant", P1, "--app", f"{name}:Base", "--out", str(out)], url, mk, tmp_path
    )
    assert r.returncode == 0 and "already a finished export" in r.stdout
    assert out.read_bytes() == before


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_refusals(app: tuple[str, ModuleType, str, str], tmp_path: Path) -> None:
    name, _, url, mk = app
    out = tmp_path / "p.jsonl"
    base = ["export", "--app", f"{name}:Base", "--out", str(out)]
    # A practice with no key: nothing made.
    r = _cli([*base, "--tenant", "cabinet-lyon-33"], url, mk, tmp_path)
    assert r.returncode == 7 and not out.exists()
    r = _cli(["export", "--tenant", P1, "--out", str(out)], url, mk, tmp_path)
    assert r.returncode == 2 and "--app" in r.stderr
    r = _cli(
        ["export", "--tenant", P1, "--table", "carnet_keys", "--tenant-column", "tenant"]
        + ["--out", str(out)],
        url,
        mk,
        tmp_path,
    )
    assert r.returncode == 2 and "carnet's own table" in r.stderr and not out.exists()
    # A file others can read is never written into.
    out.write_text("")
    out.chmod(0o644)
    r = _cli([*base, "--tenant", P1], url, mk, tmp_path)
    assert r.returncode == 2 and "mode 0644" in r.stderr, r.stderr
    assert out.read_text() == ""
    # --restart replaces it, private.
    r = _cli([*base, "--tenant", P1, "--restart"], url, mk, tmp_path)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # Another practice's export is not appended to it.
    r = _cli([*base, "--tenant", P2], url, mk, tmp_path)
    assert r.returncode == 2 and "another practice" in r.stderr
    assert P2 not in out.read_text(encoding="utf-8")


def test_export_killed_then_resumed(db_url: str, master_key_uri: str, tmp_path: Path) -> None:
    name = "export_resume_" + sa.engine.make_url(db_url).get_backend_name()
    module = _load(tmp_path, name)
    _fill(module, db_url, master_key_uri, 1200)
    out = tmp_path / "lyon.jsonl"
    args = ["export", "--tenant", P1, "--app", f"{name}:Base", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "carnet", *args, "--batch-size", "7"],
        env=_env(db_url, master_key_uri),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # SIGKILL once the second table (notes) is under way.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b'"table": "notes"') > 50:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the export ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # A write torn by the kill: half a line at the end.
    with open(out, "ab") as f:
        f.write(b'{"pk": [99999], "row": {"body": "')
    r = _cli([*args, "--json"], db_url, master_key_uri, tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert 250 < rep["resumed_after"] < 800 and rep["rows"] == 800 - rep["resumed_after"]
    assert _file_view(out) == _database_view(module, db_url, master_key_uri, P1)


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_one_patient_rows(app: tuple[str, ModuleType, str, str]) -> None:
    _, module, url, mk = app
    keys = carnet.KeyManager(url, master_key=mk)
    events: list[Any] = []
    auditor = Auditor(sink=events.append).install(keys)
    spec = [s for s in ex.tables_from_metadata(module.Base.metadata) if s.table == "notes"][0]
    assert spec.tenant_column == "practice_id"
    try:
        with principal_scope("dpo"):
            rows = ex.patient_rows(keys, spec, P1, {"patient_id": "pat-2"})
        auditor.flush()
    finally:
        keys.close()
        keys.engine.dispose()
    expected = [
        v
        for _, v in sorted(_database_view(module, url, mk, P1)["notes"].items())
        if v["patient_id"] == "pat-2"
    ]
    assert rows == expected and len(rows) > 2
    assert {(e.principal, e.field) for e in events} == {
        ("dpo", "notes.body"),
        ("dpo", "notes.summary"),
    }


@pytest.mark.parametrize("db_kind", ["sqlite", "mariadb"])
def test_export_by_table_name(app: tuple[str, ModuleType, str, str], tmp_path: Path) -> None:
    # No application module: the tables named, their encrypted columns found by their values.
    _, module, url, mk = app
    out = tmp_path / "notes.jsonl"
    r = _cli(
        ["export", "--tenant", P2, "--table", "notes", "--out", str(out), "--json"],
        url,
        mk,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tables"] == {"notes": 30}
    assert _file_view(out) == {"notes": _database_view(module, url, mk, P2)["notes"]}
