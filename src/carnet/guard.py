"""Refuse SQL that would compute on ciphertext, before it reaches the database.

Every encrypted value is AES-GCM output under a random nonce: ordering,
grouping, de-duplicating, comparing, measuring or transforming it in SQL gives
an answer about random bytes (a wrong result, returned silently), and copying
it to another row breaks "a note belongs to its row's practice". The column
type's comparator (:class:`carnet.types.EncryptedText.comparator_factory`)
already refuses operators written on the column (``Note.body == "x"``), but
much never passes through it: ``func.length(col)``, ``cast(col, …)``,
``order_by(col)``, ``group_by(col)``, ``.distinct()``, ``over(partition_by=col)``,
``literal("x") == col``, ``union(…)``, ``update().values(body=other.c.body)``.

So the first step of carnet's statement pipeline (:mod:`carnet._hooks`) walks
each statement once, before it
is compiled, and raises :class:`~carnet.errors.UnsupportedOperation` when an
encrypted expression (any SQL expression whose type is ``EncryptedText``:
the column, an ORM attribute, a label, a column of an alias or subquery, a
scalar subquery selecting it) stands anywhere but in an allowed place. The
walk is default-deny: a construct it does not know refuses an encrypted
operand. Allowed:

- selecting it (columns clause, RETURNING), including from subqueries;
- writing it with a value (a bind parameter, which the type seals) or NULL;
- ``IS NULL`` / ``IS NOT NULL``;
- ``count(col)``;
- ``DISTINCT`` over rows that also select the primary key of the column's table
  (the rows are then distinct anyway: nothing is decided by ciphertext);
- ``UNION ALL`` (``UNION``, ``INTERSECT`` and ``EXCEPT`` compare rows: refused);
- ``=`` / ``!=`` between two encrypted columns outside a JOIN condition:
  SQLAlchemy builds such expressions itself, and in SQL they compare stored
  ciphertexts byte for byte, true only for a verbatim copy of a value;
- ``type_coerce(col, SomeRawType)``: the explicit way to say "these are the
  stored bytes" (carnet's batch engine compares-and-sets raw values with it).

A column named by a string (``order_by("body")``, ``desc("b")``,
``over(partition_by="body")``) is resolved as SQLAlchemy's compiler resolves
it: against the names of the statement's selected columns and labels, then the
columns of its FROM objects (a reference inside the columns clause, such as a
window in it, against the FROM columns only). One naming an encrypted
expression is judged as that expression; one the walk cannot resolve, in a
statement that selects or reads an encrypted column, is refused (fail closed).

What the ORM adds only when it compiles a query is checked when a query loads
a mapped class (``select(Cls)``, ``Session.get``, ``Query``): the class's
``column_property`` expressions (deferred ones too) and the ``order_by`` of the
relationships it loads eagerly, by default (``lazy="joined"`` / ``"selectin"``
/ ...) or through a loader option (``joinedload``, ``selectinload``, a
wildcard). A lazy load's own statement carries its ORDER BY and is walked as
any other.

Raw SQL text (``text()``, ``literal_column()``, ``exec_driver_sql``) is opaque
to the walk and is not checked.

Statements that passed are remembered (weakly, by object) so a statement
executed again is not walked again; the work is per statement, never per row.
Messages name the construct and the column's field label, never a value.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import ColumnProperty, Mapper, RelationshipProperty
from sqlalchemy.sql import elements, functions, operators, selectable
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.dml import Insert
from sqlalchemy.sql.lambdas import LambdaElement
from sqlalchemy.sql.visitors import InternalTraversal

from . import _sa
from .errors import UnsupportedOperation
from .types import EncryptedText, encrypted_anywhere

__all__ = ["check_statement", "clear_caches"]

_IT = InternalTraversal
# Traversal kinds whose values may hold SQL elements. Every other kind (names,
# flags, types, options, hints, annotations) carries no SQL expression.
_ELEMENT_KINDS = frozenset(
    {
        _IT.dp_clauseelement,
        _IT.dp_clauseelement_list,
        _IT.dp_clauseelement_tuple,
        _IT.dp_clauseelement_tuples,
        _IT.dp_fromclause_ordered_set,
        _IT.dp_setup_join_tuple,
        _IT.dp_memoized_select_entities,
        _IT.dp_dml_values,
        _IT.dp_dml_ordered_values,
        _IT.dp_dml_multi_values,
        _IT.dp_string_clauseelement_dict,
        _IT.dp_has_cache_key,
        _IT.dp_has_cache_key_list,
        _IT.dp_has_cache_key_tuples,
        _IT.dp_multi,
        _IT.dp_multi_list,
    }
)
_DML_VALUE_KINDS = frozenset(
    {_IT.dp_dml_values, _IT.dp_dml_ordered_values, _IT.dp_dml_multi_values}
)

_POSITIONS = _sa.POSITIONS
_SKIP = _sa.SKIP

_ORDERING = frozenset(
    {operators.asc_op, operators.desc_op, operators.nulls_first_op, operators.nulls_last_op}
)
_NULL_TESTS = frozenset({operators.is_, operators.is_not})
_EQUALITY = frozenset({operators.eq, operators.ne})
_OPERATOR_NAMES: dict[Any, str] = {
    operators.eq: "=",
    operators.ne: "!=",
    operators.lt: "<",
    operators.le: "<=",
    operators.gt: ">",
    operators.ge: ">=",
    operators.like_op: "LIKE",
    operators.not_like_op: "NOT LIKE",
    operators.ilike_op: "ILIKE",
    operators.not_ilike_op: "NOT ILIKE",
    operators.in_op: "IN",
    operators.not_in_op: "NOT IN",
    operators.between_op: "BETWEEN",
    operators.not_between_op: "NOT BETWEEN",
    operators.concat_op: "||",
    operators.add: "+ / ||",
    operators.collate: "COLLATE",
    operators.is_distinct_from: "IS DISTINCT FROM",
    operators.is_not_distinct_from: "IS NOT DISTINCT FROM",
    operators.distinct_op: "DISTINCT",
    operators.exists: "EXISTS",
}
# Wrappers that add no computation: an encrypted element inside one is judged
# by where the wrapper itself stands. Two are private classes of SQLAlchemy,
# read through carnet._sa when the first statement is checked.
_TRANSPARENT: tuple[type[Any], ...] = ()
_TEXTUAL_REF: type[Any] = type(None)


def _load_private_types() -> None:
    global _TRANSPARENT, _TEXTUAL_REF
    _TEXTUAL_REF = _sa.textual_label_reference()
    _TRANSPARENT = (elements.Label, elements.Grouping, _sa.label_reference())


# Plain lists of expressions (OrderByList and ElementList exist from SQLAlchemy 2.1).
_LIST_TYPES: tuple[type[Any], ...] = tuple(
    t
    for t in (
        elements.ClauseList,
        elements.ExpressionClauseList,
        getattr(elements, "OrderByList", None),
        getattr(elements, "ElementList", None),
    )
    if t is not None
)
# WITHIN GROUP (ORDER BY ...); SQLAlchemy 2.1 generalises it as AggregateOrderBy.
_AGGREGATE_ORDER_BY: type = getattr(elements, "AggregateOrderBy", elements.WithinGroup)


def _op_name(op: Any) -> str:
    name = _OPERATOR_NAMES.get(op)
    if name is None:
        name = getattr(op, "__name__", None) or str(op)
        name = name.rstrip("_")
    return f"the {name} operator"


def _encrypted(el: Any) -> EncryptedText | None:
    """The encrypted type of an SQL expression, through TypeDecorator and with_variant.

    Encrypted on any dialect counts: a statement's verdict is remembered
    whatever engine runs it next. Bind parameters of the type are values on
    their way in (sealed by the type), not stored ciphertext.
    """
    typ = getattr(el, "type", None)
    if typ is None or isinstance(el, elements.BindParameter):
        return None
    return encrypted_anywhere(typ)


def _is_encrypted(el: Any) -> bool:
    return _encrypted(el) is not None


def _label(el: Any) -> str:
    typ = _encrypted(el)
    return (typ.field_label if typ is not None else None) or "?"


def _refuse(how: str, el: Any) -> UnsupportedOperation:
    label = _label(el)
    if how.startswith("copy"):
        return UnsupportedOperation(
            f"{how} would copy the ciphertext of encrypted column {label!r} to another row or "
            "column; a value is sealed for its own row's practice and field. Read it, then "
            "write the text as a value."
        )
    return UnsupportedOperation(
        f"{how} on encrypted column {label!r} would run on ciphertext (each value is sealed "
        "under a random nonce), so the database cannot answer it; refused before execution. "
        "Select the column and sort, group, compare or transform the decrypted text in Python."
    )


# Per class, the traversal attributes that can hold SQL elements, with how an
# encrypted element there is judged: computed once per class, because testing
# every attribute's traversal kind on every statement would cost more than the
# rest of the walk.
_VALUES, _MULTI_VALUES, _JOINS, _PLAIN = 0, 1, 2, 3
_Plan = tuple[tuple[str, int], ...]
_plans: dict[type, _Plan] = {}
# SQLAlchemy 2.0's ON CONFLICT / ON DUPLICATE KEY clauses declare no traversal
# internals: their parts, by attribute name.
_UNDECLARED: _Plan = (
    ("update_values_to_set", _VALUES),
    ("update", _VALUES),
    ("update_whereclause", _PLAIN),
    ("inferred_target_elements", _PLAIN),
    ("inferred_target_whereclause", _PLAIN),
)


def _plan(cls: type) -> _Plan:
    plan = _plans.get(cls)
    if plan is None:
        steps: list[tuple[str, int]] = []
        internals = _sa.traverse_internals(cls)
        if internals is None:
            steps.extend(_UNDECLARED)
        for name, kind in internals or ():
            if kind not in _ELEMENT_KINDS or name in _SKIP:
                continue
            if kind is _IT.dp_dml_multi_values:
                steps.append((name, _MULTI_VALUES))
            elif kind in _DML_VALUE_KINDS:
                steps.append((name, _VALUES))
            elif kind is _IT.dp_setup_join_tuple:
                steps.append((name, _JOINS))
            else:
                steps.append((name, _PLAIN))
        plan = _plans[cls] = tuple(steps)
    return plan


def _written_values(value: Any) -> Iterator[Any]:
    """The SQL elements written by SET / VALUES: a dict's values, or (target, value) pairs' values.

    The targets (columns or names) are where values go, not operands.
    """
    if isinstance(value, dict):
        items: Any = value.values()
    else:
        items = (pair[1] for pair in value)
    for v in items:
        yield from _elements_in(v)


def _elements_in(value: Any) -> Iterator[Any]:
    """The SQL elements in one traversal attribute (nested lists, tuples, dict values)."""
    if isinstance(value, sa.ClauseElement):
        yield value
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from _elements_in(v)
    elif isinstance(value, dict):  # DML values: keys are the target columns, not operands
        for v in value.values():
            yield from _elements_in(v)
    elif hasattr(value, "__clause_element__"):
        # An ORM attribute or entity left as given (multi-row VALUES keep them).
        yield from _elements_in(value.__clause_element__())


class _Frame:
    """A SELECT being walked: what its string references (``"body"``) can name."""

    __slots__ = ("_dicts", "in_columns", "stmt")

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self.in_columns = False  # walking its columns clause
        self._dicts: tuple[dict[str, Any], dict[str, Any]] | None = None

    def dicts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(selected columns then FROM columns, FROM columns only), by name.

        As SQLAlchemy's compiler resolves ``_textual_label_reference``: a
        reference in the columns clause names a FROM column, any other a
        selected column (by label / table-qualified label / key) or else a
        FROM column.
        """
        if self._dicts is None:
            stmt = self.stmt
            with_cols: dict[str, Any] = {}
            only_froms: dict[str, Any] = {}
            if isinstance(stmt, sa.CompoundSelect):
                for c in stmt.selected_columns:
                    if c.key is not None:
                        with_cols.setdefault(c.key, c)
            else:
                for c in _sa.all_selected_columns(stmt):
                    if _sa.allow_label_resolve(c):
                        with_cols.setdefault(_sa.tq_label(c) or c.key, c)
                        with_cols.setdefault(c.key, c)
                froms: list[Any] = []
                if isinstance(stmt, sa.Select):
                    # As SelectState gathers them (without compiling): FROM
                    # objects given, of the columns clause, of WHERE.
                    found = _sa.from_objects_of(stmt)
                    ids: set[int] = set()
                    for f in found:
                        if id(f) not in ids:
                            ids.add(id(f))
                            froms.append(f)
                from_col: Any
                for from_col in _sa.select_iterables(froms):
                    if _sa.allow_label_resolve(from_col):
                        only_froms.setdefault(from_col.key, from_col)
                for key, value in only_froms.items():
                    with_cols.setdefault(key, value)
            self._dicts = (with_cols, only_froms)
        return self._dicts


class _Walk:
    __slots__ = ("binds_encrypted", "frames", "seen")

    def __init__(self) -> None:
        self.seen: set[int] = set()  # FROM objects already walked, by id
        self.frames: list[_Frame] = []  # the SELECTs being walked, innermost last
        self.binds_encrypted = False  # a bind parameter of an encrypted type was met

    def element(self, el: Any, how: str | None, on: bool) -> None:
        if isinstance(el, elements.ColumnElement):
            self.column_element(el, how, on)
        elif isinstance(el, _LIST_TYPES):
            # A bare list (function arguments, GROUP BY items, IN values): its
            # parent decides what is computed on its members.
            for sub in el.clauses:
                self.element(sub, how, on)
        elif isinstance(el, LambdaElement):
            self.element(_sa.lambda_resolved(el), None, False)
        elif isinstance(el, (elements.TextClause, sa.TableClause)):
            return  # raw SQL (opaque) / a table: its columns are definitions, not uses
        elif isinstance(el, sa.FromClause):
            if id(el) in self.seen:
                return
            self.seen.add(id(el))
            self.attributes(el)
        elif isinstance(el, sa.ClauseElement):
            self.statement(el)

    # -- expressions ------------------------------------------------------------

    def column_element(self, el: Any, how: str | None, on: bool) -> None:
        if how is not None and _is_encrypted(el):
            raise _refuse(how, el)
        if isinstance(el, elements.ColumnClause):
            table = el.table
            if table is not None and not isinstance(table, sa.TableClause):
                self.element(table, None, False)  # a column of a subquery / alias / CTE
            return
        if isinstance(el, _TEXTUAL_REF):
            self.string_reference(el, how)
            return
        if isinstance(el, elements.BindParameter):
            if not self.binds_encrypted and encrypted_anywhere(el.type) is not None:
                self.binds_encrypted = True
            return
        if isinstance(el, elements.Null):
            return
        child: str | None
        if isinstance(el, elements.TypeCoerce):
            if not _is_encrypted(el):
                return  # an explicit type_coerce() to a raw type: the caller handles bytes
            child = how
        elif isinstance(el, _TRANSPARENT):
            child = how
        elif isinstance(el, elements.BinaryExpression):
            child = self.binary_operand_position(el, on)
        elif isinstance(el, selectable.Exists):
            child = None
        elif isinstance(el, elements.UnaryExpression):
            if el.modifier in _ORDERING:
                child = "ORDER BY"
            elif el.operator is operators.distinct_op:
                child = "DISTINCT"
            else:
                child = _op_name(el.operator or el.modifier)
        elif isinstance(el, functions.FunctionElement):
            if isinstance(el, functions.count) and len(el.clauses.clauses) <= 1:
                child = None  # count(col) counts non-NULL values: no ciphertext is read
            else:
                child = f"the SQL function {el.name}()"
        elif isinstance(el, elements.Cast):
            child = "CAST"
        elif isinstance(el, elements.Tuple):
            child = "a tuple"
        elif isinstance(el, elements.BooleanClauseList):
            child = "AND / OR"
        elif isinstance(el, _LIST_TYPES):
            child = how  # a bare list: its parent (function, IN, ORDER BY ...) decides
        elif isinstance(el, elements.Case):
            child = "CASE"
        elif isinstance(el, elements.Over):
            self.positioned(
                el,
                on,
                {
                    "element": how,
                    "partition_by": "a window PARTITION BY",
                    "order_by": "a window ORDER BY",
                },
                "a window frame",
            )
            return
        elif isinstance(el, _AGGREGATE_ORDER_BY):
            self.positioned(el, on, {"element": how}, "an aggregate ORDER BY")
            return
        elif isinstance(el, elements.FunctionFilter):
            self.positioned(el, on, {"func": how}, "a FILTER clause")
            return
        elif isinstance(el, selectable.ScalarSelect):
            self.element(el.element, None, False)
            return
        else:
            child = f"an SQL {type(el).__name__} expression"
        for name, _mode in _plan(type(el)):
            value = getattr(el, name, None)
            if isinstance(value, sa.ClauseElement):
                self.element(value, child, on)
            elif value:
                for sub in _elements_in(value):
                    self.element(sub, child, on)

    def string_reference(self, el: Any, how: str | None) -> None:
        """``order_by("body")``, ``desc("b")``, ``over(partition_by="body")``: a name.

        Resolved as the compiler will resolve it; a name that cannot be
        resolved while the statement reads an encrypted column is refused
        (the walk cannot tell what it will name).
        """
        if how is None:
            return  # the name only lists a column: nothing is computed on it
        name = el.element
        frame = self.frames[-1] if self.frames else None
        if frame is None:
            raise UnsupportedOperation(
                f"{how} names a column by the string {name!r} outside a SELECT: the statement "
                "guard cannot tell whether it names an encrypted column; refused. Pass the "
                "column object instead."
            )
        with_cols, only_froms = frame.dicts()
        col = (only_froms if frame.in_columns else with_cols).get(name)
        if col is not None:
            if _is_encrypted(col):
                raise _refuse(how, col)
            self.element(col, how, False)  # a label of an expression: judged as written
            return
        for other in with_cols.values():
            if _is_encrypted(other):
                raise UnsupportedOperation(
                    f"{how} names a column by the string {name!r}, which carnet's statement "
                    "guard cannot resolve, in a statement reading encrypted column "
                    f"{_label(other)!r}: it may name ciphertext; refused. "
                    "Pass the column object instead."
                )

    def binary_operand_position(self, el: Any, on: bool) -> str | None:
        op = el.operator
        left, right = el.left, el.right
        if op in _NULL_TESTS and (
            isinstance(right, elements.Null) or isinstance(left, elements.Null)
        ):
            return None
        if (
            op in _EQUALITY
            and not on
            and isinstance(left, elements.ColumnClause)
            and isinstance(right, elements.ColumnClause)
            and _is_encrypted(left)
            and _is_encrypted(right)
        ):
            # Ciphertext against ciphertext: equal only for a verbatim copy.
            return None
        return _op_name(op) + (" in a JOIN condition" if on else "")

    def positioned(self, el: Any, on: bool, where: dict[str, str | None], other: str) -> None:
        for name, _mode in _plan(type(el)):
            how = where.get(name, other)
            for sub in _elements_in(getattr(el, name, None)):
                self.element(sub, how, on)

    # -- statements and FROM objects ---------------------------------------------

    def statement(self, el: Any) -> None:
        if isinstance(el, sa.Select):
            self.check_distinct(el)
        elif isinstance(el, sa.CompoundSelect):
            self.check_compound(el)
        elif isinstance(el, Insert) and el.select is not None:
            for col in el.select.selected_columns:
                if _is_encrypted(col):
                    raise _refuse("copying by INSERT ... FROM SELECT", col)
        if isinstance(el, sa.Select):
            self.check_loaded_mappers(el)
        if isinstance(el, (sa.Select, sa.CompoundSelect)):
            self.frames.append(_Frame(el))
            try:
                self.attributes(el)
            finally:
                self.frames.pop()
        else:
            self.attributes(el)

    def attributes(self, el: Any) -> None:
        # A statement or FROM object starts afresh: a subquery inside a JOIN
        # condition has its own WHERE, judged as any other.
        for name, mode in _plan(type(el)):
            value: Any = getattr(el, name, None)
            if not isinstance(value, sa.ClauseElement) and not value:
                continue  # most attributes of most statements are empty
            if mode == _VALUES or mode == _MULTI_VALUES:
                # The value written to a column: a bind parameter (sealed by
                # the type) is fine, an encrypted expression is a copy.
                written = _written_values(value) if mode == _VALUES else _elements_in(value)
                for sub in written:
                    self.element(sub, "copying by an INSERT / UPDATE value", False)
            elif mode == _JOINS:  # ORM select(...).join(target, onclause)
                joins: Any = value  # tuples of (target, onclause, from, flags)
                for target, onclause, from_, _flags in joins:
                    for sub in _elements_in((target, from_)):
                        self.element(sub, None, False)
                    if onclause is not None and not isinstance(onclause, sa.ClauseElement):
                        # An ORM attribute as the ON clause: a relationship's
                        # join condition, or a column that would be the condition.
                        onclause = getattr(onclause, "__clause_element__", lambda: None)()
                    for sub in _elements_in(onclause):
                        self.element(sub, "a JOIN condition", True)
            else:
                how = _POSITIONS.get(name, name)
                sub_on = name == "onclause"
                frame = self.frames[-1] if self.frames and self.frames[-1].stmt is el else None
                if frame is not None:
                    frame.in_columns = name == _sa.COLUMNS_CLAUSE
                for sub in _elements_in(value):
                    self.element(sub, how, sub_on)
                if frame is not None:
                    frame.in_columns = False

    # -- mapper-level expressions an ORM query adds when it is compiled ------------

    def check_loaded_mappers(self, el: sa.Select[Any]) -> None:
        """What the ORM adds to ``select(Entity)`` at compile time, out of the walk's sight.

        A loaded class's ``column_property`` expressions (deferred ones too),
        and the ``order_by`` of relationships it loads eagerly by default or
        that a loader option (``joinedload``, ``selectinload``, ``"*"``) names.
        """
        for raw in _sa.raw_columns(el):
            entity = (
                _sa.annotations_of(raw).get("parententity")
                if isinstance(raw, sa.FromClause)
                else None
            )
            mapper = getattr(entity, "mapper", None)
            if mapper is not None:
                _check_mapper(mapper)
        for opt in _sa.with_options(el):
            for load in getattr(opt, "context", ()) or ():
                path = getattr(getattr(load, "path", None), "path", ()) or ()
                prev_mapper: Any = None
                for item in path:
                    if isinstance(item, RelationshipProperty):
                        _check_relationship(item, set())
                    elif isinstance(item, ColumnProperty):
                        _check_column_property(item)
                    elif isinstance(getattr(item, "mapper", None), Mapper):
                        prev_mapper = item.mapper
                        _check_mapper(prev_mapper)
                    elif isinstance(item, str) or type(item).__name__ == "PathToken":
                        # a wildcard ("*", "relationship:*"): any relationship of the class
                        if prev_mapper is not None:
                            for rel in prev_mapper.relationships:
                                _check_relationship(rel, set())

    def check_distinct(self, el: sa.Select[Any]) -> None:
        if not _sa.is_distinct(el):
            return
        cols = list(el.selected_columns)
        present = {hash(c) for c in cols}
        for col in cols:
            if not _is_encrypted(col):
                continue
            base = col
            while isinstance(base, _TRANSPARENT):
                base = base.element
            table = getattr(base, "table", None)
            pk = list(getattr(table, "primary_key", ()) or ())
            # Annotated (ORM) columns hash as the column they annotate.
            if not pk or any(hash(c) not in present for c in pk):
                raise _refuse("DISTINCT (without the primary key of its table)", col)

    def check_compound(self, el: sa.CompoundSelect[Any]) -> None:
        if _sa.is_union_all(el):
            return
        for sel in el.selects:
            for col in sel.selected_columns:
                if _is_encrypted(col):
                    raise _refuse(el.keyword.value, col)


# Mapped classes already found free of mapper-level expressions on ciphertext
# (a mapper's properties are fixed once it is configured).
_clean_mappers: weakref.WeakSet[Any] = weakref.WeakSet()


def _check_column_property(prop: Any) -> None:
    for col in prop.columns:
        if isinstance(col, sa.Column):
            continue  # a mapped table column: selecting it is allowed
        try:
            _Walk().element(col, None, False)
        except UnsupportedOperation as exc:
            raise UnsupportedOperation(
                f"the column_property {prop.parent.class_.__name__}.{prop.key}: {exc}"
            ) from None


def _check_relationship(rel: Any, seen: set[int]) -> None:
    for col in rel.order_by or ():
        for sub in _elements_in(col):
            _Walk().element(
                sub,
                f"ORDER BY (order_by of relationship {rel.parent.class_.__name__}.{rel.key})",
                False,
            )
    _check_mapper(rel.mapper, seen)


def _check_mapper(mapper: Any, seen: set[int] | None = None) -> None:
    """Refuse a mapped class whose loading computes on ciphertext in SQL."""
    if mapper in _clean_mappers:
        return
    root = seen is None
    seen = set() if seen is None else seen
    if id(mapper) in seen:
        return
    seen.add(id(mapper))
    for prop in mapper.column_attrs:
        _check_column_property(prop)
    for rel in mapper.relationships:
        if rel.lazy in ("joined", "selectin", "subquery", "immediate", False):
            _check_relationship(rel, seen)
    if root:  # a mapper met again inside a cycle was not fully checked by this call
        _clean_mappers.add(mapper)


# Statements that passed, by object, with whether they bind an encrypted value.
# A statement object is immutable once built (generative methods return
# copies), so its verdict never changes.
_passed: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def check_statement(statement: Any) -> bool:
    """Raise UnsupportedOperation if ``statement`` would make the database compute on ciphertext.

    Returns whether the statement itself binds a value of an encrypted type
    (``literal(x, EncryptedText())``): the redaction of a failed statement's
    parameters needs to know.
    """
    if isinstance(statement, LambdaElement):
        statement = _sa.lambda_resolved(statement)  # lambda_stmt(): the ORM's lazy loads use them
    cacheable = isinstance(statement, Executable) and not isinstance(
        statement, elements.ColumnElement
    )
    if cacheable:
        known = _passed.get(statement)
        if known is not None:
            return known
    if isinstance(statement, sa.schema.ExecutableDDLElement):
        return False
    _load_private_types()
    walk = _Walk()
    walk.element(statement, None, False)
    if cacheable:
        _passed[statement] = walk.binds_encrypted
    return walk.binds_encrypted


def clear_caches() -> None:
    """Forget remembered verdicts and per-class plans (tests that change SQLAlchemy's names)."""
    _passed.clear()
    _plans.clear()
    _clean_mappers.clear()
