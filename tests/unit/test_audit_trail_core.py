"""The audit trail's rows of a Core read: ``conn.execute(select(table))`` records the row of
each note it discloses, as the ORM's loads do (docs/audit.md, "Rows").

Each Row SQLAlchemy makes from the result is recorded as it is made: the rows a
``first()`` or a ``fetchmany(2)`` never fetches are not recorded, and a Row
that does not hold its key column records the key ``?``. On every backend,
with real stores; no mocks.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

import carnet
from carnet.audit import Auditor, AuditTrail, principal_scope
from carnet.audit_rows import UNKNOWN_ROW
from carnet.cli import cli
from carnet.values import Sealed
from support.models import Base, Note, core_metadata

SECRET = "PLANTED-core-rows-5c1"
notes = Note.__table__

# A table whose note names the patient as its row key.
own_metadata = sa.MetaData()
visits = sa.Table(
    "visits",
    own_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("patient_id", sa.String(20)),
    sa.Column("practice_id", sa.String(20)),
    sa.Column(
        "note",
        carnet.EncryptedText(tenant="practice_id"),
        info={"carnet_audit_rows": "patient_id"},
    ),
)


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """support.models' tables and ``visits``, created by the shared ``keys``."""
    return (Base.metadata, core_metadata, own_metadata)


@pytest.fixture
def seeded(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """Notes 1-6 of practice p0 and 7-12 of p1; visits 1-3 of p0, of patients PAT-1..3."""
    with Session(engine) as s:
        s.add_all(
            [
                Note(id=i, practice_id="p0" if i <= 6 else "p1", body=f"{SECRET} {i}")
                for i in range(1, 13)
            ]
        )
        s.commit()
    with carnet.tenant_scope("p0"), engine.begin() as conn:
        conn.execute(
            visits.insert(),
            [
                {"id": i, "patient_id": f"PAT-{i}", "practice_id": "p0", "note": f"{SECRET} v"}
                for i in range(1, 4)
            ],
        )


def _trail(keys: carnet.KeyManager, **kw: object) -> AuditTrail:
    kw.setdefault("background", False)
    trail = AuditTrail(keys, **kw)  # type: ignore[arg-type]
    Auditor(trail=trail).install(keys)
    return trail


def _rows(trail: AuditTrail) -> list[tuple[str, str, str, str]]:
    """(principal, practice, field, row key) of every row recorded, in record order."""
    assert trail.flush()
    out = []
    for r in trail.store.walk():
        if r["kind"] == "rows":
            for key in json.loads(str(r["detail"]))["rows"]:
                out.append((str(r["principal"]), str(r["practice"]), str(r["field"]), key))
    return out


def _reads(trail: AuditTrail) -> Counter[tuple[str, str, str]]:
    assert trail.flush()
    c: Counter[tuple[str, str, str]] = Counter()
    for r in trail.store.walk():
        if r["kind"] == "read":
            c[(str(r["principal"]), str(r["practice"]), str(r["field"]))] += int(r["count"])
    return c


def _keys(trail: AuditTrail, principal: str) -> list[str]:
    return [k for p, _pr, _f, k in _rows(trail) if p == principal]


def test_a_core_select_records_each_row_it_discloses(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    trail = _trail(keys, rows=True)
    with principal_scope("dr.core"), carnet.tenant_scope("p0"), engine.connect() as conn:
        got = conn.execute(sa.select(notes).where(notes.c.id <= 6).order_by(notes.c.id)).all()
    assert [r.body for r in got] == [f"{SECRET} {i}" for i in range(1, 7)]  # rows unchanged
    rows = _rows(trail)
    assert sorted((p, pr, f, int(k)) for p, pr, f, k in rows) == sorted(
        [("dr.core", "p0", "notes.body", i) for i in range(1, 7)]
    )
    # Every disclosed value has its row: the rows recorded are the values counted.
    assert _reads(trail) == Counter((p, pr, f) for p, pr, f, _k in rows)
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "5", "--json"], env=env)
    assert res.exit_code == 0, res.output
    readers = json.loads(res.output)["readers"]
    assert [(r["principal"], r["practice"], r["field"]) for r in readers] == [
        ("dr.core", "p0", "notes.body")
    ]
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "9", "--json"], env=env)
    assert json.loads(res.output)["readers"] == []
    assert SECRET not in res.output


def test_a_core_select_without_a_scope_discloses_and_records_nothing(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, rows=True)
    with principal_scope("dr.core"), engine.connect() as conn:
        got = conn.execute(sa.select(notes).where(notes.c.id <= 3)).all()
    assert got and all(isinstance(r.body, Sealed) for r in got)  # not opened
    assert _rows(trail) == [] and _reads(trail) == Counter()


def test_a_column_naming_the_patient_records_the_patient(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    # No rows=True: the column asks for its rows itself.
    trail = _trail(keys)
    with principal_scope("dr.v"), carnet.tenant_scope("p0"), engine.connect() as conn:
        conn.execute(sa.select(visits).where(visits.c.id == 2)).all()
    assert _rows(trail) == [("dr.v", "p0", "visits.note", "PAT-2")]
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "PAT-2", "--json"], env=env)
    assert [r["principal"] for r in json.loads(res.output)["readers"]] == ["dr.v"]


def test_a_select_without_the_key_column(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    trail = _trail(keys, rows=True)
    with principal_scope("dr.k"), carnet.tenant_scope("p0"), engine.connect() as conn:
        # The patient column not selected: the primary key, as the ORM does.
        conn.execute(sa.select(visits.c.id, visits.c.note).where(visits.c.id == 1)).all()
        assert _keys(trail, "dr.k") == ["1"]
        # Neither: the note is recorded under "?", once per value, in the scope's practice.
        conn.execute(sa.select(notes.c.body).where(notes.c.id.in_([2, 3]))).all()
    assert [(pr, k) for p, pr, f, k in _rows(trail) if f == "notes.body"] == [
        ("p0", UNKNOWN_ROW),
        ("p0", UNKNOWN_ROW),
    ]
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "?", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert [r["field"] for r in json.loads(res.output)["readers"]] == ["notes.body"]


def test_each_side_of_a_join_records_its_own_row(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, rows=True)
    other = notes.alias("other")
    stmt = (
        sa.select(notes.c.id.label("nid"), notes.c.body, other.c.body.label("b2"), other.c.id)
        .join_from(notes, other, other.c.id == notes.c.id + 1)
        .where(notes.c.id == 2)
    )
    sub = sa.select(notes).where(notes.c.id == 4).subquery()
    with principal_scope("dr.join"), carnet.tenant_scope("p0"), engine.connect() as conn:
        assert conn.execute(stmt).one().b2 == f"{SECRET} 3"
        assert conn.execute(sa.select(sub.c.body, sub.c.id)).one().id == 4
        union = sa.union_all(
            sa.select(notes.c.id, notes.c.body).where(notes.c.id == 5),
            sa.select(notes.c.id, notes.c.body).where(notes.c.id == 6),
        )
        assert len(conn.execute(union).all()) == 2
    assert sorted(_keys(trail, "dr.join")) == ["2", "3", "4", "5", "6"]


def test_fetches_record_the_rows_fetched(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, rows=True)
    stmt = sa.select(notes).where(notes.c.id <= 6).order_by(notes.c.id)
    with carnet.tenant_scope("p0"), engine.connect() as conn:
        with principal_scope("first"):
            assert conn.execute(stmt).first() is not None
        with principal_scope("fetchmany"):
            assert len(conn.execute(stmt).fetchmany(2)) == 2
        with principal_scope("mappings"):
            assert len(conn.execute(stmt).mappings().all()) == 6
        with principal_scope("iterate"):
            for row in conn.execute(stmt):
                if row.id == 3:
                    break
        with principal_scope("scalars"):
            # The first column alone: the notes are neither opened nor recorded.
            assert conn.execute(stmt).scalars().all() == [1, 2, 3, 4, 5, 6]
            # The note alone: opened, and recorded without its key.
            body_first = sa.select(notes.c.body, notes.c.id).where(notes.c.id <= 6)
            assert len(conn.execute(body_first).scalars().all()) == 6
        with principal_scope("stream"):
            res = conn.execution_options(stream_results=True, yield_per=2).execute(stmt)
            assert len(next(res.partitions())) == 2
            res.close()
    got: Counter[str] = Counter()
    for p, _pr, _f, k in _rows(trail):
        got[p] += 1
        assert p != "scalars" or k == UNKNOWN_ROW
    assert got == {
        "first": 1,
        "fetchmany": 2,
        "mappings": 6,
        "iterate": 3,
        "scalars": 6,
        "stream": 2,
    }
    assert _keys(trail, "fetchmany") == ["1", "2"]
    reads: Counter[str] = Counter()
    for (p, _pr, _f), n in _reads(trail).items():
        reads[p] += n
    assert reads == got


def test_an_orm_read_is_recorded_once(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, rows=True)
    with principal_scope("dr.orm"), Session(engine) as s:
        assert len([n.body for n in s.scalars(sa.select(Note).where(Note.id <= 6))]) == 6
        assert s.get(Note, 9) is not None
        # The Session's Core statement: no entity loads, recorded here (under a
        # scope: without one its value comes back sealed, disclosing nothing).
        with carnet.tenant_scope("p1"):
            s.execute(sa.select(notes.c.id, notes.c.body).where(notes.c.id == 10)).all()
    # An ORM statement run on a Connection loads no entity: recorded as a Core read.
    with principal_scope("dr.orm"), carnet.tenant_scope("p1"), engine.connect() as conn:
        assert conn.execute(sa.select(Note).where(Note.id == 11)).one().body
    got = sorted(int(k) for _p, _pr, _f, k in _rows(trail))
    assert got == [1, 2, 3, 4, 5, 6, 9, 10, 11]


def test_a_sessions_bare_columns_are_recorded_and_its_entities_once(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, rows=True)
    with principal_scope("dr.cols"), carnet.tenant_scope("p0"), Session(engine) as s:
        # Bare ORM columns load no entity: each value's row is recorded here.
        assert len(s.execute(sa.select(Note.id, Note.body).where(Note.id <= 2)).all()) == 2
        # Without its key column the row is recorded as "?".
        assert s.execute(sa.select(Note.body).where(Note.id == 3)).scalar_one()
        # An entity and its own column: one value per row, recorded once, by the load.
        assert len(s.execute(sa.select(Note, Note.body).where(Note.id == 4)).all()) == 1
        # An entity and another table's note: each recorded by its own path.
        got = s.execute(
            sa.select(Note, visits.c.patient_id, visits.c.note)
            .join(visits, visits.c.id == Note.id)
            .where(Note.id == 1)
        ).one()
        assert got.note.startswith(SECRET)
    assert sorted(_keys(trail, "dr.cols")) == sorted(["1", "2", "?", "4", "1", "PAT-1"])
    by_field = Counter(f for p, _pr, f, _k in _rows(trail) if p == "dr.cols")
    assert by_field == {"notes.body": 5, "visits.note": 1}


def test_no_row_function_unless_rows_are_wanted(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine
) -> None:
    stmt = sa.select(notes).order_by(notes.c.id)
    with carnet.tenant_scope("p0"), engine.connect() as conn:
        result = conn.execute(stmt)  # no trail at all
        assert result._row_logging_fn is None
        result.close()
        trail = _trail(keys)  # a trail that wants no rows
        result = conn.execute(stmt)
        assert result._row_logging_fn is None
        result.close()
        # A statement without notes, under a trail that wants rows.
        _trail(keys, rows=True)
        result = conn.execute(sa.select(notes.c.id))
        assert result._row_logging_fn is None
        result.close()
    assert _rows(trail) == []


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_rows_logged_by_echo_debug_are_recorded_too(
    keys: carnet.KeyManager, seeded: None, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    trail = _trail(keys, rows=True)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy.engine")
    echo = sa.create_engine(db_url, echo="debug")
    try:
        with principal_scope("dr.echo"), carnet.tenant_scope("p0"), echo.connect() as conn:
            conn.execute(sa.select(notes.c.id).where(notes.c.id <= 3)).all()
            got = conn.execute(sa.select(notes.c.id, notes.c.practice_id).where(notes.c.id <= 2))
            assert [tuple(r) for r in got] == [(1, "p0"), (2, "p0")]
    finally:
        echo.dispose()
    assert sum("Row (" in m for m in caplog.messages) == 5  # SQLAlchemy's log still runs
    # Now with a note: recorded and logged.
    caplog.clear()
    echo = sa.create_engine(db_url, echo="debug")
    try:
        with principal_scope("dr.echo"), carnet.tenant_scope("p0"), echo.connect() as conn:
            conn.execute(sa.select(notes.c.id, notes.c.body).where(notes.c.id <= 2)).all()
    finally:
        echo.dispose()
    assert sum("Row (" in m for m in caplog.messages) == 2
    assert _keys(trail, "dr.echo") == ["1", "2"]


# -- a property: whatever the fetches, the rows recorded are the rows fetched ---------------

_examples = itertools.count()
fetches = st.lists(
    st.one_of(
        st.tuples(st.just("one")),
        st.tuples(st.just("many"), st.integers(0, 5)),
        st.tuples(st.just("iter"), st.integers(0, 3)),
    ),
    max_size=6,
)


@pytest.mark.parametrize("db_kind", ["sqlite"])
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(program=fetches)
def test_rows_recorded_are_the_rows_fetched(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine, program: Sequence[tuple[object, ...]]
) -> None:
    trail = _trail(keys, rows=True)
    principal = f"prop-{next(_examples)}"  # one store for every example
    fetched: list[str] = []
    stmt = sa.select(notes.c.body, notes.c.id).where(notes.c.practice_id == "p1")
    with principal_scope(principal), carnet.tenant_scope("p1"), engine.connect() as conn:
        res = conn.execute(stmt.order_by(notes.c.id))
        for op in program:
            if op[0] == "one":
                row = res.fetchone()
                fetched += [] if row is None else [str(row.id)]
            elif op[0] == "many":
                fetched += [str(r.id) for r in res.fetchmany(int(op[1]))]  # type: ignore[call-overload]
            else:
                for _, r in zip(range(int(op[1])), res, strict=False):  # type: ignore[call-overload]
                    fetched.append(str(r.id))
        res.close()
    assert _keys(trail, principal) == fetched
    trail.close()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_without_its_row_hook_a_read_whose_rows_are_wanted_is_refused(
    keys: carnet.KeyManager, seeded: None, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carnet import _sa
    from carnet.errors import UnsupportedOperation

    entry = _sa.NAMES["row_logging_fn"]
    # As a SQLAlchemy release renaming the hook would: no silent read without its rows.
    monkeypatch.setitem(_sa.NAMES, "row_logging_fn", replace(entry, attr="_renamed_upstream"))
    stmt = sa.select(notes).where(notes.c.id == 1)
    with carnet.tenant_scope("p0"), engine.connect() as conn:
        assert conn.execute(stmt).all()  # no trail wants rows: the hook is not needed
        trail = _trail(keys, rows=True)
        with pytest.raises(UnsupportedOperation, match=r"installed SQLAlchemy .*record the rows"):
            conn.execute(stmt)
        assert conn.execute(sa.select(notes.c.id)).all()  # no note: not needed either
    assert _rows(trail) == []


class _Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text for this key")


class _OddKey(sa.types.TypeDecorator[object]):
    """A primary key the application reads as an object without a text form."""

    impl = sa.Integer
    cache_ok = True

    def process_result_value(self, value: object, dialect: object) -> object:
        return _Unprintable()


odd_metadata = sa.MetaData()
odd = sa.Table(
    "odd",
    odd_metadata,
    sa.Column("id", _OddKey, primary_key=True),
    sa.Column("note", carnet.EncryptedText()),
)


@pytest.mark.parametrize("db_kind", ["sqlite"])
@pytest.mark.parametrize("mode", ["best_effort", "required"])
def test_a_row_that_cannot_be_recorded_follows_the_mode(
    keys: carnet.KeyManager,
    seeded: None,
    engine: sa.Engine,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    odd_metadata.create_all(engine)
    with carnet.tenant_scope("p0"), engine.begin() as conn:
        conn.execute(odd.insert(), [{"id": 1, "note": SECRET}])
    trail = _trail(keys, rows=True, mode=mode)
    caplog.set_level(logging.ERROR, logger="carnet.audit")
    with principal_scope("dr.odd"), carnet.tenant_scope("p0"), engine.connect() as conn:
        if mode == "required":
            with pytest.raises(ValueError):
                conn.execute(sa.select(odd)).all()
        else:
            assert conn.execute(sa.select(odd)).one().note == SECRET
            assert "could not record the row of a Core read (ValueError)" in caplog.text
    assert _rows(trail) == []
    assert SECRET not in caplog.text
