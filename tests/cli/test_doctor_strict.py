"""`carnet doctor --app` warns when the application's key managers run without strict mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from support.lifecycleutil import fill_notes, run_cli

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import carnet


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
"""

SETUPS = {
    # carnet.configure at import, in strict mode: what the docs start web applications with.
    "strict": MODELS + "\ncarnet.configure(carnet.KeyManager.from_env(), require_scope=True)\n",
    # A module-level manager, strict mode forgotten.
    "lax": MODELS + "\nkeys = carnet.KeyManager.from_env()\ncarnet.configure(keys)\n",
    # A strict default and a second, lax manager beside it.
    "mixed": MODELS
    + "\ncarnet.configure(carnet.KeyManager.from_env(), require_scope=True)\n"
    + "replica_keys = carnet.KeyManager.from_env(read_only=True)\n",
    # Nothing configured at import (an application factory does it later).
    "factory": MODELS,
}


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_app_strict_mode(db_url: str, master_key_uri: str, tmp_path: Path, setup: str) -> None:
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    fill_notes(engine, keys, 6)
    keys.close()
    engine.dispose()
    name = f"clinic_{setup}"
    (tmp_path / f"{name}.py").write_text(SETUPS[setup])
    env = {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run_cli(
        ["doctor", "--json", "--app", f"{name}:Base"],
        db_url=db_url,
        master_key=master_key_uri,
        extra_env=env,
    )
    rep = json.loads(r.stdout)
    (check,) = [c for c in rep["checks"] if c["name"] == "app_strict_mode"]
    if setup == "strict":
        assert check["status"] == "ok", check
    else:
        assert check["status"] == "warn", check
        assert "require_scope=True" in check["fix"]
    if setup in ("lax", "mixed"):
        assert "without strict mode" in check["message"]
        assert check["message"].startswith("1 of the application's key managers")
    if setup == "factory":
        assert "strict mode not seen" in check["message"]
    text = run_cli(
        ["doctor", "--app", f"{name}:Base"], db_url=db_url, master_key=master_key_uri, extra_env=env
    )
    assert text.returncode == r.returncode
    assert ("[warn] app_strict_mode" in text.stdout) == (setup != "strict")
