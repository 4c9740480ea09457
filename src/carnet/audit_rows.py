"""Which rows were disclosed: the ORM's load events and blind-index searches, for the trail.

``KeyManager.decrypt`` sees a value, its practice and its label, never its
row. The ORM does: a listener on every mapper's ``load`` and ``refresh``
events records, for a row whose encrypted attributes were loaded, its
primary key (or the attribute a column names with
``info={"carnet_audit_rows": "patient_id"}``) under the principal, the
practice and the field, when the trail has ``rows=True`` or the column asks
for it (``info={"carnet_audit_rows": True}``). The values opened for that
row are counted by the decrypt hook as any others; this adds the keys.

Core statements have no row identity at decrypt time, but their results
do: for a SELECT run outside an ORM Session's entity loading, the pipeline's
``after_execute`` step (:func:`core_result`) hands each Row the result makes
to a function that records, for each non-NULL encrypted value in it, the
row's key (its table's primary key columns, or the column the encrypted
column names) taken from the same Row, or ``?`` when the Row does not hold
it (docs/audit.md, "Rows").
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Mapper

from . import _hooks, _sa
from .context import current_tenant, manager_for
from .trail import REQUIRED, current_principal
from .types import encrypted_type
from .values import Sealed

ROWS_INFO = "carnet_audit_rows"
# The row key recorded for a Core row that does not hold its key column(s).
UNKNOWN_ROW = "?"

log = logging.getLogger("carnet.audit")

# Per mapper: (attribute, field label, practice attribute, row-key attribute or
# None for the primary key, asked by the column itself).
_Spec = list[tuple[str, str, str | None, str | None, bool]]
_specs: weakref.WeakKeyDictionary[Mapper[Any], _Spec] = weakref.WeakKeyDictionary()
_active = False
# Whether a trail with rows=True was ever installed: until then only columns
# that ask for rows cost anything per loaded row.
_rows_wanted = False


def activate(rows: bool = False) -> None:
    """Listen to the loads of the mappers whose rows are wanted (idempotent); called when a
    trail is installed. Without ``rows`` only mappers with a column that asks are listened
    to: a trail that records no rows costs nothing per loaded row."""
    global _active, _rows_wanted
    widened = rows and not _rows_wanted
    _rows_wanted = _rows_wanted or rows
    if _active and not widened:
        return
    from .orm import _specs as encrypted_mappers

    # Mappers with encrypted columns set up so far, then each one configured later.
    for mapper in list(encrypted_mappers.keys()):
        _listen(mapper)
    if not _active:
        _active = True
        _hooks.on_every_mapper(lambda m, _cls: _listen(m))


_listening: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()


def _listen(mapper: Mapper[Any]) -> None:
    if mapper in _listening:
        return
    if sa_inspect(mapper.class_, raiseerr=False) is not mapper:
        return  # its registry was disposed: the class is no longer mapped
    spec = _spec(mapper)
    asked_any = any(s[4] for s in spec)
    if not spec or not (asked_any or _rows_wanted):
        return
    _listening.add(mapper)
    # The spec and whether a column asks for rows, bound once: no lookup per row.
    listener = functools.partial(_on_load, spec, asked_any)
    _hooks.on_mapper(mapper, {"load": listener, "refresh": listener})


def _spec(mapper: Mapper[Any]) -> _Spec:
    spec = _specs.get(mapper)
    if spec is not None:
        return spec
    spec = []
    for prop in mapper.column_attrs:
        for col in prop.columns:
            typ = encrypted_type(col)
            if typ is None:
                continue
            info = getattr(col, "info", {}).get(ROWS_INFO)
            tkey = typ.tenant if typ.tenant and "." not in typ.tenant else None
            label = typ._resolved_label or typ.field_label
            spec.append(
                (prop.key, str(label), tkey, info if isinstance(info, str) else None, bool(info))
            )
    _specs[mapper] = spec
    return spec


def _trail_of(session: Any, mapper: Mapper[Any]) -> Any:
    try:
        bind = session.get_bind(mapper)
        manager = manager_for(bind.dialect)
    except Exception:  # noqa: BLE001 - no manager, no trail: nothing to record
        return None
    return getattr(manager.decrypt_hook, "trail", None)


def _row_key(state: Any, attr: str | None) -> str:
    if attr is not None:
        v = state.dict.get(attr)
        if v is not None:
            return str(v)
    ident = (
        state.key[1]
        if state.key is not None
        else state.mapper.primary_key_from_instance(state.obj())
    )
    return ",".join(str(x) for x in ident)


def _on_load(spec: _Spec, asked_any: bool, state: Any, context: Any, *refreshed: Any) -> None:
    if not (_rows_wanted or asked_any):
        return
    # One lookup of the trail per query and mapper, not per row.
    attrs = getattr(context, "attributes", None)
    ck = ("carnet_audit_trail", state.mapper)
    if attrs is not None and ck in attrs:
        trail = attrs[ck]
    else:
        session = getattr(context, "session", None)
        trail = _trail_of(session, state.mapper) if session is not None else None
        if attrs is not None:
            attrs[ck] = trail
    if trail is None or not (trail.rows or asked_any):
        return
    d = state.dict
    principal = current_principal()
    # A refresh names the attributes it loaded (None: all): a note loaded
    # before and not reloaded now is not disclosed again.
    only = refreshed[0] if refreshed and refreshed[0] is not None else None
    for key, label, tkey, row_attr, asked in spec:
        if (
            not (asked or trail.rows)
            or d.get(key) is None
            or (only is not None and key not in only)
        ):
            continue
        practice = d.get(tkey) if tkey is not None else None
        if practice is None:
            practice = current_tenant()
        trail.row_disclosed(principal, str(practice), label, _row_key(state, row_attr))


def searched(
    session: Any, mapper: Mapper[Any], index: str, tenant: Any, candidates: int, matches: list[Any]
) -> None:
    """A blind-index search read ``candidates`` rows and returned ``matches`` (the hook of
    :func:`carnet.searchable.search`): principal, practice, index and counts, and the
    matched rows' keys; never the searched value."""
    trail = _trail_of(session, mapper)
    if trail is None:
        return
    from sqlalchemy import inspect

    spec = _spec(mapper)
    row_attr = next((s[3] for s in spec if s[3] is not None), None)
    keys = [_row_key(inspect(obj), row_attr) for obj in matches]
    trail.searched(current_principal(), str(tenant), index, candidates, keys)


# -- Core reads --------------------------------------------------------------------------

# Per encrypted column of a Core result: the selected column (the Row's key for
# it), its field label, the selected column holding its row's practice (None:
# the tenant_scope), and the selected columns its row key may be made of, in
# order of preference (the column it names, the primary key; none of them all
# selected: the key is UNKNOWN_ROW).
_CoreSpec = list[tuple[Any, str, Any, list[list[Any]]]]


def core_result(conn: Any, statement: Any, execution_options: Any, result: Any) -> None:
    """The pipeline's ``after_execute`` step: when the trail of ``conn``'s manager wants the
    rows of an encrypted column a Core SELECT returns, record the row of each value the
    result discloses, as SQLAlchemy makes the Row (rows never fetched are not recorded).
    Costs nothing per row otherwise: no row function is installed."""
    if not _active or not getattr(statement, "is_select", False) or not result.returns_rows:
        return
    trail = _core_trail(conn)
    if trail is None:
        return
    loaded: frozenset[Any] = frozenset()
    if _sa.orm_loads(statement, execution_options):
        # An ORM load records its entities' rows itself (their load events): asked
        # first, before the columns. The bare columns it selects, which load no
        # entity (select(Note.id, Note.body) run by a Session), are recorded here.
        loaded = _entity_sources(statement)
        if loaded is ALL_ENTITIES:
            return
    spec = _core_spec(statement, bool(trail.rows), loaded)
    if not spec:
        return
    try:
        _sa.on_each_row(result, functools.partial(_on_core_row, trail, spec))
    except Exception:
        # No hook, no record of the rows: the read is refused rather than made unrecorded.
        result.close()
        raise


ALL_ENTITIES: frozenset[Any] = frozenset({"*"})


def _entity_sources(statement: Any) -> frozenset[Any]:
    """The FROM objects whose rows an ORM SELECT loads as entities (their columns are
    recorded by the entities' load events), or :data:`ALL_ENTITIES` when it selects
    nothing else, the common case, decided without reading the selected columns."""
    entities = []
    columns = False
    for raw in _sa.raw_columns(statement):
        if isinstance(raw, sa.FromClause):
            entities.append(raw)
        else:
            columns = True
    if not columns:
        return ALL_ENTITIES
    # A joined-inheritance entity is a join: each of its tables is loaded.
    return frozenset(_source(c) for fc in entities for c in fc.c)


def _core_trail(conn: Any) -> Any:
    try:
        manager = manager_for(conn.dialect)
    except Exception:  # noqa: BLE001 - no manager, no trail: nothing to record
        return None
    return getattr(manager.decrypt_hook, "trail", None)


def _base_column(col: Any) -> Any:
    """The Table column a selected column stands for (through labels, aliases,
    subqueries, a UNION's first SELECT), or None for an expression of several or none."""
    bases = [b for b in col.base_columns if isinstance(getattr(b, "table", None), sa.Table)]
    return bases[0] if len(bases) == 1 else None


def _source(col: Any) -> Any:
    """The FROM object a selected column comes from (a table, an alias, a subquery): a
    note's key is taken from the same one, so each side of a self-join keeps its own."""
    el = col.element if isinstance(col, sa.Label) else col
    return _sa.deannotated(getattr(el, "table", None))


def _core_spec(statement: Any, rows: bool, loaded: frozenset[Any] = frozenset()) -> _CoreSpec:
    selected = list(getattr(statement, "selected_columns", ()))
    wanted = []
    for col in selected:
        typ = encrypted_type(col)
        base = _base_column(col) if typ is not None else None
        if typ is None or base is None or (loaded and _source(col) in loaded):
            continue
        info = base.info.get(ROWS_INFO)
        if rows or info:
            wanted.append((col, typ, base, info))
    if not wanted:
        return []
    # Per FROM object, the Table column -> the selected column standing for it.
    by_source: dict[Any, dict[Any, Any]] = {}
    for col in selected:
        base = _base_column(col)
        if base is not None:
            by_source.setdefault(_source(col), {}).setdefault(base, col)

    spec: _CoreSpec = []
    for col, typ, base, info in wanted:
        table = base.table
        mine = by_source.get(_source(col), {})

        def among_selected(cols: list[Any], mine: dict[Any, Any] = mine) -> list[Any] | None:
            found = [mine.get(c) for c in cols]
            return found if found and all(f is not None for f in found) else None

        tcol = table.c.get(typ.tenant) if typ.tenant and "." not in typ.tenant else None
        # As for the ORM: the named column's value, else (not selected, or NULL) the
        # primary key's.
        keys = [
            k
            for k in (
                among_selected([table.c[info]])
                if isinstance(info, str) and info in table.c
                else None,
                among_selected(list(table.primary_key.columns)),
            )
            if k is not None
        ]
        label = str(typ._resolved_label or typ.field_label)
        spec.append((col, label, mine.get(tcol) if tcol is not None else None, keys))
    return spec


def _on_core_row(trail: Any, spec: _CoreSpec, row: Any) -> None:
    try:
        m = row._mapping
        principal = current_principal()
        for col, label, tcol, keys in spec:
            v = m.get(col)
            if v is None or isinstance(v, Sealed):
                # Not in this Row (.scalars(), .columns()), NULL, or read without a
                # scope and so not opened: nothing disclosed.
                continue
            practice = m.get(tcol) if tcol is not None else None
            if practice is None:
                practice = current_tenant()
            row_key = UNKNOWN_ROW
            for cols in keys:
                values = [m.get(k) for k in cols]
                if all(v is not None for v in values):
                    row_key = ",".join(str(v) for v in values)
                    break
            trail.row_disclosed(principal, str(practice), label, row_key)
    except Exception as exc:
        if trail.mode == REQUIRED:
            raise
        trail.last_error = type(exc).__name__
        log.error("carnet: could not record the row of a Core read (%s)", type(exc).__name__)
