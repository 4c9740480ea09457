"""No SQL computes on ciphertext: every such statement is refused before it reaches the database.

Each refused form below builds without error (the column's comparator never sees
it) and, without carnet's statement guard, runs: it sorts, groups, measures or
compares ciphertext, or copies a value into another row. Here it must raise
UnsupportedOperation, send nothing to the database and change nothing. The
allowed forms must still run and return the right answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    aliased,
    column_property,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

import carnet
from carnet.errors import UnsupportedOperation
from carnet.guard import check_statement
from support.models import Note, comments

notes = Note.__table__
N2 = aliased(Note, name="n2")
SECRET = "PLANTED-SECRET-LITERAL"  # appears in statements; must never appear in a message


@pytest.fixture
def data(keys: carnet.KeyManager, engine: sa.Engine) -> sa.Engine:
    with Session(engine) as s:
        s.add_all(
            [
                Note(id=1, practice_id="p1", body="alpha note", summary="alpha"),
                Note(id=2, practice_id="p2", body="beta note", summary="beta"),
                Note(id=3, practice_id="p1", body=None, summary=None),
            ]
        )
        s.commit()
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(comments.insert(), [{"id": 1, "text": "un"}, {"id": 2, "text": "deux"}])
    return engine


@contextmanager
def sent(engine: sa.Engine) -> Iterator[list[str]]:
    """The SQL statements that reach the database driver inside the block."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def stored(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every row of both tables as stored (ciphertext), to prove nothing changed."""
    with engine.connect() as conn:
        return [
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            for table in ("notes", "comments")
            for row in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY id"))  # noqa: S608
        ]


def _cte_group_by() -> sa.Select[Any]:
    cte = sa.select(Note.body.label("b")).cte("c")
    return sa.select(cte.c.b).group_by(cte.c.b)


def _subquery_order_by() -> sa.Select[Any]:
    sq = sa.select(Note.id, Note.body).subquery()
    return sa.select(sq.c.id).order_by(sq.c.body)


def _function_inside_subquery() -> sa.Select[Any]:
    sq = sa.select(sa.func.length(Note.body).label("n")).subquery()
    return sa.select(sq.c.n)


def _upsert_copy(dialect: str) -> Any:
    # The conflicting row may belong to another practice: the value sealed for
    # the proposed row would land in it.
    if dialect in ("mysql", "mariadb"):
        m = mysql.insert(Note).values(id=1, practice_id="p1", body="x")
        return m.on_duplicate_key_update(body=m.inserted.body)
    ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Note)
    stmt = ins.values(id=1, practice_id="p1", body="x")
    return stmt.on_conflict_do_update(index_elements=["id"], set_={"body": stmt.excluded.body})


# (construct named in the message, how the statement is run, builder). The
# builder receives the dialect name (for the upsert forms).
Case = tuple[str, str, Callable[[str], Any]]
REFUSED: dict[str, Case] = {
    # ORDER BY
    "orm order_by": ("ORDER BY", "orm", lambda d: sa.select(Note).order_by(Note.body)),
    "orm order_by label": (
        "ORDER BY",
        "orm",
        lambda d: sa.select(Note.id).order_by(Note.body.label("b")),
    ),
    "core order_by by name": (
        "ORDER BY",
        "core",
        lambda d: sa.select(comments.c.id, comments.c.text).order_by("text"),
    ),
    "legacy query order_by": ("ORDER BY", "query", lambda d: None),
    "orm aliased order_by": ("ORDER BY", "orm", lambda d: sa.select(N2).order_by(N2.body)),
    "subquery column order_by": ("ORDER BY", "orm", lambda d: _subquery_order_by()),
    "lambda_stmt order_by": (
        "ORDER BY",
        "orm",
        lambda d: sa.lambda_stmt(lambda: sa.select(Note).order_by(Note.body)),
    ),
    # GROUP BY, DISTINCT, HAVING
    "orm group_by": (
        "GROUP BY",
        "orm",
        lambda d: sa.select(sa.func.count()).select_from(Note).group_by(Note.body),
    ),
    "core group_by": (
        "GROUP BY",
        "core",
        lambda d: sa.select(sa.func.count()).select_from(comments).group_by(comments.c.text),
    ),
    "cte column group_by": ("GROUP BY", "orm", lambda d: _cte_group_by()),
    "orm distinct": ("DISTINCT", "orm", lambda d: sa.select(Note.body).distinct()),
    "core distinct": ("DISTINCT", "core", lambda d: sa.select(comments.c.text).distinct()),
    "having max": (
        "max()",
        "orm",
        lambda d: (
            sa.select(Note.practice_id)
            .group_by(Note.practice_id)
            .having(sa.func.max(Note.body).is_not(None))
        ),
    ),
    # functions and CAST, in every clause
    "orm length in select": ("length()", "orm", lambda d: sa.select(sa.func.length(Note.body))),
    "core length in select": (
        "length()",
        "core",
        lambda d: sa.select(sa.func.length(comments.c.text)),
    ),
    "orm lower in select": ("lower()", "orm", lambda d: sa.select(sa.func.lower(Note.body))),
    "text storage upper": ("upper()", "orm", lambda d: sa.select(sa.func.upper(Note.summary))),
    "coalesce of two": (
        "coalesce()",
        "orm",
        lambda d: sa.select(sa.func.coalesce(Note.body, Note.summary)),
    ),
    "function in where": (
        "length()",
        "orm",
        lambda d: sa.select(Note.id).where(sa.func.length(Note.body) > 10),
    ),
    "function in order_by": (
        "length()",
        "core",
        lambda d: sa.select(comments.c.id).order_by(sa.func.length(comments.c.text)),
    ),
    "function inside subquery": ("length()", "orm", lambda d: _function_inside_subquery()),
    "cast equality": (
        "CAST",
        "orm",
        lambda d: sa.select(Note.id).where(sa.cast(Note.body, sa.String) == SECRET),
    ),
    "cast in select": ("CAST", "core", lambda d: sa.select(sa.cast(comments.c.text, sa.String))),
    # comparisons with a literal on the left, IN, LIKE, BETWEEN, concatenation
    "literal == column": (
        "=",
        "orm",
        lambda d: sa.select(Note.id).where(sa.literal(SECRET) == Note.body),
    ),
    "core literal == column": (
        "=",
        "core",
        lambda d: sa.select(comments.c.id).where(sa.literal(SECRET) == comments.c.text),
    ),
    "literal IN column list": (
        "IN",
        "orm",
        lambda d: sa.select(Note.id).where(sa.literal(SECRET).in_([Note.body, Note.summary])),
    ),
    "literal IN subquery": (
        "IN",
        "orm",
        lambda d: sa.select(Note.id).where(sa.literal(SECRET).in_(sa.select(Note.body))),
    ),
    "literal LIKE column": (
        "LIKE",
        "core",
        lambda d: sa.select(comments.c.id).where(sa.literal(SECRET).like(comments.c.text)),
    ),
    "literal BETWEEN columns": (
        "BETWEEN",
        "orm",
        lambda d: sa.select(Note.id).where(sa.literal(SECRET).between(Note.body, Note.summary)),
    ),
    "concatenation": ("||", "orm", lambda d: sa.select(sa.literal(SECRET) + Note.summary)),
    "scalar subquery compared": (
        "=",
        "orm",
        lambda d: sa.select(Note.id).where(
            Note.practice_id == sa.select(N2.body).where(N2.id == 1).scalar_subquery()
        ),
    ),
    "truth value in where": (
        "AND / OR",
        "orm",
        lambda d: sa.select(Note.id).where(sa.and_(Note.body, Note.id > 0)),
    ),
    "CASE on the column": (
        "CASE",
        "orm",
        lambda d: sa.select(sa.case({SECRET: 1}, value=Note.body, else_=0)),
    ),
    "EXISTS with a function": (
        "length()",
        "core",
        lambda d: sa.select(comments.c.id).where(
            sa.exists().where(notes.c.id == sa.func.length(comments.c.text))
        ),
    ),
    # JOIN conditions
    "orm join on plain column": (
        "JOIN",
        "orm",
        lambda d: sa.select(Note.id).join(comments, Note.practice_id == comments.c.text),
    ),
    "orm join encrypted to encrypted": (
        "JOIN",
        "orm",
        lambda d: sa.select(Note.id).join(N2, Note.body == N2.body),
    ),
    "core join with function": (
        "length()",
        "core",
        lambda d: sa.select(comments.c.id).select_from(
            comments.join(notes, notes.c.id == sa.func.length(comments.c.text))
        ),
    ),
    # windows
    "window partition by": (
        "PARTITION BY",
        "orm",
        lambda d: sa.select(Note.id, sa.func.row_number().over(partition_by=Note.body)),
    ),
    "window order by": (
        "window ORDER BY",
        "core",
        lambda d: sa.select(comments.c.id, sa.func.rank().over(order_by=comments.c.text)),
    ),
    # set operations that compare rows
    "union": (
        "UNION",
        "orm",
        lambda d: sa.union(sa.select(Note.body), sa.select(N2.body)),
    ),
    "union with pk": (
        "UNION",
        "core",
        lambda d: sa.union(
            sa.select(comments.c.id, comments.c.text), sa.select(notes.c.id, notes.c.body)
        ),
    ),
    "intersect": (
        "INTERSECT",
        "core",
        lambda d: sa.intersect(sa.select(comments.c.text), sa.select(notes.c.body)),
    ),
    "except": (
        "EXCEPT",
        "core",
        lambda d: sa.except_(sa.select(comments.c.text), sa.select(notes.c.body)),
    ),
    # copies of ciphertext into another row or column
    "orm update copies another column": (
        "copy",
        "orm",
        lambda d: sa.update(Note).where(Note.id == 1).values(body=Note.summary),
    ),
    "orm update copies another row": (
        "copy",
        "orm",
        lambda d: (
            sa.update(Note)
            .where(Note.id == 1)
            .values(body=sa.select(N2.body).where(N2.id == 2).scalar_subquery())
        ),
    ),
    "core update copies another table": (
        "copy",
        "core",
        lambda d: (
            comments.update()
            .where(comments.c.id == 1)
            .values(text=sa.select(notes.c.body).where(notes.c.id == 1).scalar_subquery())
        ),
    ),
    "core update from another table": (
        "copy",
        "core",
        lambda d: comments.update().where(comments.c.id == notes.c.id).values(text=notes.c.body),
    ),
    "insert from select": (
        "copy",
        "orm",
        lambda d: sa.insert(Note).from_select(
            ["id", "practice_id", "body"],
            sa.select(Note.id + 100, sa.literal("p2"), Note.body),
        ),
    ),
    "core insert from select": (
        "copy",
        "core",
        lambda d: comments.insert().from_select(
            ["id", "text"], sa.select(notes.c.id + 100, notes.c.body)
        ),
    ),
    "multi-row VALUES copies another row": (
        "copy",
        "core",
        lambda d: sa.insert(Note).values(
            [
                {"id": 7, "practice_id": "p1", "body": "x"},
                {
                    "id": 8,
                    "practice_id": "p1",
                    "body": sa.select(N2.body).where(N2.id == 1).scalar_subquery(),
                },
            ]
        ),
    ),
    "upsert copies the proposed value": ("copy", "core", _upsert_copy),
    # string references: names resolved by the compiler against the statement
    "desc by name": ("ORDER BY", "orm", lambda d: sa.select(Note).order_by(sa.desc("body"))),
    "asc by name": ("ORDER BY", "orm", lambda d: sa.select(Note).order_by(sa.asc("body"))),
    "nulls_last desc by name": (
        "ORDER BY",
        "orm",
        lambda d: sa.select(Note).order_by(sa.nulls_last(sa.desc("body"))),
    ),
    "order_by name of a FROM column": (
        "ORDER BY",
        "orm",
        lambda d: sa.select(Note.id).select_from(Note).order_by("body"),
    ),
    "desc by label name": (
        "ORDER BY",
        "orm",
        lambda d: sa.select(Note.body.label("b")).order_by(sa.desc("b")),
    ),
    "core desc by name": (
        "ORDER BY",
        "core",
        lambda d: sa.select(comments.c.id, comments.c.text).order_by(sa.desc("text")),
    ),
    "window order by name": (
        "window ORDER BY",
        "orm",
        lambda d: sa.select(Note.id, sa.func.row_number().over(order_by="body")),
    ),
    "window partition by name": (
        "PARTITION BY",
        "orm",
        lambda d: sa.select(Note.id, sa.func.row_number().over(partition_by="body")),
    ),
    "group_by name of a FROM column": (
        "GROUP BY",
        "orm",
        lambda d: sa.select(sa.func.count()).select_from(Note).group_by("summary"),
    ),
    "copy into a plain column": (
        "copy",
        "orm",
        lambda d: sa.update(Note).where(Note.id == 1).values(practice_id=Note.summary),
    ),
}


def _run(engine: sa.Engine, how: str, stmt: Any) -> Any:
    if how == "query":
        with Session(engine) as s:
            return s.query(Note).order_by(Note.body).all()
    if how == "orm":
        with Session(engine) as s:
            out = s.execute(stmt).all() if _returns_rows(stmt) else s.execute(stmt)
            s.commit()
            return out
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        result = conn.execute(stmt)
        return result.all() if result.returns_rows else result.rowcount


def _returns_rows(stmt: Any) -> bool:
    return not isinstance(stmt, sa.sql.dml.UpdateBase)


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refused_before_reaching_the_database(data: sa.Engine, case: str) -> None:
    construct, how, build = REFUSED[case]
    stmt = build(data.dialect.name)  # builds fine: only execution is refused
    before = stored(data)
    with sent(data) as statements, pytest.raises(UnsupportedOperation) as ei:
        _run(data, how, stmt)
    message = str(ei.value)
    assert construct in message
    assert "notes.body" in message or "notes.summary" in message or "comments.text" in message
    assert SECRET not in message and "alpha" not in message and "beta" not in message
    assert statements == []
    assert stored(data) == before


def test_a_refused_statement_is_refused_every_time(data: sa.Engine) -> None:
    stmt = sa.select(Note).order_by(Note.body)
    for _ in range(3):
        with Session(data) as s, pytest.raises(UnsupportedOperation):
            s.execute(stmt)


# -- combinations: constructs x clause positions x column sources -----------------------

_sq = sa.select(Note.id, Note.body).subquery("sq")
SOURCES: dict[str, Callable[[], Any]] = {
    "orm": lambda: Note.body,
    "orm text storage": lambda: Note.summary,
    "core": lambda: comments.c.text,
    "aliased": lambda: N2.body,
    "subquery": lambda: _sq.c.body,
    "label": lambda: Note.body.label("lbl"),
}
CONSTRUCTS: dict[str, Callable[[Any], Any]] = {
    "bare": lambda c: c,
    "length()": lambda c: sa.func.length(c),
    "lower()": lambda c: sa.func.lower(c),
    "max()": lambda c: sa.func.max(c),
    "CAST": lambda c: sa.cast(c, sa.String),
    "literal =": lambda c: sa.literal(SECRET) == c,
    "literal LIKE": lambda c: sa.literal(SECRET).like(c),
    "literal IN": lambda c: sa.literal(SECRET).in_([c]),
}
POSITIONS: dict[str, Callable[[Any], Any]] = {
    "select": lambda e: sa.select(Note.id, e).select_from(Note),
    "where": lambda e: sa.select(Note.id).where(e),
    "order_by": lambda e: sa.select(Note.id).order_by(e),
    "group_by": lambda e: sa.select(sa.func.count()).select_from(Note).group_by(e),
    "having": lambda e: sa.select(Note.practice_id).group_by(Note.practice_id).having(e),
    "join on": lambda e: sa.select(Note.id).join(comments, e),
    "partition by": lambda e: sa.select(sa.func.row_number().over(partition_by=e)),
    "window order by": lambda e: sa.select(sa.func.row_number().over(order_by=e)),
    "update where": lambda e: sa.update(Note).where(e).values(practice_id="p9"),
    "delete where": lambda e: sa.delete(Note).where(e),
}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    source=st.sampled_from(sorted(SOURCES)),
    construct=st.sampled_from(sorted(CONSTRUCTS)),
    position=st.sampled_from(sorted(POSITIONS)),
)
def test_any_construct_in_any_position_is_refused(
    data: sa.Engine, source: str, construct: str, position: str
) -> None:
    if construct == "bare" and position == "select":
        return  # selecting the column is the one thing a bare column may do
    stmt = POSITIONS[position](CONSTRUCTS[construct](SOURCES[source]()))
    before = stored(data)
    with sent(data) as statements, pytest.raises(UnsupportedOperation) as ei:
        with Session(data) as s:
            s.execute(stmt)
            s.commit()
    assert statements == []
    assert SECRET not in str(ei.value)
    assert stored(data) == before


# -- what stays allowed --------------------------------------------------------------------


def test_selecting_inserting_and_updating_values_still_work(data: sa.Engine) -> None:
    with Session(data) as s:
        assert [(n.id, n.body) for n in s.scalars(sa.select(Note).order_by(Note.id))] == [
            (1, "alpha note"),
            (2, "beta note"),
            (3, None),
        ]
        note = s.get(Note, 1)
        assert note is not None
        note.body = "alpha revised"
        s.add(Note(id=4, practice_id="p2", body="gamma"))
        s.commit()
        with carnet.tenant_scope("p2"):  # an ORM UPDATE by criteria has no row to take it from
            s.execute(sa.update(Note).where(Note.id == 2).values(body="beta revised"))
        s.execute(sa.insert(Note), [{"id": 5, "practice_id": "p1", "body": "delta"}])
        s.execute(sa.update(Note), [{"id": 5, "practice_id": "p1", "body": "delta 2"}])
        s.commit()
    with Session(data) as s:
        got = {n.id: n.body for n in s.scalars(sa.select(Note))}
        assert got == {1: "alpha revised", 2: "beta revised", 3: None, 4: "gamma", 5: "delta 2"}
        s.delete(s.get(Note, 4))
        s.commit()
    with carnet.tenant_scope("p1"), data.begin() as conn:
        conn.execute(comments.update().where(comments.c.id == 2).values(text="deux bis"))
        rows = conn.execute(
            sa.select(comments.c.id, comments.c.text)
            .where(comments.c.text.is_not(None))
            .order_by(comments.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [(1, "un"), (2, "deux bis")]


def test_null_tests_count_distinct_rows_and_union_all(data: sa.Engine) -> None:
    with Session(data) as s:
        assert s.scalar(sa.select(sa.func.count()).where(Note.body.is_(None))) == 1
        assert s.scalar(sa.select(sa.func.count()).where(Note.body.is_not(None))) == 2
        assert s.scalar(sa.select(sa.func.count(Note.body))) == 2
        assert s.scalar(sa.select(sa.func.count(Note.body)).where(Note.practice_id == "p1")) == 1
        rows = s.execute(
            sa.select(Note.practice_id, sa.func.count(Note.body))
            .group_by(Note.practice_id)
            .having(sa.func.count(Note.body) > 0)
            .order_by(Note.practice_id)
        ).all()
        assert [tuple(r) for r in rows] == [("p1", 1), ("p2", 1)]
        # DISTINCT over whole rows that include the primary key
        assert sorted(n.id for n in s.scalars(sa.select(Note).distinct())) == [1, 2, 3]
        pairs = s.execute(sa.select(N2.id, N2.practice_id, N2.body).distinct()).all()
        opened = sorted((r.id, r.body.open(r.practice_id)) for r in pairs if r.body is not None)
        assert opened == [(1, "alpha note"), (2, "beta note")]
        assert s.query(Note).distinct().count() == 3
        # UNION ALL does not compare rows
        both = s.execute(
            sa.union_all(
                sa.select(Note.id, Note.body).where(Note.id == 1),
                sa.select(N2.id, N2.body).where(N2.id == 1),
            )
        ).all()
        assert len(both) == 2
        # CASE on IS NULL, a subquery selecting the column
        flags = s.scalars(
            sa.select(sa.case((Note.body.is_(None), 1), else_=0)).order_by(Note.id)
        ).all()
        assert flags == [0, 0, 1]
        sq = sa.select(Note.id, Note.body).where(Note.id == 2).subquery()
        assert s.execute(sa.select(sq.c.id, sq.c.body)).one().id == 2
    with carnet.tenant_scope("p1"), data.connect() as conn:
        got = conn.execute(
            sa.select(sa.select(comments.c.text).where(comments.c.id == 1).scalar_subquery())
        ).scalar_one()
    assert got == "un"


def test_multi_row_values_and_upserts_with_values_still_work(data: sa.Engine) -> None:
    dialect = data.dialect.name
    if dialect in ("mysql", "mariadb"):
        m = mysql.insert(Note).values(id=1, practice_id="p1", body="x")
        upsert: Any = m.on_duplicate_key_update(body="alpha upserted")
    else:
        ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(Note)
        upsert = ins.values(id=1, practice_id="p1", body="x").on_conflict_do_update(
            index_elements=["id"], set_={Note.body: "alpha upserted"}
        )
    with carnet.tenant_scope("p1"), Session(data) as s:
        s.execute(
            sa.insert(Note).values(
                [
                    {"id": 7, "practice_id": "p1", "body": "seven"},
                    {"id": 8, "practice_id": "p1", "body": None},
                ]
            )
        )
        # The conflicting row may be another practice's: the write guard
        # (carnet.tenancy) refuses to seal a value for it.
        with pytest.raises(UnsupportedOperation, match="upsert"):
            s.execute(upsert)
        s.commit()
    with Session(data) as s:
        got = {n.id: n.body for n in s.scalars(sa.select(Note).where(Note.id.in_([1, 7, 8])))}
    assert got == {1: "alpha note", 7: "seven", 8: None}


def test_equality_between_encrypted_columns_compares_ciphertexts(data: sa.Engine) -> None:
    # Documented: outside a JOIN condition it runs, and holds only for the
    # very same stored bytes (here: a row with itself), never for equal texts.
    with Session(data) as s:
        s.add(Note(id=6, practice_id="p1", body="alpha note"))
        s.commit()
        pairs = s.execute(
            sa.select(Note.id, N2.id).where(Note.body == N2.body).order_by(Note.id, N2.id)
        ).all()
    assert [tuple(p) for p in pairs] == [(1, 1), (2, 2), (6, 6)]


def test_type_coerce_to_the_storage_type_opts_out(data: sa.Engine) -> None:
    # The explicit way to work on stored bytes, as carnet's batch engine does.
    with data.connect() as conn:
        raw = sa.type_coerce(notes.c.body, sa.LargeBinary)
        blob = conn.execute(sa.select(raw).where(notes.c.id == 1)).scalar_one()
        found = conn.execute(sa.select(notes.c.id).where(raw == bytes(blob))).scalars().all()
    assert found == [1]


def test_refused_statement_message_is_precise() -> None:
    with pytest.raises(UnsupportedOperation) as ei:
        check_statement(sa.select(Note).order_by(Note.summary))
    assert str(ei.value).startswith("ORDER BY on encrypted column 'notes.summary'")
    with pytest.raises(UnsupportedOperation) as ei:
        check_statement(sa.update(Note).values(body=Note.summary))
    assert "copy the ciphertext of encrypted column 'notes.summary'" in str(ei.value)


def test_operators_on_the_column_name_it_and_never_the_value() -> None:
    for build in (
        lambda: Note.body == SECRET,
        lambda: Note.summary.like(SECRET),
        lambda: SECRET + comments.c.text,
        lambda: N2.body.in_([SECRET]),
    ):
        with pytest.raises(UnsupportedOperation) as ei:
            build()
        message = str(ei.value)
        assert SECRET not in message
        assert any(
            label in message for label in ("'notes.body'", "'notes.summary'", "'comments.text'")
        )


# -- string references: names the compiler resolves against the statement ------------------

# (statement selecting / reading an encrypted column, a name that resolves to it)
NAMED_BASES: dict[str, tuple[Callable[[], Any], str]] = {
    "entity, column name": (lambda: sa.select(Note), "body"),
    "entity, text storage name": (lambda: sa.select(Note), "summary"),
    "selected column name": (lambda: sa.select(Note.id, Note.body), "body"),
    "label name": (lambda: sa.select(Note.id, Note.body.label("lbl")), "lbl"),
    "label of a text storage column": (lambda: sa.select(Note.summary.label("s2")), "s2"),
    "FROM column name": (lambda: sa.select(Note.id).select_from(Note), "body"),
    "aliased entity": (lambda: sa.select(N2), "body"),
    "subquery column name": (lambda: sa.select(_sq.c.id).select_from(_sq), "body"),
    "core column name": (lambda: sa.select(comments.c.id).select_from(comments), "text"),
}
NAME_WRAPPERS: dict[str, Callable[[str], Any]] = {
    "bare": lambda n: n,
    "desc": lambda n: sa.desc(n),
    "asc": lambda n: sa.asc(n),
    "nulls_last(desc)": lambda n: sa.nulls_last(sa.desc(n)),
    "nulls_first(asc)": lambda n: sa.nulls_first(sa.asc(n)),
}
NAME_POSITIONS: dict[str, Callable[[Any, Any], Any]] = {
    "order_by": lambda stmt, ref: stmt.order_by(ref),
    "group_by": lambda stmt, ref: stmt.group_by(ref),
    "window order by": lambda stmt, ref: stmt.add_columns(sa.func.row_number().over(order_by=ref)),
    "window partition by": lambda stmt, ref: stmt.add_columns(
        sa.func.row_number().over(partition_by=ref)
    ),
    "order_by in a subquery": lambda stmt, ref: sa.select(sa.func.count()).select_from(
        stmt.order_by(ref).limit(5).subquery()
    ),
}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    base=st.sampled_from(sorted(NAMED_BASES)),
    wrapper=st.sampled_from(sorted(NAME_WRAPPERS)),
    position=st.sampled_from(sorted(NAME_POSITIONS)),
)
def test_any_string_reference_in_any_position_is_refused(
    data: sa.Engine, base: str, wrapper: str, position: str
) -> None:
    build, name = NAMED_BASES[base]
    if position == "group_by" and wrapper != "bare":
        return  # GROUP BY takes no ASC / DESC
    if position.startswith("window partition") and wrapper != "bare":
        return
    stmt = NAME_POSITIONS[position](build(), NAME_WRAPPERS[wrapper](name))
    before = stored(data)
    with sent(data) as statements, pytest.raises(UnsupportedOperation) as ei:
        with Session(data) as s:
            s.execute(stmt)
    message = str(ei.value)
    assert "notes.body" in message or "notes.summary" in message or "comments.text" in message
    assert SECRET not in message
    assert statements == []
    assert stored(data) == before


def test_string_references_resolve_as_the_compiler_resolves_them(data: sa.Engine) -> None:
    # A name that resolves to a plain column runs, a label hiding the
    # encrypted column's name included; the same name resolving to ciphertext
    # is refused, and a name the guard cannot resolve while the statement
    # reads an encrypted column is refused too.
    with Session(data) as s:
        assert [n.id for n in s.scalars(sa.select(Note).order_by(sa.desc("id")))] == [3, 2, 1]
        rows = s.execute(
            sa.select(Note.id, Note.practice_id.label("body"), Note.body.label("b2")).order_by(
                sa.desc("body"), "id"
            )
        ).all()
        assert [r.id for r in rows] == [2, 1, 3]
        ranks = s.execute(
            sa.select(Note.id, sa.func.row_number().over(order_by=sa.desc("id"))).order_by(Note.id)
        ).all()
        assert [tuple(r) for r in ranks] == [(1, 3), (2, 2), (3, 1)]
        counts = s.execute(
            sa.select(Note.practice_id, sa.func.count(Note.body))
            .group_by("practice_id")
            .order_by("practice_id")
        ).all()
        assert [tuple(r) for r in counts] == [("p1", 1), ("p2", 1)]
    for refused in (
        sa.select(Note.practice_id.label("p"), Note.body.label("body")).order_by("body"),
        sa.select(Note).order_by(sa.desc("no_such_name")),
        sa.select(Note.id).select_from(Note).order_by(sa.nulls_first(sa.asc("nowhere"))),
    ):
        with pytest.raises(UnsupportedOperation) as ei:
            check_statement(refused)
        assert "'notes.body'" in str(ei.value) or "'notes.summary'" in str(ei.value)
    with pytest.raises(UnsupportedOperation, match="cannot resolve"):
        check_statement(sa.select(Note).order_by(sa.desc("no_such_name")))


# -- mapper-level expressions: added by the ORM when it compiles a query ------------------


class GuardBase(DeclarativeBase):
    pass


class FolderNote(GuardBase):
    __tablename__ = "guard_folder_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    folder_id: Mapped[int] = mapped_column(sa.ForeignKey("guard_folders.id"))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText())


class Folder(GuardBase):
    __tablename__ = "guard_folders"
    id: Mapped[int] = mapped_column(primary_key=True)
    notes: Mapped[list[FolderNote]] = relationship(order_by=FolderNote.body, viewonly=True)
    notes_by_id: Mapped[list[FolderNote]] = relationship(order_by=FolderNote.id, viewonly=True)


class EagerFolder(GuardBase):
    # The same table, its relationship eagerly joined by default.
    __table__ = Folder.__table__
    notes: Mapped[list[FolderNote]] = relationship(
        order_by=FolderNote.body, lazy="joined", viewonly=True
    )


class MeasuredNote(GuardBase):
    # The same table, with a SQL expression on the ciphertext mapped as an attribute.
    __table__ = FolderNote.__table__
    body_length = column_property(sa.func.length(__table__.c.body))


@pytest.fixture
def folders(data: sa.Engine) -> sa.Engine:
    GuardBase.metadata.create_all(data)
    with carnet.tenant_scope("p1"), Session(data) as s:
        s.add(Folder(id=1))
        s.flush()
        s.add_all([FolderNote(id=1, folder_id=1, body="un"), FolderNote(id=2, folder_id=1)])
        s.commit()
    return data


def test_column_property_on_ciphertext_is_refused_when_a_query_loads_it(
    folders: sa.Engine,
) -> None:
    for load in (
        lambda s: s.scalars(sa.select(MeasuredNote)).all(),
        lambda s: s.get(MeasuredNote, 1),
        lambda s: s.query(MeasuredNote).all(),
        lambda s: s.execute(sa.select(MeasuredNote.id, MeasuredNote.body_length)).all(),
    ):
        with sent(folders) as statements, pytest.raises(UnsupportedOperation) as ei:
            with Session(folders) as s:
                load(s)
        assert statements == []
        message = str(ei.value)
        assert "length()" in message and "'guard_folder_notes.body'" in message
    assert "column_property MeasuredNote.body_length" in str(
        pytest.raises(UnsupportedOperation, check_statement, sa.select(MeasuredNote)).value
    )
    with Session(folders) as s:  # the mapped table columns alone still load
        assert s.scalars(sa.select(MeasuredNote.id).order_by(MeasuredNote.id)).all() == [1, 2]


def test_relationship_order_by_on_ciphertext_is_refused_when_eagerly_loaded(
    folders: sa.Engine,
) -> None:
    for load in (
        lambda s: s.scalars(sa.select(Folder).options(joinedload(Folder.notes))).unique().all(),
        lambda s: s.scalars(sa.select(Folder).options(selectinload(Folder.notes))).all(),
        lambda s: s.query(Folder).options(joinedload(Folder.notes)).all(),
        lambda s: s.scalars(sa.select(EagerFolder)).unique().all(),
        lambda s: s.get(EagerFolder, 1),
    ):
        with sent(folders) as statements, pytest.raises(UnsupportedOperation) as ei:
            with carnet.tenant_scope("p1"), Session(folders) as s:
                load(s)
        assert statements == []
        message = str(ei.value)
        assert "ORDER BY" in message and "Folder.notes" in message
        assert "'guard_folder_notes.body'" in message
    with carnet.tenant_scope("p1"), Session(folders) as s:
        # ordered by a plain column: loads, in order, with the values
        for option in (joinedload, selectinload):
            folder = s.scalars(sa.select(Folder).options(option(Folder.notes_by_id))).unique().one()
            assert [(n.id, n.body) for n in folder.notes_by_id] == [(1, "un"), (2, None)]
            s.expunge_all()
        # the lazy load of the ciphertext-ordered relationship is refused when it runs
        folder = s.scalars(sa.select(Folder)).one()
        with pytest.raises(UnsupportedOperation, match="ORDER BY"):
            _ = folder.notes
