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
