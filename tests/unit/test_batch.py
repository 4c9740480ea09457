"""The batch engine on SQLite, PostgreSQL and MariaDB: paging, CAS, resume, workers."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from carnet.batch import BatchRow, iter_rows, run_batches
from carnet.errors import ConfigurationError, InvalidCiphertext
from carnet.jobs import job_progress


def _composite(engine: sa.Engine, n: int = 700) -> sa.Table:
    md = sa.MetaData()
    t = sa.Table(
        "docs",
        md,
        sa.Column("site", sa.String(20), primary_key=True),
        sa.Column("num", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("v", sa.LargeBinary, nullable=True),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            t.insert(),
            [
                {"site": f"s{i % 7}", "num": i, "v": None if i % 10 == 0 else b"v%d" % i}
                for i in range(n)
            ],
        )
    return t


def _suffix(row: BatchRow) -> bytes | None:
    v = row.value
    if v is not None and bytes(v).endswith(b"!"):
        return None
    return (bytes(v) if v is not None else b"") + b"!"


def _values(engine: sa.Engine, t: sa.Table) -> dict[Any, Any]:
    with engine.connect() as conn:
        return {
            tuple(r[:-1]): (bytes(r[-1]) if r[-1] is not None else None)
            for r in conn.execute(sa.select(*t.primary_key.columns, t.c.v))
        }


def test_composite_pk_rewrites_every_row_once_and_reruns_idempotently(engine: sa.Engine) -> None:
    t = _composite(engine)
    rep = run_batches(engine, "docs", "v", _suffix, job="j1", batch_size=64)
    assert (rep.scanned, rep.rewritten, rep.conflicts, rep.failed) == (700, 700, 0, [])
    vals = _values(engine, t)
    assert all(v is not None and v.endswith(b"!") and not v.endswith(b"!!") for v in vals.values())
    # NULL old values went through the IS NULL compare-and-set.
    assert vals[("s0", 0)] == b"!"
    again = run_batches(engine, "docs", "v", _suffix, job="j1", batch_size=64)
    assert (again.scanned, again.rewritten, again.skipped) == (700, 0, 700)


def test_string_uuid_pk_with_three_workers_covers_each_row_once(engine: sa.Engine) -> None:
    md = sa.MetaData()
    t = sa.Table("u", md, sa.Column("id", sa.String(36), primary_key=True), sa.Column("v", sa.Text))
    md.create_all(engine)
    ids = [str(uuid.uuid4()) for _ in range(500)]
    with engine.begin() as conn:
        conn.execute(t.insert(), [{"id": i, "v": "x"} for i in ids])
    seen: Counter[str] = Counter()

    def tr(row: BatchRow) -> str:
        seen[row.pk[0]] += 1
        return "y"

    total = 0
    for w in range(3):
        rep = run_batches(engine, t, "v", tr, job="u", worker=(w, 3), batch_size=37)
        total += rep.rewritten
    assert total == 500
    assert set(seen) == set(ids) and set(seen.values()) == {1}
    prog = job_progress(engine, "u")
    assert prog["workers"] == 3 and prog["done"] == 3 and prog["rewritten"] == 500


def test_more_workers_than_rows(engine: sa.Engine) -> None:
    _composite(engine, n=3)
    got = sum(
        run_batches(engine, "docs", "v", _suffix, job="w", worker=(w, 5)).rewritten
        for w in range(5)
    )
    assert got == 3


class _Crash(Exception):
    pass


def test_killed_run_resumes_after_last_committed_batch(engine: sa.Engine) -> None:
    _composite(engine)
    calls = 0

    def boom(n: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise _Crash()

    with pytest.raises(_Crash):
        run_batches(engine, "docs", "v", _suffix, job="r", batch_size=50, progress=boom)
    rep = run_batches(engine, "docs", "v", _suffix, job="r", batch_size=50)
    assert rep.resumed_from is not None
    assert rep.scanned == 700 - 150 and rep.rewritten == 550
    restarted = run_batches(engine, "docs", "v", _suffix, job="r", batch_size=50, restart=True)
    assert restarted.resumed_from is None and restarted.scanned == 700


def test_concurrent_write_wins_and_counts_as_conflict(engine: sa.Engine) -> None:
    t = _composite(engine, n=50)

    def racing(row: BatchRow) -> bytes | None:
        if row.pk == ("s3", 3):
            with engine.begin() as conn:  # the application writes meanwhile
                conn.execute(t.update().where(t.c.site == "s3", t.c.num == 3).values(v=b"app"))
        return _suffix(row)

    rep = run_batches(engine, t, "v", racing, job="c", batch_size=10)
    assert rep.conflicts == 1 and rep.rewritten == 49
    assert _values(engine, t)[("s3", 3)] == b"app"


def test_extra_columns_join_where_and_failures(engine: sa.Engine) -> None:
    md = sa.MetaData()
    pats = sa.Table(
        "patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(10)),
    )
    notes = sa.Table(
        "n",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("patient_id", sa.Integer),
        sa.Column("v", sa.Text),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            pats.insert(), [{"id": i + 1, "practice_id": f"p{(i + 1) % 2}"} for i in range(10)]
        )
        conn.execute(
            notes.insert(),
            [{"id": i + 1, "patient_id": i % 10 + 1, "v": f"n{i}"} for i in range(100)],
        )

    def tr(row: BatchRow) -> str:
        if row.pk == (43,):
            raise InvalidCiphertext()
        return f"{row.extra['tenant']}:{row.value}"

    rep = run_batches(
        engine,
        notes,
        "v",
        tr,
        job="x",
        batch_size=16,
        extra_columns={"tenant": pats.c.practice_id},
        join=lambda q: q.join(pats, notes.c.patient_id == pats.c.id),
        where=notes.c.id <= 90,
    )
    assert rep.scanned == 90 and rep.rewritten == 89 and rep.failed == [(43,)]
    with engine.connect() as conn:
        v = dict(conn.execute(sa.select(notes.c.id, notes.c.v)).all())
    # row 14 belongs to patient 4 of practice p0
    assert v[14] == "p0:n13" and v[43] == "n42" and v[96] == "n95"
    assert [r.pk for r in iter_rows(engine, notes, "v", batch_size=7)] == [
        (i,) for i in range(1, 101)
    ]


def test_bad_input_is_a_configuration_error(engine: sa.Engine) -> None:
    _composite(engine, n=1)
    with pytest.raises(ConfigurationError):
        run_batches(engine, "nope", "v", _suffix, job="b")
    with pytest.raises(ConfigurationError):
        run_batches(engine, "docs", "nope", _suffix, job="b")
    run_batches(engine, "docs", "v", _suffix, job="b2", worker=(0, 2))
    with pytest.raises(ConfigurationError):
        run_batches(engine, "docs", "v", _suffix, job="b2", worker=(0, 3))


def test_batch_row_repr_hides_value() -> None:
    r = BatchRow(pk=(1,), value="PLANTED-SECRET", extra={"tenant": "p1"})
    assert "PLANTED" not in repr(r)
