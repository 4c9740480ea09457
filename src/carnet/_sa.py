"""Every read carnet makes of SQLAlchemy's private names, in one module.

The statement pipeline must see parts of a statement that SQLAlchemy keeps
no public accessor for: the values an INSERT or UPDATE writes inside itself,
an INSERT's FROM SELECT and ON CONFLICT clauses, the parts of a SELECT a
string reference can name, the traversal table of every SQL element. A
rename or a reshape of any of them in a SQLAlchemy release must make carnet
refuse statements, never let them through unchecked: so no other module
touches a private name (``tests/unit/test_sa_private.py`` scans them), and
each read here goes through :func:`_read`, which raises
:class:`~carnet.errors.UnsupportedOperation` when the attribute is missing or
has an unexpected shape.

:data:`NAMES` lists what is read; the same test renames each entry in turn
and shows that a statement depending on it is refused.

Where a public API does the job it is used instead: ``Session.expire``,
``Row._mapping`` (public despite its underscore), the ``keyword`` of a
compound select.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import cursor as engine_cursor
from sqlalchemy.engine import result as engine_result
from sqlalchemy.orm import Mapper
from sqlalchemy.orm import context as orm_context
from sqlalchemy.orm import interfaces as orm_interfaces
from sqlalchemy.orm import strategies as orm_strategies
from sqlalchemy.sql import annotation, base, dml, elements, lambdas
from sqlalchemy.sql import schema as sa_schema
from sqlalchemy.types import TypeEngine

from .errors import UnsupportedOperation

# SQLAlchemy 2.0 keeps an UPDATE's ordered values apart; 2.1 keeps them in ``_values``.
SA_20 = sa.__version__.startswith("2.0.")


@dataclass(frozen=True)
class Private:
    """One private name carnet reads.

    ``owner``: the class (or module) SQLAlchemy defines it on. ``optional``:
    instances may lack it (read as ``default``) as long as ``owner`` still
    defines it, so a rename is still noticed. ``shape``: the types its value
    may have; anything else is refused. ``needed_for``: what carnet cannot do
    without it, in the refusal.
    """

    attr: str
    owner: Any
    shape: tuple[type, ...] | None = None
    optional: bool = False
    default: Any = None
    needed_for: str = "check the statement for the tenant invariant"


_SEQ = (list, tuple)
_SEQ_OR_NONE = (list, tuple, type(None))
_MAP_OR_NONE = (Mapping, type(None))

_ROWS_READ = "record the rows this read discloses, which the audit trail wants"
_ORM_LOAD = "open an encrypted attribute as the ORM loads its row"

NAMES: dict[str, Private] = {
    # DML: what an INSERT / UPDATE writes inside the statement itself.
    "dml_values": Private("_values", dml.ValuesBase, _MAP_OR_NONE),
    "multi_values": Private("_multi_values", dml.ValuesBase, _SEQ),
    "select_names": Private("_select_names", dml.Insert, _SEQ_OR_NONE),
    "post_values_clause": Private("_post_values_clause", dml.Insert),
    # Annotated copies (ORM statements) of a Table: the Table they copy.
    "annotated_element": Private("_Annotated__element", annotation.Annotated),
    # The SQL guard's walk.
    "traverse_internals": Private("_traverse_internals", sa.Select, _SEQ),
    "lambda_resolved": Private("_resolved", lambdas.LambdaElement, (sa.ClauseElement,)),
    "raw_columns": Private("_raw_columns", sa.Select, _SEQ),
    "with_options": Private("_with_options", base.Executable, _SEQ),
    "annotations": Private("_annotations", sa.ClauseElement, (Mapping,)),
    "distinct": Private("_distinct", sa.Select, (bool,)),
    "distinct_on": Private("_distinct_on", sa.Select, _SEQ),
    "from_obj": Private("_from_obj", sa.Select, _SEQ),
    "where_criteria": Private("_where_criteria", sa.Select, _SEQ),
    "from_objects": Private("_from_objects", sa.ClauseElement, _SEQ),
    "all_selected_columns": Private("_all_selected_columns", sa.Select, (Iterable,)),
    "allow_label_resolve": Private(
        "_allow_label_resolve", elements.ColumnElement, (bool,), optional=True, default=True
    ),
    "tq_label": Private(
        "_tq_label", elements.ColumnClause, (str, type(None)), optional=True, default=None
    ),
    "select_iterables": Private("_select_iterables", base, (Callable,)),  # type: ignore[arg-type]
    "textual_label_reference": Private("_textual_label_reference", elements, (type,)),
    "label_reference": Private("_label_reference", elements, (type,)),
    # The ORM: a mapper's primary key columns per table (joined inheritance).
    "pks_by_table": Private("_pks_by_table", Mapper, (Mapping,)),
    # Schema: a type learns its column's table; a column copied for another table.
    "on_table_attach": Private("_on_table_attach", sa_schema.Column, (Callable,)),  # type: ignore[arg-type]
    "column_copy": Private("_copy", sa_schema.Column, (Callable,)),  # type: ignore[arg-type]
    "variant_mapping": Private(
        "_variant_mapping", TypeEngine, (Mapping,), optional=True, default=None
    ),
    # The audit trail's rows of a Core read: is the statement an ORM one (its
    # entities' loads record their rows), and the per-result row hook
    # (echo="debug" logs rows through it) with the row factory memoized from it.
    "propagate_attrs": Private(
        "_propagate_attrs", sa.ClauseElement, (Mapping,), needed_for=_ROWS_READ
    ),
    "row_logging_fn": Private(
        "_row_logging_fn",
        engine_result.Result,
        (Callable, type(None)),  # type: ignore[arg-type]
        needed_for=_ROWS_READ,
    ),
    "row_getter": Private(
        "_row_getter",
        engine_result.Result,
        (Callable, tuple),  # type: ignore[arg-type]
        needed_for=_ROWS_READ,
    ),
    # The ORM's loading of a column attribute: an encrypted attribute is loaded
    # by a loader of SQLAlchemy's own kind that opens its value with the row's
    # practice from the same row (carnet.orm), in place of the default one.
    "column_loader": Private(
        "ColumnLoader" if SA_20 else "_ColumnLoader", orm_strategies, (type,), needed_for=_ORM_LOAD
    ),
    "strategies": Private(
        "_strategies", orm_interfaces.StrategizedProperty, (dict,), needed_for=_ORM_LOAD
    ),
    "result_getter": Private(
        "_getter",
        engine_result.ResultInternal,
        (Callable,),  # type: ignore[arg-type]
        needed_for=_ORM_LOAD,
    ),
    # ... and reads it as the driver returned it, for that result alone: the
    # query's other entities, the result's metadata, the processors of its
    # rows' columns and where a column is in them.
    "entities": Private(
        "_entities",
        getattr(orm_context, "ORMCompileState" if SA_20 else "_ORMCompileState", None),
        (list,),
        needed_for=_ORM_LOAD,
    ),
    "result_metadata": Private(
        "_metadata",
        engine_result.ResultInternal,
        (engine_result.ResultMetaData,),
        needed_for=_ORM_LOAD,
    ),
    "processors": Private(
        "_processors", engine_cursor.CursorResultMetaData, (list, tuple), needed_for=_ORM_LOAD
    ),
    "tuplefilter": Private(
        "_tuplefilter",
        engine_result.ResultMetaData,
        (Callable, type(None)),  # type: ignore[arg-type]
        needed_for=_ORM_LOAD,
    ),
    "index_for_key": Private(
        "_index_for_key",
        engine_result.ResultMetaData,
        (Callable,),  # type: ignore[arg-type]
        needed_for=_ORM_LOAD,
    ),
}
if SA_20:
    NAMES["ordered_values"] = Private("_ordered_values", dml.Update, _SEQ_OR_NONE)

_ABSENT = object()


def not_understood(key: str, obj: Any = None) -> UnsupportedOperation:
    """The refusal when SQLAlchemy's private state is not what carnet reads."""
    p = NAMES.get(key)
    what = p.attr if p is not None else key
    needed_for = p.needed_for if p is not None else Private.needed_for
    kind = type(obj).__name__ if obj is not None else "a statement"
    return UnsupportedOperation(
        f"carnet cannot read {kind}.{what} with the installed SQLAlchemy ({sa.__version__}): "
        f"the attribute is missing or has an unexpected shape, so carnet cannot {needed_for}; "
        "refused. Install a SQLAlchemy version carnet supports"
    )


def _read(obj: Any, key: str) -> Any:
    p = NAMES[key]
    value = getattr(obj, p.attr, _ABSENT)
    if value is _ABSENT:
        if p.optional and hasattr(p.owner, p.attr):
            return p.default
        raise not_understood(key, obj)
    if p.shape is not None and not isinstance(value, p.shape):
        raise not_understood(key, obj)
    return value


# -- DML ---------------------------------------------------------------------------------


def dml_values(stmt: Any) -> Mapping[Any, Any] | None:
    """``insert().values(...)`` / ``update().values(...)``: column -> value, or None."""
    return _read(stmt, "dml_values")  # type: ignore[no-any-return]


def ordered_values(stmt: Any) -> list[tuple[Any, Any]]:
    """``update().ordered_values(...)`` on SQLAlchemy 2.0 (2.1 keeps them in ``_values``)."""
    if not SA_20 or not isinstance(stmt, dml.Update):
        return []
    return list(_read(stmt, "ordered_values") or ())


def multi_values(stmt: Any) -> tuple[Any, ...]:
    """A multi-row ``insert().values([...])``: groups of rows (dicts or tuples)."""
    return tuple(_read(stmt, "multi_values"))


def select_names(stmt: Any) -> list[Any]:
    """INSERT ... FROM SELECT: the columns the SELECT fills; empty otherwise."""
    if not isinstance(stmt, dml.Insert):
        return []
    return list(_read(stmt, "select_names") or ())


def post_values_clause(stmt: Any) -> Any:
    """ON CONFLICT ... / ON DUPLICATE KEY UPDATE of an INSERT, or None."""
    return _read(stmt, "post_values_clause")


def written_names(stmt: Any) -> set[Any]:
    """The column keys or names an INSERT / UPDATE writes inside the statement."""
    keys: list[Any] = list(dml_values(stmt) or ())
    keys += [k for k, _v in ordered_values(stmt)]
    for group in multi_values(stmt):
        for row in group:
            if not isinstance(row, Mapping):
                raise not_understood("multi_values", stmt)
            keys += list(row)
    return {getattr(k, "key", k) for k in keys}


def deannotated(table: Any) -> Any:
    """The Table an ORM statement's annotated copy stands for (or the table itself)."""
    if isinstance(table, annotation.Annotated):
        return _read(table, "annotated_element")
    return table


# -- the SQL guard's walk --------------------------------------------------------------------


def traverse_internals(cls: type) -> list[tuple[str, Any]] | None:
    """The (attribute, kind) table SQLAlchemy walks ``cls`` by; None for a class without one.

    Some classes hold no SQL element (SAVEPOINT clauses) and SQLAlchemy 2.0's
    ON CONFLICT / ON DUPLICATE KEY clauses declare none. That ``Select``
    still has one tells a class without it from a renamed attribute.
    """
    attr = NAMES["traverse_internals"].attr
    value = getattr(cls, attr, None)
    if value is None:
        if not isinstance(getattr(sa.Select, attr, None), _SEQ):
            raise not_understood("traverse_internals", cls)
        return None
    if not isinstance(value, _SEQ):
        raise not_understood("traverse_internals", cls)
    return list(value)


def lambda_resolved(el: Any) -> Any:
    return _read(el, "lambda_resolved")


def raw_columns(select: Any) -> list[Any]:
    return list(_read(select, "raw_columns"))


def with_options(select: Any) -> list[Any]:
    return list(_read(select, "with_options"))


def annotations_of(el: Any) -> Mapping[str, Any]:
    return _read(el, "annotations")  # type: ignore[no-any-return]


def is_distinct(select: Any) -> bool:
    """A plain ``SELECT DISTINCT`` (not ``DISTINCT ON``)."""
    return bool(_read(select, "distinct")) and not _read(select, "distinct_on")


def from_objects_of(select: Any) -> list[Any]:
    """As SQLAlchemy's SelectState gathers them, without compiling: FROM objects given,
    those of the columns clause, those of WHERE."""
    found = [*_read(select, "from_obj"), *select.columns_clause_froms]
    for crit in _read(select, "where_criteria"):
        found.extend(_read(crit, "from_objects"))
    return found


def all_selected_columns(select: Any) -> list[Any]:
    return list(_read(select, "all_selected_columns"))


def allow_label_resolve(col: Any) -> bool:
    return bool(_read(col, "allow_label_resolve"))


def tq_label(col: Any) -> str | None:
    return _read(col, "tq_label")  # type: ignore[no-any-return]


def select_iterables(froms: list[Any]) -> Iterable[Any]:
    return _read(base, "select_iterables")(froms)  # type: ignore[no-any-return]


def textual_label_reference() -> type:
    """The element ``order_by("body")``, ``desc("b")`` put in a statement."""
    return _read(elements, "textual_label_reference")  # type: ignore[no-any-return]


def label_reference() -> type:
    return _read(elements, "label_reference")  # type: ignore[no-any-return]


def is_union_all(compound: Any) -> bool:
    keyword = compound.keyword
    return str(getattr(keyword, "value", keyword)).upper() == "UNION ALL"


# -- ORM and schema -------------------------------------------------------------------------


def pks_by_table(mapper: Any, table: Any) -> list[Any]:
    """The primary key columns of one of a mapper's tables, in identity order."""
    found = _read(mapper, "pks_by_table").get(table)
    if found is None:
        raise not_understood("pks_by_table", mapper)
    return list(found)


def on_table_attach(column: Any, fn: Callable[[Any, Any], None]) -> None:
    """Call ``fn(column, table)`` once the column is part of a table."""
    _read(column, "on_table_attach")(fn)


def copy_column(column: Any) -> Any:
    return _read(column, "column_copy")()


def variant_mapping(typ: Any) -> Mapping[str, Any] | None:
    """``with_variant``'s dialect name -> type, or None."""
    return _read(typ, "variant_mapping")  # type: ignore[no-any-return]


# -- results: the audit trail's rows of a Core read -----------------------------------------

# The execution option an ORM Session adds to every ORM SELECT it runs, to load
# its results (SQLAlchemy's ORMSelectCompileState.orm_pre_session_exec, 2.0 and
# 2.1). Not an attribute, so not in NAMES: if a release dropped it, a Session's
# reads would look like Core reads and their rows be recorded twice
# (tests/unit/test_audit_trail_core.py fails), never not at all.
ORM_SESSION_OPTION = "_result_disable_adapt_to_context"


def orm_loads(statement: Any, execution_options: Mapping[str, Any]) -> bool:
    """An ORM SELECT a Session runs: the ORM loads its results, and its own load events
    record the rows of the entities (an ORM statement run on a Connection is not one)."""
    plugin = _read(statement, "propagate_attrs").get("compile_state_plugin")
    return plugin == "orm" and ORM_SESSION_OPTION in execution_options


def on_each_row(result: Any, fn: Callable[[Any], None]) -> None:
    """Call ``fn(row)`` for each Row ``result`` makes from now on, as SQLAlchemy makes it
    (a fetch of two rows calls it twice), before the rows SQLAlchemy's own row hook
    (``echo="debug"``) logs. ``result``: a CursorResult no row was fetched from yet (an
    ``after_execute`` listener's).

    SQLAlchemy applies ``Result._row_logging_fn`` to every Row it makes, through a row
    factory (``_row_getter``) memoized when the result is made: the function is chained
    with the one already there and the factory forgotten, so the next fetch makes it
    again with the function (its sub-results, ``.scalars()`` / ``.mappings()``, make
    theirs from the same function). Raises :class:`UnsupportedOperation` when either name
    is not what carnet expects: a hook that silently never runs would record nothing.
    """
    previous = _read(result, "row_logging_fn")
    _read(result, "row_getter")  # the memoized factory is there, of a known shape

    if previous is None:

        def hook(row: Any) -> Any:
            fn(row)
            return row

    else:

        def hook(row: Any) -> Any:
            fn(row)
            return previous(row)

    setattr(result, NAMES["row_logging_fn"].attr, hook)
    vars(result).pop(NAMES["row_getter"].attr, None)


# -- the ORM's column loading --------------------------------------------------------------

RowGetter = Callable[[Any], Any]
Populator = Callable[[Any, Any, Any], None]
# make(key, column, practice) -> (getter, populator), called once per result:
# with the value's column in that result's rows (:class:`LoadedColumn`) and the
# getter of the practice column in them (``practice`` None: not in them), the
# getter of the attribute's value for a row (None: the value the column type
# makes of it, ``column.processed()``) and a populator run after the row's
# columns are loaded, with ``(state, dict_, row)`` (None: none).
MakeGetter = Callable[
    [str, "LoadedColumn", "RowGetter | None"], "tuple[RowGetter | None, Populator | None]"
]

# Per result (in its __dict__): its rows' column indexes read as the driver
# returned them (True) or kept as the column type makes them (False), decided by
# the first loader of that column in the result (every later one agrees).
_READ_RAW = "_carnet_read_raw"


class LoadedColumn:
    """An encrypted column in one result's rows, as the ORM loads it.

    The column type's result processor turns each stored value into what a
    Core read gets (:class:`~carnet.types.Sealed`, or the text in a scope).
    An ORM load that opens the value with the row's practice itself can
    instead read it as the driver returned it (:meth:`unprocessed`), sparing a
    placeholder and a call per value.
    """

    __slots__ = ("_result", "_context", "_column", "_body", "_before_rows")

    def __init__(
        self, result: Any, context: Any, column: Any, body: RowGetter, before_rows: bool
    ) -> None:
        self._result = result
        self._context = context
        self._column = column
        self._body = body
        # Made before the result's first row was fetched: a query's own entities'
        # loaders are; a subclass's, in a polymorphic load, is made as its first row
        # is met, and its joined eager loads', too (see LoadedColumn.unprocessed).
        self._before_rows = before_rows

    def processed(self) -> RowGetter:
        """The getter of the value the column type makes of each stored value."""
        found = self._index()
        if found is None:
            return self._body
        index, processor, marks = found
        raw = marks.setdefault(index, (False, processor))[0]
        if not raw:
            return self._body
        # Another loader of this result reads this column unprocessed (from its
        # first row on): the processor applied here.
        get = self._body

        def getter(row: Any) -> Any:
            v = get(row)
            return None if v is None else processor(v)

        return getter

    def unprocessed(self, shared: Callable[[Any], bool]) -> tuple[RowGetter, Any] | None:
        """The getter of the value as the driver returned it, and the column type's
        processor for what the caller leaves to it; None when this result's rows keep
        the column type's value. Every value the getter returns is as the driver
        returned it.

        The processor is skipped for this result's rows alone (its own copy of
        the result's metadata): SQLAlchemy shares the metadata with every
        execution of the statement, and Core reads. Skipping starts only before
        the result's first row is fetched (a loader made later reads the column
        unprocessed only if an earlier one started it). It is kept when another
        entity of the query (a bare column, a bundle's) has a column for which
        ``shared(column)`` is true: it may be the same column of the rows, read
        as the column type makes it; when another loader of this result keeps
        it; when an entity of the query has a ``query_expression()`` attribute
        (``with_expression(Note.x, Note.body)`` reads the column at the same
        place of the rows, as the column type makes it); when the rows are not a
        cursor's, or were reduced.
        """
        entities = _read(self._context.compile_state, "entities")
        for column in _entity_columns(entities):
            if shared(column):
                return None
        if any(_has_query_expression(ent) for ent in entities):
            return None
        found = self._index()
        if found is None:
            return None
        index, processor, marks = found
        if index not in marks:
            if not self._before_rows:
                return None
            result = self._result
            metadata = _read(result, "result_metadata")
            processors = list(_read(metadata, "processors"))
            processors[index] = None
            copy = _copy_slots(metadata)
            setattr(copy, NAMES["processors"].attr, processors)
            setattr(result, NAMES["result_metadata"].attr, copy)
            # The row factory SQLAlchemy memoized from the metadata, made again at
            # the next fetch (as on_each_row does).
            _read(result, "row_getter")
            vars(result).pop(NAMES["row_getter"].attr, None)
            marks[index] = (True, processor)
        return (self._body, processor) if marks[index][0] else None

    def _index(self) -> tuple[int, Any, dict[int, tuple[bool, Any]]] | None:
        """The column's index in the rows, its processor as the statement has it, the
        result's marks; None for rows that are not a cursor's, reduced ones, or a
        column without a processor."""
        metadata = _read(self._result, "result_metadata")
        if not isinstance(metadata, engine_cursor.CursorResultMetaData):
            return None
        processors = _read(metadata, "processors")
        if _read(metadata, "tuplefilter") is not None:
            return None
        index = _read(metadata, "index_for_key")(self._column, False)
        if index is None or not 0 <= index < len(processors):
            return None
        state = vars(self._result)
        marks: dict[int, tuple[bool, Any]] | None = state.get(_READ_RAW)
        if marks is None:
            marks = state[_READ_RAW] = {}
        # The result's own copy has None where a column is read unprocessed: the
        # processor is kept with the mark.
        processor = marks[index][1] if index in marks else processors[index]
        if processor is None:
            return None
        return index, processor, marks


def _entity_columns(entities: Iterable[Any]) -> Iterable[Any]:
    """The columns of a query's bare column entities, bundles' included."""
    for ent in entities:
        inner = getattr(ent, NAMES["entities"].attr, None)
        if isinstance(inner, list):  # a Bundle's entities
            yield from _entity_columns(inner)
            continue
        column = getattr(ent, "column", None)
        if column is not None:
            yield column


def _has_query_expression(entity: Any) -> bool:
    """A mapper entity with a ``query_expression()`` attribute, its subclasses' included
    (``with_expression`` gives it any column of the query, in the rows' place of it)."""
    mapper = getattr(entity, "mapper", None)
    if not isinstance(mapper, Mapper):
        return False
    return any(
        dict(prop.strategy_key).get("query_expression")
        for m in mapper.self_and_descendants
        for prop in m.column_attrs
    )


def _copy_slots(obj: Any) -> Any:
    """A shallow copy of an object with ``__slots__`` (``copy.copy`` would go through
    the pickling state, which a result metadata reduces)."""
    cls: Any = type(obj)
    new = cls.__new__(cls)
    for klass in cls.__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                setattr(new, name, getattr(obj, name))
    return new


# The strategy key SQLAlchemy loads a column attribute's value with (a
# deferred column's too, once undeferred).
_LOAD_KEY = (("deferred", False), ("instrument", True))
_loader_classes: dict[type, type] = {}


def load_column_with(prop: Any, practice_column: Any, make: MakeGetter) -> None:
    """Have the ORM load column attribute ``prop`` through ``make``.

    SQLAlchemy loads a column attribute with a getter of the row
    (``populators["quick"]``), memoized per query when the query is compiled.
    ``prop``'s loader becomes a subclass of SQLAlchemy's own column loader that
    does not memoize it, so that SQLAlchemy asks it, per result, for the getter:
    it hands ``make`` the value's column in that result's rows
    (:class:`LoadedColumn`) and the getter of ``practice_column`` in them
    (adapted for aliases, joined eager loads and inheritance). Installed as the
    strategy SQLAlchemy loads the column with (an undeferred column's too). Raises
    :class:`UnsupportedOperation` when SQLAlchemy's loader is not what carnet
    expects.
    """
    base = _read(orm_strategies, "column_loader")
    strategies = _read(prop, "strategies")
    # SQLAlchemy's loader, or carnet's already (a single-table subclass's mapper
    # shares its parent's column attributes).
    known = (base, *_loader_classes.values())
    current = strategies.get(_LOAD_KEY)
    if current is not None and type(current) not in known:
        raise not_understood("column_loader", current)
    if prop.strategy_key == _LOAD_KEY and type(prop.strategy) not in known:
        raise not_understood("column_loader", prop.strategy)
    cls = _loader_classes.get(base)
    if cls is None:
        cls = _loader_classes[base] = _opening_loader(base)
    loader = cls(prop, _LOAD_KEY)
    loader.carnet_make = make
    loader.carnet_practice = practice_column
    strategies[_LOAD_KEY] = loader
    if prop.strategy_key == _LOAD_KEY:
        prop.strategy = loader


def _opening_loader(base: type) -> type:
    class OpeningColumnLoader(base):
        """SQLAlchemy's column loader, asking carnet for the getter of each result."""

        __slots__ = ("carnet_make", "carnet_practice")

        def setup_query(self, *args: Any, **kw: Any) -> None:
            super().setup_query(*args, **kw)
            # Not memoized: SQLAlchemy then calls create_row_processor per result.
            memoized = kw.get("memoized_populators", args[6] if len(args) > 6 else None)
            if not isinstance(memoized, dict):
                raise not_understood("column_loader", self)
            memoized.pop(self.parent_property, None)

        def create_row_processor(
            self,
            context: Any,
            query_entity: Any,
            path: Any,
            loadopt: Any,
            mapper: Any,
            result: Any,
            adapter: Any,
            populators: Any,
        ) -> None:
            getter_of = _read(result, "result_getter")
            body = None
            for col in self.columns:
                col = adapter.columns[col] if adapter else col
                body = getter_of(col, False)
                if body is not None:
                    break
            if body is None:
                # Not in this result: as SQLAlchemy does (the attribute is expired).
                super().create_row_processor(
                    context, query_entity, path, loadopt, mapper, result, adapter, populators
                )
                return
            tcol = self.carnet_practice
            if tcol is not None and adapter:
                tcol = adapter.columns[tcol]
            practice = getter_of(tcol, False) if tcol is not None else None
            # A query entity's own mapper (not a subclass met in its rows, nor a
            # joined eager load's): made before the result's first row is fetched.
            own = getattr(query_entity, "mapper", None) is mapper
            column = LoadedColumn(result, context, col, body, own)
            getter, populator = self.carnet_make(self.key, column, practice)
            if getter is None:
                getter = column.processed()
            populators["quick"].append((self.key, getter))
            if populator is not None:
                populators["new"].append((self.key, populator))

    return OpeningColumnLoader


# -- guard positions: SQLAlchemy's traversal attribute names -> the SQL construct ---------

# Where an encrypted expression sits in a statement or FROM element, by the
# traversal attribute that holds it: None means "just reading or listing it",
# a string names the SQL construct that would compute on it. An attribute not
# listed here names itself and refuses (default-deny), so a rename in
# SQLAlchemy makes the guard refuse, never pass.
POSITIONS: dict[str, str | None] = {
    "_raw_columns": None,
    "_returning": None,
    "_return_defaults_columns": None,
    "_supplemental_returning": None,
    "_memoized_select_entities": None,
    "_from_obj": None,
    "_extra_froms": None,
    "_independent_ctes": None,
    "selects": None,
    "select": None,
    "table": None,
    "element": None,
    "left": None,
    "right": None,
    "_cte_alias": None,
    "_restates": None,
    "_post_values_clause": None,  # ON CONFLICT / ON DUPLICATE KEY: judged by its own parts
    "column_args": None,  # text(...).columns(Note.body): the columns a text query returns
    "_column_args": None,  # values(column(...), ...): column definitions
    "_where_criteria": "WHERE",
    "_having_criteria": "HAVING",
    "_order_by_clauses": "ORDER BY",
    "_group_by_clauses": "GROUP BY",
    "_distinct_on": "DISTINCT ON",
    "_limit_clause": "LIMIT",
    "_offset_clause": "OFFSET",
    "_fetch_clause": "FETCH",
    "onclause": "a JOIN condition",
    "inferred_target_elements": "an ON CONFLICT target",
    "inferred_target_whereclause": "an ON CONFLICT target",
    "update_whereclause": "an ON CONFLICT ... WHERE",
}
COLUMNS_CLAUSE = "_raw_columns"
# Attributes that name FROM objects or row locks only: nothing is computed.
SKIP = frozenset({"_correlate", "_correlate_except", "_for_update_arg"})
