"""carnet reads SQLAlchemy's private names in one module, and refuses when one changes.

A SQLAlchemy release that renames or reshapes an attribute carnet reads must
make carnet refuse statements, never let them through unchecked. For every
name in ``carnet._sa.NAMES`` a statement that depends on it runs first as
is, then with the name renamed (as a release would) and with it pointing at
an attribute of another shape: each time it is refused with
``UnsupportedOperation`` and writes nothing. A scan of the source shows no
other module reads a private SQLAlchemy name, and one ``before_execute``
listener is all carnet attaches.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet import _sa, guard, tenancy
from carnet.errors import UnsupportedOperation
from support.models import Note

SRC = Path(carnet.__file__).parent
notes = Note.__table__


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    # SQLite is enough: what is tested is carnet's reading of statements.
    eng = sa.create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    yield eng
    eng.dispose()


@pytest.fixture
def a_note(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """The shared ``keys`` and one note of practice p1 for the statements to touch."""
    with Session(engine) as s:
        s.add(Note(id=1, practice_id="p1", body="premier", summary="un"))
        s.commit()


def _count(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(notes)).scalar_one())


_next_id = iter(range(100, 10_000))


def core_insert(engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(notes.insert(), {"id": next(_next_id), "practice_id": "p1", "body": "x"})


def core_insert_values(engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(notes.insert().values(id=next(_next_id), practice_id="p1", body="x"))


def multi_values(engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(notes.insert().values([{"id": next(_next_id), "practice_id": "p1"}]))


def orm_bulk_update(engine: sa.Engine) -> None:
    # An ORM statement: its table is an annotated copy of the Table.
    with carnet.tenant_scope("p1"), Session(engine) as s:
        s.execute(sa.update(Note).where(Note.id == 1).values(body="mis à jour"))
        s.commit()


def orm_select(engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), Session(engine) as s:
        s.scalars(sa.select(Note)).all()


def distinct_select(engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        conn.execute(sa.select(notes.c.id, notes.c.body).distinct()).all()


def string_reference(engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        conn.execute(sa.select(notes).where(notes.c.id > 0).order_by(sa.desc("practice_id"))).all()


def lambda_select(engine: sa.Engine) -> None:
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        conn.execute(sa.lambda_stmt(lambda: sa.select(notes.c.body))).all()


def orm_move(engine: sa.Engine) -> None:
    # The row moves to another practice: the ORM reads its stored values by
    # primary key to re-seal them.
    with Session(engine) as s:
        note = s.get(Note, 1)
        assert note is not None
        note.practice_id = "p2" if note.practice_id == "p1" else "p1"
        s.commit()


def declare_table(_engine: sa.Engine) -> None:
    sa.Table(
        f"t{next(_next_id)}",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(20)),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
    )


def copy_column(_engine: sa.Engine) -> None:
    from carnet.migrate import carnet_tables

    col = sa.Column("kind", sa.String(10), nullable=True)
    carnet_tables._add_column_step("carnet_keys", col)


def ordered_update(engine: sa.Engine) -> None:
    # NULL: nothing to bind, so the statement runs as written (a text value
    # would be refused: test_ordered_values_writing_a_note_is_refused_clearly).
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(notes.update().where(notes.c.id == 1).ordered_values((notes.c.body, None)))


def core_rows_read(engine: sa.Engine) -> None:
    # A trail that records rows: a Core read of a note installs the row hook.
    from carnet.audit import AuditTrail

    keys = carnet.get_manager()
    previous = keys.decrypt_hook
    trail = AuditTrail(keys, background=False, rows=True).install(keys)
    try:
        with carnet.tenant_scope("p1"), engine.connect() as conn:
            assert conn.execute(sa.select(notes).where(notes.c.id == 1)).all()
        assert trail.rows_recorded == 2  # its body and its summary
    finally:
        keys.decrypt_hook = previous
        trail.close()


def orm_load(engine: sa.Engine) -> None:
    # A new model each time (its loader is set up when its mapper is
    # configured), loaded through the ORM: the note opens as its row loads.
    from sqlalchemy.orm import DeclarativeBase, configure_mappers, mapped_column

    class Base(DeclarativeBase):
        pass

    name = f"loaded_{next(_next_id)}"
    model: Any = type(
        name,
        (Base,),
        {
            "__tablename__": name,
            "id": mapped_column(sa.Integer, primary_key=True),
            "practice_id": mapped_column(sa.String(20)),
            "body": mapped_column(carnet.EncryptedText(tenant="practice_id")),
        },
    )
    try:
        configure_mappers()
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add(model(id=1, practice_id="p1", body="chargé"))
            s.commit()
        with Session(engine) as s:
            assert s.scalars(sa.select(model)).one().body == "chargé"
    finally:
        Base.registry.dispose()  # a mapper that failed to configure fails every later one


# What depends on each name. A name added to carnet._sa.NAMES without a
# statement here fails test_every_private_name_has_a_statement.
SCENARIOS: dict[str, Callable[[sa.Engine], None]] = {
    "dml_values": core_insert_values,
    "multi_values": multi_values,
    "select_names": core_insert,
    "post_values_clause": core_insert,
    "annotated_element": orm_bulk_update,
    "traverse_internals": orm_select,
    "lambda_resolved": lambda_select,
    "raw_columns": orm_select,
    "with_options": orm_select,
    "annotations": orm_select,
    "distinct": distinct_select,
    "distinct_on": distinct_select,
    "from_obj": string_reference,
    "where_criteria": string_reference,
    "from_objects": string_reference,
    "all_selected_columns": string_reference,
    "allow_label_resolve": string_reference,
    "tq_label": string_reference,
    "select_iterables": string_reference,
    "textual_label_reference": orm_select,
    "label_reference": orm_select,
    "pks_by_table": orm_move,
    "on_table_attach": declare_table,
    "column_copy": copy_column,
    "variant_mapping": core_insert,
    "ordered_values": ordered_update,
    "propagate_attrs": core_rows_read,
    "row_logging_fn": core_rows_read,
    "row_getter": core_rows_read,
    "column_loader": orm_load,
    "strategies": orm_load,
    "result_getter": orm_load,
    "entities": orm_load,
    "result_metadata": orm_load,
    "processors": orm_load,
    "tuplefilter": orm_load,
    "index_for_key": orm_load,
}


def _forget_verdicts() -> None:
    # carnet remembers what it found per statement, class and table; a test
    # that changes what SQLAlchemy looks like starts from nothing.
    guard.clear_caches()
    tenancy.clear_caches()


def test_every_private_name_has_a_statement() -> None:
    assert set(_sa.NAMES) <= set(SCENARIOS)


@pytest.mark.parametrize("key", sorted(_sa.NAMES))
@pytest.mark.parametrize("change", ["renamed", "reshaped"])
def test_a_changed_private_name_refuses_the_statement(
    key: str, change: str, a_note: None, engine: sa.Engine, monkeypatch: Any
) -> None:
    scenario = SCENARIOS[key]
    _forget_verdicts()
    scenario(engine)  # runs as is
    before = _count(engine)
    entry = _sa.NAMES[key]
    if change == "renamed":
        changed = dataclasses.replace(entry, attr=entry.attr + "_renamed_upstream")
    else:
        if entry.shape is None:
            pytest.skip("carnet reads this name without expecting a shape")
        # An attribute every object has, of a shape this name never has: a
        # class where a value is expected, a docstring where a class or a callable is.
        callable_or_class = any(t in entry.shape for t in (type, Callable))
        changed = dataclasses.replace(entry, attr="__doc__" if callable_or_class else "__class__")
    monkeypatch.setitem(_sa.NAMES, key, changed)
    _forget_verdicts()
    try:
        with pytest.raises(UnsupportedOperation, match="installed SQLAlchemy"):
            scenario(engine)
    finally:
        monkeypatch.undo()
        _forget_verdicts()
    assert _count(engine) == before  # nothing written


# -- no other module reads a private SQLAlchemy name ------------------------------------------

# Row._mapping is public API (the underscore keeps it clear of column names).
_PUBLIC_UNDERSCORED = {"_mapping", "_asdict", "_fields", "_t", "_tuple"}


def _sqlalchemy_private_names() -> set[str]:
    """Every ``_name`` SQLAlchemy's own source defines or reads as an attribute."""
    root = Path(sa.__file__).parent
    names: set[str] = set()
    pattern = re.compile(r"\.(_[a-zA-Z][a-zA-Z0-9_]*)|def (_[a-zA-Z][a-zA-Z0-9_]*)")
    for path in root.rglob("*.py"):
        for m in pattern.finditer(path.read_text(encoding="utf-8")):
            name = m.group(1) or m.group(2)
            if not name.startswith("__"):
                names.add(name)
    return names


def _carnet_own_names(trees: dict[Path, ast.Module]) -> set[str]:
    """The ``_names`` carnet defines itself (its own attributes, functions, slots, modules)."""
    own: set[str] = {p.stem for p in SRC.rglob("*.py")}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
                and isinstance(node.value, ast.Tuple)
            ):
                own.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return own


def test_no_module_but_carnet_sa_reads_a_private_sqlalchemy_name() -> None:
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in SRC.rglob("*.py")}
    others = {p: t for p, t in trees.items() if p.name != "_sa.py"}
    sa_private = _sqlalchemy_private_names() - _carnet_own_names(others) - _PUBLIC_UNDERSCORED
    assert {"_values", "_raw_columns", "_pks_by_table"} <= sa_private  # the scan sees them
    found: list[str] = []
    for path, tree in trees.items():
        if path.name == "_sa.py":
            continue
        where = path.relative_to(SRC)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in sa_private:
                found.append(f"{where}:{node.lineno} .{node.attr}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr", "setattr")
                and len(node.args) > 1
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in sa_private
            ):
                found.append(f"{where}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                found += [
                    f"{where}:{node.lineno} import {a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert found == []


def test_one_module_attaches_listeners_and_one_before_execute_runs(
    a_note: None, engine: sa.Engine
) -> None:
    callers = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("listen", "listens_for")
            ):
                callers.append(path.name)
    assert set(callers) == {"_hooks.py"}
    listeners = [
        fn
        for fn in engine.dispatch.before_execute
        if getattr(fn, "__module__", "").startswith("carnet")
    ]
    assert len(listeners) == 1


def test_ordered_values_writing_a_note_is_refused_clearly(a_note: None, engine: sa.Engine) -> None:
    stmt = notes.update().where(notes.c.id == 1).ordered_values((notes.c.body, "PLANTED"))
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        with pytest.raises(UnsupportedOperation, match="ordered_values") as err:
            conn.execute(stmt)
    assert "PLANTED" not in str(err.value)
    with carnet.tenant_scope("p1"), engine.connect() as conn:
        body = conn.execute(sa.select(notes.c.body).where(notes.c.id == 1)).scalar_one()
    assert body == "premier"  # nothing written
