"""The shared decrypt budget against real processes: four scrapers of one principal,
two engines each, on the database store and on Redis; a burst across window
boundaries; a worker SIGKILLed holding a reservation.

The guarantee under test (docs/audit.md, "One budget for every process"): at
most ``limit`` disclosures by one principal in any interval of ``window``
seconds, whatever the processes; and honest use is not starved: at least
``limit - processes * block`` in a window when they read until refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from support.models import Note, configured_keys

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/0"

STORES = [
    pytest.param("sqlite", "sql", id="sql-sqlite"),
    pytest.param("postgresql", "sql", id="sql-postgresql", marks=pytest.mark.db),
    pytest.param("mariadb", "sql", id="sql-mariadb", marks=pytest.mark.db),
    pytest.param("sqlite", "redis", id="redis"),
]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}"}


def _store(kind: str, db_url: str) -> str:
    # "sql": the budget lives in the application's (and the audit trail's) database.
    return db_url if kind == "sql" else REDIS


def _seed(engine: sa.Engine, master: str, n: int = 20) -> None:
    with configured_keys(engine, master), Session(engine) as s:
        s.add_all(
            Note(id=i, practice_id=f"p{i % 2}", body=f"PLANTED-budget-{i}") for i in range(1, n + 1)
        )
        s.commit()


def _spawn(
    db_url: str,
    master: str,
    store: str,
    principal: str,
    out: Path,
    *,
    limit: int,
    window: float,
    block: int,
    lease: float,
    seconds: float,
    stop: str,
) -> subprocess.Popen[bytes]:
    args = [db_url, master, store, principal, limit, window, block, lease, seconds, stop, out]
    return subprocess.Popen(
        [sys.executable, "-m", "support.budget_proc", *map(str, args)],
        env=_env(),
        cwd=ROOT,
    )


def _reads(out: Path) -> list[tuple[float, float]]:
    if not out.exists():
        return []
    spans = []
    for line in out.read_text().splitlines():
        if line != "ready":
            a, b = line.split()
            spans.append((float(a), float(b)))
    return spans


def _most_in_any_window(spans: list[tuple[float, float]], window: float) -> int:
    """The most reads certainly inside one interval of ``window`` seconds.

    A read is counted in an interval when its whole (before, after) span is
    inside it: a lower bound of the true count, so this never overstates.
    The worst interval starts at some read's ``before``.
    """
    spans = sorted(spans)
    best = 0
    for start, _ in spans:
        n = sum(1 for a, b in spans if a >= start and b < start + window)
        best = max(best, n)
    return best


def _wait(procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> None:
    for p in procs:
        assert p.wait(timeout=timeout) == 0


@pytest.mark.parametrize(("db_kind", "store_kind"), STORES)
def test_four_scrapers_share_one_budget(
    engine: sa.Engine, db_url: str, master_key_uri: str, tmp_path: Path, store_kind: str
) -> None:
    _seed(engine, master_key_uri)
    limit, block = 400, 20
    principal = f"scraper-{uuid.uuid4().hex[:8]}"
    outs = [tmp_path / f"w{i}.txt" for i in range(4)]
    procs = [
        _spawn(
            db_url,
            master_key_uri,
            _store(store_kind, db_url),
            principal,
            out,
            limit=limit,
            window=120,
            block=block,
            lease=10,
            seconds=60,
            stop="refused",
        )
        for out in outs
    ]
    _wait(procs)
    per = [len(_reads(o)) for o in outs]
    total = sum(per)
    # Exact above; below by at most one unused block per process.
    assert total <= limit, per
    assert total >= limit - 4 * block, per


@pytest.mark.parametrize(("db_kind", "store_kind"), STORES)
def test_a_burst_across_window_boundaries(
    engine: sa.Engine, db_url: str, master_key_uri: str, tmp_path: Path, store_kind: str
) -> None:
    _seed(engine, master_key_uri)
    limit, window, block, lease = 120, 2.0, 10, 0.25
    principal = f"burst-{uuid.uuid4().hex[:8]}"
    outs = [tmp_path / f"w{i}.txt" for i in range(4)]
    procs = [
        _spawn(
            db_url,
            master_key_uri,
            _store(store_kind, db_url),
            principal,
            out,
            limit=limit,
            window=window,
            block=block,
            lease=lease,
            seconds=7,
            stop="deadline",
        )
        for out in outs
    ]
    _wait(procs)
    spans = [s for o in outs for s in _reads(o)]
    # Every interval of the window, wherever it starts (across the boundaries
    # a fixed-slot counter would reset at), holds at most the limit.
    assert _most_in_any_window(spans, window) <= limit
    # Not starved: over the run, the workers kept getting reads window after
    # window (at least three full budgets in 7 s of a 2.25 s span).
    assert len(spans) >= 3 * (limit - 4 * block)


@pytest.mark.parametrize(("db_kind", "store_kind"), STORES)
def test_a_killed_worker_neither_leaks_nor_doubles_its_reservation(
    engine: sa.Engine, db_url: str, master_key_uri: str, tmp_path: Path, store_kind: str
) -> None:
    _seed(engine, master_key_uri)
    limit, window, block, lease = 200, 12.0, 20, 0.5
    principal = f"killed-{uuid.uuid4().hex[:8]}"
    store = _store(store_kind, db_url)
    common = {
        "limit": limit,
        "window": window,
        "block": block,
        "lease": lease,
    }
    victim_out = tmp_path / "victim.txt"
    spawned = time.time()
    # The victim reads slowly forever; it is killed holding a block.
    victim = _spawn(
        db_url, master_key_uri, store, principal, victim_out, seconds=600, stop="deadline", **common
    )
    deadline = time.time() + 60
    while "ready" not in (victim_out.read_text() if victim_out.exists() else ""):
        assert time.time() < deadline and victim.poll() is None
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    outs = [tmp_path / f"w{i}.txt" for i in range(3)]
    procs = [
        _spawn(db_url, master_key_uri, store, principal, out, seconds=60, stop="refused", **common)
        for out in outs
    ]
    _wait(procs)
    victim_reads = len(_reads(victim_out))
    others = sum(len(_reads(o)) for o in outs)
    # No leak: the killed worker's reservation still counts (the total stays
    # within the limit); no double count: the others lose at most the unused
    # part of its block, plus one block each.
    assert victim_reads + others <= limit
    assert victim_reads + others >= limit - 4 * block
    done = time.time()
    # A restarted worker is refused while every reservation still counts (the
    # oldest, the victim's, was granted after it was spawned)...
    again = tmp_path / "again.txt"
    _wait(
        [
            _spawn(
                db_url,
                master_key_uri,
                store,
                principal,
                again,
                seconds=30,
                stop="refused",
                **common,
            )
        ]
    )
    if time.time() < spawned + window:
        assert _reads(again) == []
    # ...and the budget comes back once the reservations age out.
    time.sleep(max(0.0, done + window + lease + 0.5 - time.time()))
    later = tmp_path / "later.txt"
    _wait(
        [
            _spawn(
                db_url,
                master_key_uri,
                store,
                principal,
                later,
                seconds=30,
                stop="refused",
                **common,
            )
        ]
    )
    assert len(_reads(later)) >= limit - block
