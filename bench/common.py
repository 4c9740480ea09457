"""Helpers shared by the benchmark modules: timing, rows, machine facts, databases."""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import sqlalchemy as sa

Row = dict[str, Any]

POSTGRES_ADMIN_URL = os.environ.get(
    "CARNET_BENCH_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MARIADB_ADMIN_URL = os.environ.get(
    "CARNET_BENCH_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
)


def row(
    name: str,
    baseline: float | None,
    value: float | None,
    unit: str,
    notes: str = "",
    *,
    target: float | None = None,
    lower_is_better: bool = True,
) -> Row:
    """A result row; ``ratio`` is value / baseline. With ``target``, notes say whether it is met."""
    ratio = value / baseline if value is not None and baseline else None
    if target is not None and ratio is not None:
        met = ratio <= target if lower_is_better else ratio >= target
        sign = "≤" if lower_is_better else "≥"
        verdict = f"target {sign} {target:g}×: {'met' if met else 'MISSED'}"
        notes = f"{verdict}; {notes}" if notes else verdict
    return {
        "name": name,
        "baseline": baseline,
        "value": value,
        "ratio": ratio,
        "unit": unit,
        "notes": notes,
    }


def scale(n: int) -> int:
    """``n`` times CARNET_BENCH_SCALE (default 1): a smoke run uses e.g. 0.05."""
    factor = float(os.environ.get("CARNET_BENCH_SCALE", "1"))
    return max(1, int(n * factor))


def repeats(n: int) -> int:
    return max(1, int(os.environ.get("CARNET_BENCH_REPEATS", n)))


def clock_name() -> str:
    """``cpu`` (default) or ``wall``, from CARNET_BENCH_CLOCK.

    CPU time of this process is the default because the machines running the
    benchmarks are shared: other jobs inflate wall-clock time at random, not
    CPU time. Everything carnet does happens in this process; what CPU time
    leaves out is a database server's own work (PostgreSQL), which both sides
    of a comparison share, so PostgreSQL ratios in CPU time overstate carnet's
    share of what a user waits for.
    """
    name = os.environ.get("CARNET_BENCH_CLOCK", "cpu")
    if name not in ("cpu", "wall"):
        raise ValueError("CARNET_BENCH_CLOCK must be 'cpu' or 'wall'")
    return name


def timed(fn: Callable[[], object]) -> float:
    """Seconds taken by one call, with the garbage collector held off as timeit does."""
    clock = time.process_time if clock_name() == "cpu" else time.perf_counter
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = clock()
        fn()
        return clock() - t0
    finally:
        if was_enabled:
            gc.enable()


def interleaved_medians(
    cases: dict[str, tuple[Callable[[], object] | None, Callable[[], object]]], n: int
) -> dict[str, float]:
    """Median seconds of each case's body over ``n`` rounds.

    Cases run in turn within each round, so that drift (CPU frequency, page
    cache, a neighbour's load) hits every side of a comparison alike. Each
    case is ``(setup or None, body)``; only the body is timed.
    """
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(n):
        for name, (setup, body) in cases.items():
            if setup is not None:
                setup()
            samples[name].append(timed(body))
    return {k: statistics.median(v) for k, v in samples.items()}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count() or "?"),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "cryptography": _version("cryptography"),
        "sqlalchemy-utils": _version("sqlalchemy-utils"),
        "load": load_average(),
        "clock": "process CPU time" if clock_name() == "cpu" else "wall-clock time",
    }


def load_average() -> str:
    """The 1-minute load average: above the core count, timings are inflated by other work."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="carnet-bench-") as d:
        yield Path(d)


def master_key_uri(directory: Path) -> str:
    from carnet import create_master_key

    uri = "file://" + str(directory / "master.key")
    create_master_key(uri).close()
    return uri


@contextlib.contextmanager
def postgres_database() -> Iterator[str | None]:
    """URL of a new, empty PostgreSQL database dropped afterwards; None when unreachable."""
    if os.environ.get("CARNET_BENCH_POSTGRESQL", "1") == "0":
        yield None
        return
    admin = sa.create_engine(
        POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
    )
    name = "carnet_bench_" + secrets.token_hex(4)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError:
        admin.dispose()
        yield None
        return
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def mariadb_database() -> Iterator[str | None]:
    """URL of a new, empty MariaDB database dropped afterwards; None when unreachable."""
    if os.environ.get("CARNET_BENCH_MARIADB", "1") == "0":
        yield None
        return
    admin = sa.create_engine(MARIADB_ADMIN_URL, connect_args={"connect_timeout": 3})
    name = "carnet_bench_" + secrets.token_hex(4)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
    except sa.exc.OperationalError:
        admin.dispose()
        yield None
        return
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()
