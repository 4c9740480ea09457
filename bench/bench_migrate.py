"""Migration of legacy plaintext notes on PostgreSQL (`carnet migrate run`).

1. Throughput: rows per second of the online, resumable, compare-and-set
   migration (seal + batch UPDATE + progress row per batch) against one plain
   SQL ``UPDATE`` of the same rows in a copy of the table (no encryption, one
   transaction, not online-safe: the floor of what the server can do).
2. What the application feels: latency of small concurrent writes to the same
   table (``UPDATE consultations SET reason = … WHERE id = …``, autocommit)
   while the migration runs, against the same writes on an idle database.

Rows: CARNET_BENCH_MIGRATE_ROWS (default 200000, times CARNET_BENCH_SCALE).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import sqlalchemy as sa

import carnet
from bench.common import Row, master_key_uri, postgres_database, row, scale, temp_dir
from carnet.migrate import resolve, run_migration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from legacy_practice.generate import populate  # noqa: E402


def _rows() -> int:
    return scale(int(os.environ.get("CARNET_BENCH_MIGRATE_ROWS", "200000")))


class Writer(threading.Thread):
    """Small application writes, one per transaction, at a steady pace; records latencies."""

    def __init__(self, engine: sa.Engine, n_rows: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.engine, self.n_rows, self.interval = engine, n_rows, interval
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        rng = random.Random(1)
        stmt = sa.text("UPDATE consultations SET reason = :r WHERE id = :i")
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not self.stop.is_set():
                params = {"r": f"suivi {rng.randrange(1000)}", "i": rng.randrange(1, self.n_rows)}
                t0 = time.perf_counter()
                conn.execute(stmt, params)
                self.latencies.append(time.perf_counter() - t0)
                time.sleep(self.interval)


def _pct(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] * 1000


def run() -> list[Row]:
    n = _rows()
    with postgres_database() as url, temp_dir() as d:
        if url is None:
            return [row("migrate (PostgreSQL)", None, None, "rows/s", "PostgreSQL unreachable")]
        engine = sa.create_engine(url)
        populate(
            engine,
            seed=1,
            practices_n=50,
            patients_n=max(10, n // 20),
            consultations_n=n,
            lookalike=False,
        )
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE consultations_copy AS SELECT * FROM consultations"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM ANALYZE"))
            t0 = time.perf_counter()
            plain = conn.execute(
                sa.text(
                    "UPDATE consultations_copy SET comment = 'carnet:' || comment "
                    "WHERE comment IS NOT NULL"
                )
            ).rowcount
            t_plain = time.perf_counter() - t0

        idle = Writer(engine, n)
        idle.start()
        time.sleep(5)
        idle.stop.set()
        idle.join()

        keys = carnet.KeyManager(engine, master_key=master_key_uri(d))
        keys.create_schema()
        target = resolve(engine, "consultations", "comment", tenant="patients.practice_id")
        busy = Writer(engine, n)
        busy.start()
        t0 = time.perf_counter()
        result = run_migration(keys, engine, target, batch_size=500)
        t_mig = time.perf_counter() - t0
        busy.stop.set()
        busy.join()
        keys.close()
        engine.dispose()

    sealed = result.report.rewritten
    rate_plain, rate_mig = plain / t_plain, sealed / t_mig
    where = f"{n} notes, PostgreSQL, batch 500, 1 worker"
    return [
        row(
            "migrate run: rows sealed per second",
            rate_plain,
            rate_mig,
            "rows/s",
            f"{where}; baseline: one plain UPDATE of the same rows in a copy "
            f"({t_plain:.1f} s); migration {t_mig:.1f} s incl. key creation, "
            f"{result.report.conflicts} concurrent writes kept",
            lower_is_better=False,
        ),
        row(
            "app write latency during migration, p50",
            _pct(idle.latencies, 50),
            _pct(busy.latencies, 50),
            "ms",
            f"UPDATE of one row of the same table every 10 ms; baseline idle "
            f"({len(idle.latencies)} writes), value during the run ({len(busy.latencies)})",
        ),
        row(
            "app write latency during migration, p99",
            _pct(idle.latencies, 99),
            _pct(busy.latencies, 99),
            "ms",
            "same writes, 99th percentile",
        ),
    ]


if __name__ == "__main__":
    for r in run():
        print(r)
