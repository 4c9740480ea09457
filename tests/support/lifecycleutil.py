"""Helpers for the batch, lifecycle and CLI tests: a notes table filled fast, run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import sqlalchemy as sa

import carnet
from carnet import envelope

SECRET = "PLANTED-SECRET-7f3a"


def notes_table(metadata: sa.MetaData, name: str = "notes") -> sa.Table:
    """The application's view: EncryptedText columns keyed by the row's practice."""
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64), nullable=False),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
        sa.Column("summary", carnet.EncryptedText(tenant="practice_id", storage="text")),
    )


def fill_notes(
    engine: sa.Engine,
    keys: carnet.KeyManager,
    n: int,
    tenants: Sequence[str] = ("p0", "p1", "p2"),
    *,
    start: int = 0,
    name: str = "notes",
) -> None:
    """Create the table and insert ``n`` notes sealed by ``keys`` (raw inserts: fast)."""
    md = sa.MetaData()
    notes_table(md, name)
    md.create_all(engine)
    raw = sa.table(
        name,
        sa.column("id"),
        sa.column("practice_id"),
        sa.column("body", sa.LargeBinary),
        sa.column("summary", sa.Text),
    )
    rows = []
    for i in range(start, start + n):
        t = tenants[i % len(tenants)]
        rows.append(
            {
                "id": i,
                "practice_id": t,
                "body": keys.encrypt(f"{SECRET} body {i}".encode(), tenant=t, label=f"{name}.body"),
                "summary": envelope.to_text(
                    keys.encrypt(
                        f"{SECRET} summary {i}".encode(), tenant=t, label=f"{name}.summary"
                    )
                ),
            }
        )
        if len(rows) == 1000:
            with engine.begin() as conn:
                conn.execute(raw.insert(), rows)
            rows = []
    if rows:
        with engine.begin() as conn:
            conn.execute(raw.insert(), rows)


def read_notes(
    engine: sa.Engine,
    keys: carnet.KeyManager,
    column: str = "body",
    label: str | None = None,
    name: str = "notes",
) -> dict[int, tuple[str, bytes]]:
    """{id: (plaintext, key id)} decrypting every row with its practice's key."""
    raw = sa.table(
        name,
        sa.column("id"),
        sa.column("practice_id"),
        sa.column(column, sa.LargeBinary if column == "body" else sa.Text),
    )
    out = {}
    with engine.connect() as conn:
        for id_, t, v in conn.execute(sa.select(raw.c.id, raw.c.practice_id, raw.c[column])):
            blob = envelope.from_text(v) if isinstance(v, str) else bytes(v)
            pt = keys.decrypt(blob, tenant=t, label=label or f"{name}.{column}").decode()
            out[id_] = (pt, envelope.key_id_of(blob))
    return out


def active_key_ids(keys: carnet.KeyManager) -> set[bytes]:
    return {r.key_id for r in keys.list_keys() if r.state == "active"}


def run_cli(
    args: Sequence[str],
    *,
    db_url: str,
    master_key: str | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m carnet`` as a real subprocess."""
    env = dict(os.environ)
    env["CARNET_DATABASE_URL"] = db_url
    if master_key is not None:
        env["CARNET_MASTER_KEY"] = master_key
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "carnet", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def popen_cli(args: Sequence[str], *, db_url: str, master_key: str) -> subprocess.Popen[str]:
    env = dict(os.environ, CARNET_DATABASE_URL=db_url, CARNET_MASTER_KEY=master_key)
    return subprocess.Popen(
        [sys.executable, "-m", "carnet", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
