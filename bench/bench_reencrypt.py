"""Re-encryption, parallel workers, memory and master rotation on PostgreSQL.

Sizes by environment (defaults are the full figures):
CARNET_BENCH_ROWS (200000), CARNET_BENCH_BIG_ROWS (1000000),
CARNET_BENCH_PRACTICES (10000), CARNET_BENCH_PG_URL (administrative URL).
Quick run: CARNET_BENCH_ROWS=5000 CARNET_BENCH_BIG_ROWS=25000 CARNET_BENCH_PRACTICES=300.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from typing import Any

import sqlalchemy as sa

import carnet
from carnet import lifecycle
from carnet._engines import make_engine

ADMIN = os.environ.get("CARNET_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROWS = int(os.environ.get("CARNET_BENCH_ROWS", "200000"))
BIG = int(os.environ.get("CARNET_BENCH_BIG_ROWS", "1000000"))
PRACTICES = int(os.environ.get("CARNET_BENCH_PRACTICES", "10000"))
BATCH = 500
TENANTS = [f"p{i}" for i in range(50)]

# A worker process that re-encrypts the table and reports its own peak RSS.
_WORKER = """
import json, sys
from carnet import lifecycle
url, mk = sys.argv[1:3]
keys = lifecycle.open_manager(url, mk)
rep = lifecycle.reencrypt(keys, "notes", "body", batch_size=int(sys.argv[3]), restart=True)
# VmHWM, not getrusage's ru_maxrss: Linux carries the forking parent's high-water
# mark across fork+exec into ru_maxrss, which would report the bench's own size.
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"rewritten": rep.rewritten, "maxrss_kb": hwm}))
"""


def _make_db() -> str:
    name = "carnet_bench_" + secrets.token_hex(4)
    eng = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name} TEMPLATE template0"))
    eng.dispose()
    return sa.engine.make_url(ADMIN).set(database=name).render_as_string(hide_password=False)


def _drop_db(url: str) -> None:
    name = sa.engine.make_url(url).database
    eng = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    eng.dispose()


def _fill(engine: sa.Engine, keys: carnet.KeyManager, start: int, n: int) -> None:
    md = sa.MetaData()
    t = sa.Table(
        "notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64)),
        sa.Column("body", sa.LargeBinary),
    )
    md.create_all(engine)
    text = b"x" * 400  # a typical consultation note
    for lo in range(start, start + n, 10_000):
        rows = [
            {
                "id": i,
                "practice_id": TENANTS[i % len(TENANTS)],
                "body": keys.encrypt(text, tenant=TENANTS[i % len(TENANTS)], label="notes.body"),
            }
            for i in range(lo, min(lo + 10_000, start + n))
        ]
        with engine.begin() as c:
            c.execute(t.insert(), rows)


def _plain_update(engine: sa.Engine) -> float:
    """The baseline: same keyset batches, same row-by-row UPDATE by primary key, no crypto.

    Each row is written back with its own value: PostgreSQL still writes a new
    tuple, and the values stay carnet ciphertext for the runs that follow.
    """
    t = sa.table("notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    stmt = t.update().where(t.c.id == sa.bindparam("k")).values(body=sa.bindparam("v"))
    last = -1
    n = 0
    t0 = time.perf_counter()
    with engine.connect() as c:
        while True:
            rows = c.execute(
                sa.select(t.c.id, t.c.body).where(t.c.id > last).order_by(t.c.id).limit(BATCH)
            ).all()
            c.commit()
            if not rows:
                break
            with c.begin():
                c.execute(stmt, [{"k": r.id, "v": bytes(r.body)} for r in rows])
            n += len(rows)
            last = rows[-1].id
    return n / (time.perf_counter() - t0)


def _rss_run(url: str, mk: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _WORKER, url, mk, str(BATCH)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(out)["maxrss_kb"])


def run() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    url = _make_db()
    tmp = tempfile.mkdtemp(prefix="carnet_bench_")
    mk = "file://" + os.path.join(tmp, "m.key")
    carnet.create_master_key(mk).close()
    try:
        engine = make_engine(url)
        keys = lifecycle.open_manager(engine, mk)
        lifecycle.init(keys)
        _fill(engine, keys, 0, ROWS)
        with engine.begin() as c:
            c.execute(sa.text("ANALYZE notes"))
        base = _plain_update(engine)
        lifecycle.rotate_keys(keys)
        t0 = time.perf_counter()
        rep = lifecycle.reencrypt(keys, "notes", "body", batch_size=BATCH)
        rate = rep.rewritten / (time.perf_counter() - t0)
        out.append(
            {
                "name": f"reencrypt throughput, {ROWS} notes, 1 worker",
                "baseline": round(base),
                "value": round(rate),
                "ratio": round(rate / base, 3),
                "unit": "rows/s",
                "notes": "baseline: plain UPDATE by pk in the same 500-row keyset batches; "
                "target ratio >= 0.5",
            }
        )
        lifecycle.rotate_keys(keys)
        spec = lifecycle.WorkerSpec(
            url, mk, (), "notes", "body", None, None, None, BATCH, "bench2", True
        )
        t0 = time.perf_counter()
        rep2 = lifecycle.reencrypt_parallel(spec, 2)
        rate2 = rep2.rewritten / (time.perf_counter() - t0)
        out.append(
            {
                "name": f"reencrypt throughput, {ROWS} notes, 2 workers",
                "baseline": round(base),
                "value": round(rate2),
                "ratio": round(rate2 / base, 3),
                "unit": "rows/s",
                "notes": "2 processes on disjoint key ranges, 2-core machine, includes "
                "process start-up",
            }
        )
        lifecycle.rotate_keys(keys)
        rss_small = _rss_run(url, mk)
        _fill(engine, keys, ROWS, BIG - ROWS)
        lifecycle.rotate_keys(keys)
        rss_big = _rss_run(url, mk)
        out.append(
            {
                "name": f"reencrypt worker peak RSS, {BIG} vs {ROWS} rows",
                "baseline": rss_small,
                "value": rss_big,
                "ratio": round(rss_big / rss_small, 3),
                "unit": "KiB",
                "notes": "VmHWM of the worker process; target ratio <= 1.2",
            }
        )
        with engine.begin() as c:
            c.execute(sa.text("DELETE FROM carnet_keys"))
        keys.clear_cache()
        t0 = time.perf_counter()
        for i in range(PRACTICES):
            keys.ensure_key(f"practice-{i}")
        create = time.perf_counter() - t0
        mk2 = "file://" + os.path.join(tmp, "m2.key")
        carnet.create_master_key(mk2).close()
        t0 = time.perf_counter()
        rw = lifecycle.rotate_master(keys, mk2)
        secs = time.perf_counter() - t0
        out.append(
            {
                "name": f"master rotate, {PRACTICES} practices' DEKs",
                "baseline": None,
                "value": round(secs, 2),
                "ratio": None,
                "unit": "s",
                "notes": f"{rw.rewrapped} rewrapped ({rw.rewrapped / secs:.0f} keys/s, "
                f"file master key); creating them took {create:.1f}s",
            }
        )
        keys.close()
        engine.dispose()
    finally:
        _drop_db(url)
    return out


if __name__ == "__main__":
    for row in run():
        print(json.dumps(row))
