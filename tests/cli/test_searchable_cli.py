"""``carnet keys rotate --index`` and ``carnet reindex``, as an operator runs them.

Each command runs as a subprocess of the real ``carnet`` entry point, against
an application model module written to a directory (imported by ``reindex``
as ``models:Patient.phone_bidx``), on every backend: rotate a practice's index
root, re-index it, retire the old root; lookups find every patient at each
step; exit codes follow docs/cli.md; no phone number in any output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from support.paths import ROOT

SRC = ROOT / "src"

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import carnet
from carnet import transforms


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    phone: Mapped[str] = mapped_column(carnet.EncryptedString(20, tenant="practice_id"))
    phone_bidx = carnet.BlindIndex("phone", transform=transforms.phone_fr, bits=4)
"""


def phone(i: int) -> str:
    return f"06 39 98 {i // 100:02d} {i % 100:02d}"


@pytest.fixture
def app(tmp_path: Path, engine: sa.Engine, master_key_uri: str) -> Any:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "models.py").write_text(MODELS)
    sys.path.insert(0, str(tmp_path / "app"))
    sys.modules.pop("models", None)
    import models  # type: ignore[import-not-found]

    models.Base.metadata.create_all(engine)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    carnet.configure(keys)
    with Session(engine) as s:
        s.add_all(
            models.Patient(id=i, practice_id="p1" if i % 3 else "p2", phone=phone(i))
            for i in range(1, 31)
        )
        s.commit()
    yield models
    carnet.configure(None)
    keys.close()
    sys.path.remove(str(tmp_path / "app"))
    sys.modules.pop("models", None)


def run(db_url: str, mk: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CARNET_DATABASE_URL": db_url,
        "CARNET_MASTER_KEY": mk,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "carnet", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def all_found(engine: sa.Engine, mk: str, models: Any) -> bool:
    # A new manager each time: no cached roots from before the command.
    keys = carnet.KeyManager(engine, master_key=mk)
    carnet.configure(keys)
    try:
        with Session(engine) as s:
            for i in range(1, 31):
                tenant = "p1" if i % 3 else "p2"
                got = carnet.search(s, models.Patient.phone_bidx, phone(i).replace(" ", ""),
                                    tenant=tenant)  # fmt: skip
                if [p.id for p in got] != [i]:
                    return False
        return True
    finally:
        keys.close()


def roots(engine: sa.Engine, mk: str, tenant: str) -> list[tuple[int, str, str]]:
    keys = carnet.KeyManager(engine, master_key=mk)
    try:
        return sorted(
            (r.version, r.state, r.key_id.hex())
            for r in keys.list_keys(tenant)
            if r.kind == "index"
        )
    finally:
        keys.close()


def test_rotate_reindex_retire(
    app: Any, engine: sa.Engine, db_url: str, master_key_uri: str, tmp_path: Path
) -> None:
    cwd = tmp_path / "app"
    outputs: list[str] = []

    def carnet_cmd(*args: str) -> subprocess.CompletedProcess[str]:
        proc = run(db_url, master_key_uri, cwd, *args)
        outputs.extend((proc.stdout, proc.stderr))
        return proc

    ((old_v, _, old_id),) = roots(engine, master_key_uri, "p1")
    res = carnet_cmd("keys", "rotate", "--index", "--tenant", "p1")
    assert res.returncode == 0, res.stderr
    assert "p1: index root now v2" in res.stdout and old_id in res.stdout
    assert [(v, s) for v, s, _ in roots(engine, master_key_uri, "p1")] == [
        (1, "inactive"), (2, "active"),
    ]  # fmt: skip
    # The data key did not move; p2's root did not either.
    assert [(v, s) for v, s, _ in roots(engine, master_key_uri, "p2")] == [(1, "active")]
    assert all_found(engine, master_key_uri, app)  # old root still serves lookups

    res = carnet_cmd("reindex", "--index", "models:Patient.phone_bidx", "--tenant", "p1",
                     "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    (rep,) = json.loads(res.stdout)
    assert rep["tenant"] == "p1" and rep["rewritten"] + rep["skipped"] == 20
    assert rep["rewritten"] > 0 and rep["failed"] == []
    assert all_found(engine, master_key_uri, app)

    res = carnet_cmd("keys", "retire", old_id, "--yes")
    assert res.returncode == 0, res.stderr
    # Only the new root is left to compute lookups with: every row was re-indexed.
    assert [(v, s) for v, s, _ in roots(engine, master_key_uri, "p1")] == [
        (1, "retired"), (2, "active"),
    ]  # fmt: skip
    assert all_found(engine, master_key_uri, app)

    # --all: every practice with an index root, in JSON.
    res = carnet_cmd("keys", "rotate", "--index", "--all", "--json")
    assert res.returncode == 0, res.stderr
    assert sorted((r["tenant"], r["version"]) for r in json.loads(res.stdout)) == [
        ("p1", 3), ("p2", 2),
    ]  # fmt: skip
    res = carnet_cmd("reindex", "--index", "models:Patient.phone_bidx", "--all-tenants")
    assert res.returncode == 0, res.stderr
    assert "models:Patient.phone_bidx p2: 10 scanned" in res.stdout
    assert all_found(engine, master_key_uri, app)

    # Exit codes of docs/cli.md.
    assert carnet_cmd("keys", "rotate", "--index").returncode == 2  # neither --tenant nor --all
    assert carnet_cmd("keys", "rotate", "--index", "--tenant", "p9").returncode == 7
    assert carnet_cmd("reindex", "--index", "models:Patient.phone_bidx").returncode == 2
    assert carnet_cmd("reindex", "--index", "models:Patient.nope", "--tenant", "p1").returncode == 2
    destroyed = carnet_cmd("keys", "destroy", "--tenant", "p2", "--yes")
    assert destroyed.returncode == 0, destroyed.stderr
    assert carnet_cmd("keys", "rotate", "--index", "--tenant", "p2").returncode == 8
    assert carnet_cmd("reindex", "--index", "models:Patient.phone_bidx", "--tenant",
                      "p2").returncode == 8  # fmt: skip
    res = carnet_cmd("reindex", "--index", "models:Patient.phone_bidx", "--all-tenants")
    assert res.returncode == 0 and "p2: destroyed" in res.stdout

    text = "\n".join(outputs)
    for i in range(1, 31):
        assert phone(i) not in text and phone(i).replace(" ", "") not in text
