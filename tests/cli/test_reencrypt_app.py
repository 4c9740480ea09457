"""``carnet reencrypt --app`` / ``--all``: every encrypted column in one resumable run, as a
subprocess; ``keys retire`` naming what still blocks it; ``status`` bounding its job list."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet import envelope, lifecycle
from carnet import jobs as _jobs
from support.lifecycleutil import SECRET

APP = textwrap.dedent(
    """
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    import carnet


    class Base(DeclarativeBase):
        pass


    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        practice_id: Mapped[str] = mapped_column(sa.String(64))
        body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
        summary: Mapped[str | None] = mapped_column(
            carnet.EncryptedText(tenant="practice_id", storage="text")
        )


    class Letter(Base):
        __tablename__ = "letters"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        practice_id: Mapped[str] = mapped_column(sa.String(64))
        # Renamed once: the label keeps old values opening.
        content: Mapped[str | None] = mapped_column(
            carnet.EncryptedText(tenant="practice_id", label="courriers.texte")
        )
    """
)
TENANTS = ("p0", "p1", "p2")
COLUMNS = [("notes", "body"), ("notes", "summary"), ("letters", "content")]


def _load_app(directory: Path, name: str) -> ModuleType:
    path = directory / f"{name}.py"
    path.write_text(APP)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _cli(
    args: list[str], db_url: str, mk: str, cwd: Path, **kw: object
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CARNET_DATABASE_URL=db_url, CARNET_MASTER_KEY=mk)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return subprocess.run(
        [sys.executable, "-m", "carnet", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def app(
    db_url: str, master_key_uri: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[str, ModuleType, str, str]:
    """The application module (in tmp_path), its tables filled under the first keys."""
    name = "clinic_" + request.node.callspec.id.replace("-", "_")
    module = _load_app(tmp_path, name)
    keys = carnet.KeyManager(db_url, master_key=master_key_uri)
    keys.create_schema()
    module.Base.metadata.create_all(keys.engine)
    with Session(keys.engine) as s:
        carnet.configure(keys)
        try:
            for i in range(300):
                t = TENANTS[i % 3]
                s.add(module.Note(id=i, practice_id=t, body=f"{SECRET} b{i}", summary=f"s{i}"))
                if i % 2:
                    s.add(module.Letter(id=i, practice_id=t, content=f"{SECRET} l{i}"))
            s.commit()
        finally:
            carnet.configure(None)
    keys.close()
    keys.engine.dispose()
    return name, module, db_url, master_key_uri


def _key_ids(db_url: str) -> dict[tuple[str, str], set[bytes]]:
    """Key ids named by the stored values, per column."""
    engine = sa.create_engine(db_url)
    out: dict[tuple[str, str], set[bytes]] = {}
    try:
        with engine.connect() as c:
            for t, col in COLUMNS:
                vals = c.execute(sa.text(f"SELECT {col} FROM {t}")).scalars()
                out[(t, col)] = {
                    envelope.key_id_of(envelope.from_text(v) if isinstance(v, str) else bytes(v))
                    for v in vals
                }
    finally:
        engine.dispose()
    return out


def _read_all(module: ModuleType, db_url: str, mk: str) -> dict[str, list[tuple[object, ...]]]:
    keys = carnet.KeyManager(db_url, master_key=mk)
    carnet.configure(keys)
    try:
        with Session(keys.engine) as s:
            return {
                "notes": [
                    (n.id, n.body, n.summary)
                    for n in s.scalars(sa.select(module.Note).order_by(module.Note.id))
                ],
                "letters": [
                    (n.id, n.content)
                    for n in s.scalars(sa.select(module.Letter).order_by(module.Letter.id))
                ],
            }
    finally:
        carnet.configure(None)
        keys.close()
        keys.engine.dispose()


def test_reencrypt_app_then_retire(app: tuple[str, ModuleType, str, str], tmp_path: Path) -> None:
    name, module, url, mk = app
    before = _read_all(module, url, mk)
    old = _key_ids(url)[("notes", "body")]
    assert len(old) == 3
    r = _cli(["keys", "rotate", "--all"], url, mk, tmp_path)
    assert r.returncode == 0, r.stderr

    # retire names every column still holding values under the key, and the command.
    victim = sorted(old)[0].hex()
    r = _cli(["keys", "retire", victim], url, mk, tmp_path)
    assert r.returncode == 5, r.stderr
    for t, c in COLUMNS:
        assert f"in {t}.{c}" in r.stderr
        assert f"carnet reencrypt --table {t} --column {c}" in r.stderr
    assert "--app" in r.stderr

    # One command, one progress line at its end, every declared column.
    r = _cli(["reencrypt", "--app", f"{name}:Base", "--batch-size", "40"], url, mk, tmp_path)
    assert r.returncode == 0, r.stderr
    finals = [ln for ln in r.stderr.splitlines() if "(100 %)" in ln]
    assert len(finals) == 1 and "750/750 rows" in finals[0], r.stderr
    assert "3 columns: 750 scanned, 750 re-encrypted" in r.stdout, r.stdout
    assert SECRET not in r.stdout + r.stderr
    after = _key_ids(url)
    assert all(not (ids & old) for ids in after.values()), after
    assert _read_all(module, url, mk) == before

    # Nothing blocks the retirement any more.
    r = _cli(["keys", "retire", victim, "--json"], url, mk, tmp_path)
    assert r.returncode == 0, r.stderr
    # A second run is a fresh pass with nothing to move.
    r = _cli(["reencrypt", "--all", "--json"], url, mk, tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["resumed"] is False
    assert {(c["table"], c["column"]) for c in rep["columns"]} == set(COLUMNS)
    assert rep["total"]["rewritten"] == 0 and rep["total"]["already_current"] == 750


def test_reencrypt_app_killed_then_resumed(
    app: tuple[str, ModuleType, str, str], tmp_path: Path
) -> None:
    name, module, url, mk = app
    before = _read_all(module, url, mk)
    assert _cli(["keys", "rotate", "--all"], url, mk, tmp_path).returncode == 0
    engine = sa.create_engine(url)
    env = dict(os.environ, CARNET_DATABASE_URL=url, CARNET_MASTER_KEY=mk)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "carnet", "reencrypt", "--app", f"{name}:Base", "--batch-size", "3"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # SIGKILL once the first column (tables in dependency, then name, order:
        # letters.content) is finished and the second has begun.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _jobs.job_finished(engine, "reencrypt:letters.content"):
                p = _jobs.job_progress(engine, "reencrypt:notes.body")
                if p["scanned"] > 0:
                    break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _jobs.run_state(engine, "reencrypt:app") is False
        body_done = _jobs.job_progress(engine, "reencrypt:notes.body")["scanned"]
        assert 0 < body_done < 300
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        engine.dispose()

    r = _cli(["reencrypt", "--app", f"{name}:Base", "--json"], url, mk, tmp_path)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["resumed"] is True
    outcomes = {(c["table"], c["column"]): c for c in rep["columns"]}
    assert [(c["table"], c["column"]) for c in rep["columns"]] == sorted(COLUMNS)
    assert outcomes[("letters", "content")]["outcome"] == "done"
    body = outcomes[("notes", "body")]["report"]
    assert body["resumed_from"] is not None
    assert body["scanned"] == 300 - body_done
    assert outcomes[("notes", "summary")]["report"]["rewritten"] == 300
    actives = {
        r.key_id for r in carnet.KeyManager(url, master_key=mk).list_keys() if r.state == "active"
    }
    assert all(ids <= actives for ids in _key_ids(url).values())
    assert _read_all(module, url, mk) == before
    # The run is finished: the next one is a fresh pass.
    r = _cli(["reencrypt", "--app", f"{name}:Base", "--json"], url, mk, tmp_path)
    assert json.loads(r.stdout)["resumed"] is False


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_usage_errors(app: tuple[str, ModuleType, str, str], tmp_path: Path) -> None:
    name, _, url, mk = app
    for args in (
        ["reencrypt"],
        ["reencrypt", "--all", "--app", f"{name}:Base"],
        ["reencrypt", "--table", "notes", "--all"],
        ["reencrypt", "--all", "--workers", "2"],
        ["reencrypt", "--table", "notes"],
    ):
        r = _cli(args, url, mk, tmp_path)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("carnet: error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_status_lists_the_last_finished_jobs(
    app: tuple[str, ModuleType, str, str], tmp_path: Path
) -> None:
    name, _, url, mk = app
    keys = carnet.KeyManager(url, master_key=mk)
    try:
        for i in range(12):
            lifecycle.reencrypt(
                keys, "letters", "content", label="courriers.texte", job=f"j{i:02d}"
            )
        _jobs.start_run(keys.engine, "left-unfinished")
        rep = lifecycle.status(keys, [("letters", "content")], finished_jobs=4)
    finally:
        keys.close()
        keys.engine.dispose()
    listed = {j["job"] for j in rep.jobs}
    # Every unfinished job, and the four most recent finished (ties broken by name).
    assert "left-unfinished" in listed
    assert len(listed) == 5 and rep.finished_jobs_hidden == 8
    r = _cli(["status", "--table", "letters", "--column", "content"], url, mk, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "(2 older finished jobs not listed; --jobs N lists more)" in r.stdout
    r = _cli(["status", "--jobs", "0", "--json"], url, mk, tmp_path)
    st = json.loads(r.stdout)
    assert [j["job"] for j in st["jobs"]] == ["left-unfinished"]
    assert st["finished_jobs_hidden"] == 12
