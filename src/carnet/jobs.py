"""The ``carnet_jobs`` table: progress of batch jobs, one row per job and worker.

A job's rows are created together by whichever worker arrives first, with the
key range of every worker, so workers on several machines agree on disjoint
ranges with the database as the only coordinator. Each batch's writes and the
worker's ``last_pk`` are committed in one transaction: a killed run resumes
right after the last committed batch.

Primary-key values are stored as tagged JSON so that integers, strings, UUIDs,
dates, decimals and bytes round-trip exactly.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .errors import ConfigurationError
from .keystore import utcnow

JOBS_TABLE = "carnet_jobs"


def jobs_table(metadata: sa.MetaData, name: str = JOBS_TABLE) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("job", sa.String(255), primary_key=True),
        sa.Column("worker", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("workers", sa.Integer, nullable=False),
        sa.Column("table_name", sa.String(255), nullable=False),
        sa.Column("column_name", sa.String(255), nullable=False),
        # Range of this worker: lower < pk <= upper, NULL meaning unbounded.
        sa.Column("lower_pk", sa.Text, nullable=True),
        sa.Column("upper_pk", sa.Text, nullable=True),
        sa.Column("last_pk", sa.Text, nullable=True),
        sa.Column("done", sa.Boolean, nullable=False, default=False),
        sa.Column("scanned", sa.BigInteger, nullable=False, default=0),
        sa.Column("rewritten", sa.BigInteger, nullable=False, default=0),
        sa.Column("skipped", sa.BigInteger, nullable=False, default=0),
        sa.Column("conflicts", sa.BigInteger, nullable=False, default=0),
        sa.Column("failed", sa.BigInteger, nullable=False, default=0),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


_metadata = sa.MetaData()
JOBS = jobs_table(_metadata)


def ensure_jobs_table(engine: sa.Engine) -> sa.Table:
    """Create ``carnet_jobs`` when missing; tolerate another worker creating it meanwhile."""
    try:
        JOBS.create(engine, checkfirst=True)
    except sa.exc.DatabaseError:
        # Two workers raced on CREATE TABLE: fine if the table now exists.
        if not sa.inspect(engine).has_table(JOBS_TABLE):
            raise
    return JOBS


# -- primary-key codec ------------------------------------------------------------------


def _enc(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"f": repr(v)}
    if isinstance(v, decimal.Decimal):
        return {"d": str(v)}
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"b": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, uuid.UUID):
        return {"u": str(v)}
    if isinstance(v, dt.datetime):
        return {"dt": v.isoformat()}
    if isinstance(v, dt.date):
        return {"da": v.isoformat()}
    if isinstance(v, dt.time):
        return {"t": v.isoformat()}
    raise ConfigurationError(f"primary key values of type {type(v).__name__} are not supported")


def _dec(v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    ((tag, s),) = v.items()
    if tag == "f":
        return float(s)
    if tag == "d":
        return decimal.Decimal(s)
    if tag == "b":
        return base64.b64decode(s)
    if tag == "u":
        return uuid.UUID(s)
    if tag == "dt":
        return dt.datetime.fromisoformat(s)
    if tag == "da":
        return dt.date.fromisoformat(s)
    if tag == "t":
        return dt.time.fromisoformat(s)
    raise ValueError(f"unknown primary key tag {tag!r}")


def encode_pk(pk: Sequence[Any] | None) -> str | None:
    return None if pk is None else json.dumps([_enc(v) for v in pk])


def decode_pk(s: str | None) -> tuple[Any, ...] | None:
    return None if s is None else tuple(_dec(v) for v in json.loads(s))


def new_row(
    job: str,
    worker: int,
    workers: int,
    table_name: str,
    column_name: str,
    lower: Sequence[Any] | None,
    upper: Sequence[Any] | None,
) -> dict[str, Any]:
    now = utcnow()
    return {
        "job": job,
        "worker": worker,
        "workers": workers,
        "table_name": table_name,
        "column_name": column_name,
        "lower_pk": encode_pk(lower),
        "upper_pk": encode_pk(upper),
        "last_pk": None,
        "done": False,
        "scanned": 0,
        "rewritten": 0,
        "skipped": 0,
        "conflicts": 0,
        "failed": 0,
        "created_at": now,
        "updated_at": now,
    }


def job_progress(engine: sa.Engine, job: str) -> dict[str, Any]:
    """Summed counters of every worker of ``job`` (for progress bars and status)."""
    t = JOBS
    if not sa.inspect(engine).has_table(JOBS_TABLE):
        return {
            "workers": 0,
            "done": 0,
            "scanned": 0,
            "rewritten": 0,
            "skipped": 0,
            "conflicts": 0,
            "failed": 0,
        }
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t).where(t.c.job == job)).all()
    out: dict[str, Any] = {"workers": len(rows), "done": sum(1 for r in rows if r.done)}
    for k in ("scanned", "rewritten", "skipped", "conflicts", "failed"):
        out[k] = sum(int(getattr(r, k)) for r in rows)
    return out


def reset_job(engine: sa.Engine, job: str) -> int:
    """Forget every worker's progress of ``job``; the next run starts from the beginning."""
    ensure_jobs_table(engine)
    with engine.begin() as conn:
        return int(conn.execute(JOBS.delete().where(JOBS.c.job == job)).rowcount)


# -- what status shows ----------------------------------------------------------------------

FINISHED_SHOWN = 10  # finished jobs `carnet status` lists by default (every unfinished one too)


def recent_jobs(engine: sa.Engine, finished: int = FINISHED_SHOWN) -> tuple[list[Any], int]:
    """Rows of every unfinished job and of the ``finished`` most recently finished ones.

    Returns ``(rows, hidden)``: the rows ordered by job and worker, and how many
    finished jobs were left out. A job is finished when every worker is done;
    its rows stay in the table (a finished job's rerun starts a fresh pass
    anyway), only the listing is bounded, so a years-old deployment's status
    is not a page of past re-encryptions.
    """
    if not sa.inspect(engine).has_table(JOBS_TABLE):
        return [], 0
    t = JOBS
    with engine.connect() as conn:
        rows = list(conn.execute(sa.select(t).order_by(t.c.job, t.c.worker)))
    by_job: dict[str, list[Any]] = {}
    for r in rows:
        by_job.setdefault(r.job, []).append(r)
    done = [j for j, rs in by_job.items() if all(r.done for r in rs)]
    # Most recent first; the job name breaks ties (MariaDB keeps whole seconds).
    done.sort(key=lambda j: (max(_aware(r.updated_at) for r in by_job[j]), j), reverse=True)
    hidden = set(done[max(finished, 0) :])
    return [r for r in rows if r.job not in hidden], len(hidden)


def _aware(value: dt.datetime) -> dt.datetime:
    # SQLite hands back naive datetimes (stored as UTC).
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


# -- a run over several columns (reencrypt --app / --all) -------------------------------------

RUN_MARK = "*"  # table_name and column_name of a run's own row


def run_state(engine: sa.Engine, run: str) -> bool | None:
    """A multi-column run's state: None if never started, else whether it finished."""
    if not sa.inspect(engine).has_table(JOBS_TABLE):
        return None
    t = JOBS
    with engine.connect() as conn:
        done = conn.execute(
            sa.select(t.c.done).where(t.c.job == run, t.c.worker == 0)
        ).scalar_one_or_none()
    return None if done is None else bool(done)


def start_run(engine: sa.Engine, run: str) -> None:
    """Record a new pass of a multi-column run (its own row in ``carnet_jobs``), unfinished."""
    ensure_jobs_table(engine)
    with engine.begin() as conn:
        conn.execute(JOBS.delete().where(JOBS.c.job == run))
        conn.execute(JOBS.insert(), new_row(run, 0, 1, RUN_MARK, RUN_MARK, None, None))


def finish_run(engine: sa.Engine, run: str, totals: dict[str, int]) -> None:
    """Mark the run finished, with its summed counters; the next run starts a fresh pass."""
    with engine.begin() as conn:
        conn.execute(
            JOBS.update()
            .where(JOBS.c.job == run, JOBS.c.worker == 0)
            .values(done=True, updated_at=utcnow(), **totals)
        )


def job_finished(engine: sa.Engine, job: str) -> bool:
    """Whether every worker of ``job`` is done (False for a job never started)."""
    p = job_progress(engine, job)
    return bool(p["workers"]) and p["done"] == p["workers"]
