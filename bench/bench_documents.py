"""Peak memory of one EncryptedBytes document at the size limit (7.5 MiB), against a plain BLOB.

Each measurement runs in a fresh process: it creates the table (and, for a
read, writes the document first), then resets the kernel's high-water mark
(``/proc/self/clear_refs``), writes or reads one document of
``carnet.types_binary.MAX_BYTES`` random bytes, and reports how far its
resident set grew above where it stood just before (``VmHWM - VmRSS``), and
the peak of Python's own allocations (``tracemalloc``). The baseline is the
same statement on a plain binary column (``LargeBinary`` / ``LONGBLOB``) with
the same bytes. On SQLite, PostgreSQL and MariaDB (the database whose
``max_allowed_packet`` sets the limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import Row, mariadb_database, master_key_uri, postgres_database, row, temp_dir

ROOT = Path(__file__).resolve().parent.parent

_WORKER = r"""
import gc, json, os, sys, tracemalloc
import sqlalchemy as sa
import carnet
from carnet.types_binary import MAX_BYTES

url, mk, kind, phase = sys.argv[1:5]
engine = sa.create_engine(url)
keys = carnet.KeyManager(engine, master_key=mk)
keys.create_schema()
carnet.configure(keys)
blob = sa.LargeBinary().with_variant(sa.dialects.mysql.LONGBLOB(), "mysql", "mariadb")
md = sa.MetaData()
col = carnet.EncryptedBytes(tenant="practice_id") if kind == "carnet" else blob
t = sa.Table(f"letters_{kind}_{phase}", md, sa.Column("id", sa.Integer, primary_key=True),
             sa.Column("practice_id", sa.String(20)), sa.Column("scan", col))
md.create_all(engine)
doc = os.urandom(MAX_BYTES)
if phase == "read":
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1, "practice_id": "p1", "scan": doc}])
# Warm: the key is made and cached, connections open, statements compiled.
with carnet.tenant_scope("p1"), engine.begin() as conn:
    conn.execute(t.insert(), [{"id": 2, "practice_id": "p1", "scan": b"warm"}])
    conn.execute(sa.select(t.c.scan).where(t.c.id == 2)).scalar_one()

def status(name):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(name + ":"))

gc.collect()
try:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
before = status("VmRSS")
tracemalloc.start()
with carnet.tenant_scope("p1"), engine.begin() as conn:
    if phase == "write":
        conn.execute(t.insert(), [{"id": 3, "practice_id": "p1", "scan": doc}])
    else:
        got = conn.execute(sa.select(t.c.scan).where(t.c.id == 1)).scalar_one()
        assert got == doc
        del got
peak_py = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
print(json.dumps({"rss_kb": status("VmHWM") - before, "py": peak_py, "size": MAX_BYTES}))
"""


def _measure(url: str, mk: str, kind: str, phase: str) -> dict[str, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, url, mk, kind, phase],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _rows(db: str, url: str, mk: str) -> list[Row]:
    rows: list[Row] = []
    for phase in ("write", "read"):
        base = _measure(url, mk, "plain", phase)
        enc = _measure(url, mk, "carnet", phase)
        mib = 1024 * 1024
        size = enc["size"] / mib
        rows.append(
            row(
                f"{db}: {phase} one {size:g} MiB document, peak RSS growth",
                base["rss_kb"] / 1024,
                enc["rss_kb"] / 1024,
                "MiB",
                f"VmHWM - VmRSS before; {enc['rss_kb'] / 1024 / size:.1f}× the document "
                "(baseline: plain binary column)",
            )
        )
        rows.append(
            row(
                f"{db}: {phase} one {size:g} MiB document, Python peak",
                base["py"] / mib,
                enc["py"] / mib,
                "MiB",
                f"tracemalloc peak; {enc['py'] / mib / size:.1f}× the document",
            )
        )
    return rows


def run() -> list[Row]:
    rows: list[Row] = []
    with temp_dir() as d:
        mk = master_key_uri(d)
        rows += _rows("SQLite", f"sqlite:///{d / 'docs.db'}", mk)
        with postgres_database() as url:
            if url is not None:
                rows += _rows("PostgreSQL", url, mk)
        with mariadb_database() as url:
            if url is not None:
                rows += _rows("MariaDB", url, mk)
    return rows
