"""The blind-index columns on every write path: the third step of carnet's statement pipeline.

A :func:`~carnet.types.BlindIndex` column holds a truncated keyed hash of a
normalised value (see :mod:`carnet.indexkeys` and :mod:`carnet.transforms`),
kept up to date on every write path:

- ORM flush: :func:`before_flush` computes it from the plaintext attributes
  and the row's practice (a compound index whose other field is not loaded
  loads it; a field that cannot be opened refuses the flush);
- ORM bulk INSERT / UPDATE (``session.execute(insert(Model), [...])``):
  :func:`orm_execute` computes it for each parameter dict;
- Core INSERT / UPDATE: :func:`index_columns`, the third step of the
  pipeline (:mod:`carnet._hooks`), computes it for each parameter dict from
  its source values and its practice (the value bound to the row by the
  tenant binding, the dict's practice column, else the scope). Values
  written inline with ``.values(...)`` must be passed as execute parameters
  instead: such a statement is refused rather than written without its index.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import (
    Mapper,
    ORMExecuteState,
    Session,
    attributes,
    configure_mappers,
)
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.dml import Insert, Update

from . import _sa, _txkeys, context, indexkeys
from .errors import (
    ConfigurationError,
    InvalidPlaintext,
    TenantMismatch,
    TenantRequired,
)
from .manager import IndexRoot, KeyManager
from .types import BlindIndexType, BoundText, EncryptedDate, IndexSpec, Sealed, encrypted_type

# -- computing index values -----------------------------------------------------------


def _manager_for(spec: IndexSpec, source_types: Sequence[Any]) -> KeyManager:
    if spec.manager is not None:
        return spec.manager
    for typ in source_types:
        enc = encrypted_type(typ)
        if enc is not None and enc.own_manager is not None:
            return enc.own_manager
    return context.get_manager()


def _normalise(spec: IndexSpec, values: Sequence[Any]) -> str | None:
    """The transform's output, or None for no index value (a NULL source, a lenient refusal)."""
    if any(v is None for v in values):
        return None
    try:
        return spec.transform(*values)
    except InvalidPlaintext:
        if spec.lenient:
            return None
    raise InvalidPlaintext(f"{spec.field_label}: value refused by transform {spec.transform.name}")


def _value(spec: IndexSpec, root: IndexRoot, normalised: str, tenant: str) -> int:
    return indexkeys.index_value(
        root, normalised, label=spec.field_label, index=spec.name, tenant=tenant, bits=spec.bits
    )


@dataclass
class _Resolved:
    """A blind index of a mapper: attribute names resolved at mapper configuration."""

    key: str  # the index attribute
    spec: IndexSpec
    sources: tuple[str, ...]
    source_types: tuple[Any, ...]
    tenant: str | None
    column: sa.ColumnElement[Any]
    tenant_column: sa.ColumnElement[Any] | None
    statements: dict[int, sa.Select[Any]] = dataclasses.field(default_factory=dict)

    def column_attr(self, mapper: Mapper[Any]) -> Any:
        """The index's mapped attribute (``Patient.phone_bidx``)."""
        return getattr(mapper.class_, self.key)


_orm: weakref.WeakKeyDictionary[Mapper[Any], list[_Resolved]] = weakref.WeakKeyDictionary()
_dates: weakref.WeakKeyDictionary[Mapper[Any], list[str]] = weakref.WeakKeyDictionary()


_seen: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()


def setup_mapper(mapper: Mapper[Any], class_: type) -> None:
    if mapper in _seen:
        return  # set up already (see carnet._hooks.install)
    _seen.add(mapper)
    found: list[_Resolved] = []
    dates: list[str] = []
    for prop in mapper.column_attrs:
        for col in prop.columns:
            typ = getattr(col, "type", None)
            if isinstance(typ, EncryptedDate):
                dates.append(prop.key)
            if not isinstance(typ, BlindIndexType):
                continue
            spec = typ.index_spec
            types = []
            for src in spec.sources:
                if src not in mapper.column_attrs:
                    raise ConfigurationError(
                        f"{class_.__name__}.{prop.key}: BlindIndex source {src!r} is not a "
                        f"column attribute of {class_.__name__}"
                    )
                types.append(mapper.column_attrs[src].columns[0].type)
            tkey = spec.tenant
            if tkey is None:
                tkey = next((e.tenant for t in types if (e := encrypted_type(t)) is not None), None)
            if tkey is not None and tkey not in mapper.column_attrs:
                raise ConfigurationError(
                    f"{class_.__name__}.{prop.key}: BlindIndex tenant {tkey!r} is not a column "
                    f"attribute of {class_.__name__}"
                )
            found.append(
                _Resolved(
                    key=prop.key,
                    spec=spec,
                    sources=spec.sources,
                    source_types=tuple(types),
                    tenant=tkey,
                    column=col,
                    tenant_column=mapper.column_attrs[tkey].columns[0] if tkey else None,
                )
            )
    if found:
        _orm[mapper] = found
    if dates:
        _dates[mapper] = dates


_DATES = "_carnet_bidx_dates"


def _roots_for_flush(
    session: Session, manager: KeyManager, tenant: str, mapper: Mapper[Any]
) -> list[IndexRoot]:
    # On the flush's own connection: on SQLite sharing the key table's
    # database, a practice's first root is created inside its transaction.
    conn = session.connection(bind_arguments={"mapper": mapper})
    return _txkeys.index_roots(conn, manager, tenant)


def before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    if not _orm and not _dates:
        # No mapper has a blind index or a date column: nothing to do per object.
        return
    scope = context.current_tenant()
    dated: list[tuple[InstanceState[Any], str]] = []
    # One root lookup per practice and flush, not per row.
    roots_seen: dict[tuple[int, str], list[IndexRoot]] = {}
    # Each mapper's registrations, looked up once per flush (the registries are
    # weak-keyed: a lookup there is a Python call and a weak reference).
    of_mapper: dict[Mapper[Any], tuple[list[str], list[_Resolved] | None]] = {}
    for obj in itertools.chain(session.new, session.dirty):
        state = attributes.instance_state(obj)
        mapper = state.mapper
        found = of_mapper.get(mapper)
        if found is None:
            found = of_mapper[mapper] = (_dates.get(mapper, []), _orm.get(mapper))
        dates, specs = found
        for key in dates:
            dated.append((state, key))
        if not specs:
            continue
        d = state.dict
        pending = state.key is None
        for r in specs:
            tenant_changed = r.tenant is not None and r.tenant in state.committed_state
            if not (
                pending or tenant_changed or any(s in state.committed_state for s in r.sources)
            ):
                continue
            values = []
            for src in r.sources:
                if src in d:
                    v = d[src]
                elif pending:
                    v = None
                else:
                    # The other field of a compound index, not loaded: load it,
                    # the row's tenant first, so that the value opens as it loads.
                    if r.tenant is not None and r.tenant not in d:
                        getattr(obj, r.tenant)
                    v = getattr(obj, src)
                if isinstance(v, Sealed):
                    if tenant_changed:
                        raise ConfigurationError(
                            f"{type(obj).__name__}.{r.key}: the tenant changed but field "
                            f"{src!r} was never opened; load it with its tenant first. "
                            "Nothing was written."
                        )
                    # Loaded before its row's tenant was: open it under that tenant.
                    v = v.open(_row_tenant(obj, r, scope))
                values.append(v)
            normalised = _normalise(r.spec, values)
            new: int | None = None
            if normalised is not None:
                tenant = _row_tenant(obj, r, scope)
                manager = _manager_for(r.spec, r.source_types)
                got = roots_seen.get((id(manager), tenant))
                if got is None:
                    got = _roots_for_flush(session, manager, tenant, mapper)
                    roots_seen[(id(manager), tenant)] = got
                root = got[0]
                new = _value(r.spec, root, normalised, tenant)
            setattr(obj, r.key, new)
            if not pending:
                # Always in the UPDATE, even if unchanged: the Core hook then
                # sees the index beside its sources and leaves the row alone.
                attributes.flag_modified(obj, r.key)
    if dated:
        session.info[_DATES] = dated


def _row_tenant(obj: Any, r: _Resolved, scope: str | None) -> str:
    tenant = getattr(obj, r.tenant) if r.tenant is not None else None
    if tenant is None:
        if r.tenant is not None or scope is None:
            raise TenantRequired(
                f"{type(obj).__name__}.{r.key}: the row has no tenant; nothing was written"
            )
        return scope
    tenant = str(tenant)
    if scope is not None and scope != tenant:
        raise TenantMismatch(scope, tenant)
    return tenant


def after_flush_postexec(session: Session, flush_context: Any) -> None:
    # carnet.orm puts the plaintext back on the instance after the flush, as
    # text: an EncryptedDate attribute gets its date back.
    for state, key in session.info.pop(_DATES, ()):
        v = state.dict.get(key)
        if isinstance(v, str):
            state.dict[key] = dt.date.fromisoformat(v)


# -- parameter dicts: ORM bulk statements and Core ------------------------------------


@dataclass
class _TableIndex:
    spec: IndexSpec
    column: str  # the index column's key
    sources: tuple[str, ...]  # column keys
    source_types: tuple[Any, ...]
    tenant: str | None  # tenant column key


_tables: weakref.WeakKeyDictionary[sa.Table, list[_TableIndex]] = weakref.WeakKeyDictionary()


def _table_indexes(table: Any) -> list[_TableIndex]:
    if not isinstance(table, sa.Table):
        return []
    found = _tables.get(table)
    if found is not None:
        return found
    found = []
    for col in table.c:
        typ = col.type
        if not isinstance(typ, BlindIndexType):
            continue
        spec = typ.index_spec
        missing = [s for s in spec.sources if s not in table.c]
        if missing:
            raise ConfigurationError(
                f"{table.name}.{col.key}: BlindIndex source column(s) {missing} not in the table"
            )
        types = tuple(table.c[s].type for s in spec.sources)
        tkey = spec.tenant
        if tkey is None:
            tkey = next((e.tenant for t in types if (e := encrypted_type(t)) is not None), None)
        if tkey is not None and tkey not in table.c:
            tkey = None  # an ORM attribute name, not a column: rely on the scope
        found.append(_TableIndex(spec, col.key, spec.sources, types, tkey))
    _tables[table] = found
    return found


def _index_row(
    indexes: list[_TableIndex], row: Mapping[str, Any], scope: str | None, roots: Any
) -> dict[str, Any] | None:
    """Index values for one parameter dict (only what it lacks), or None if nothing to add."""
    out: dict[str, Any] | None = None
    for ix in indexes:
        if ix.column in row:
            continue  # given (the ORM flush, or the caller): left as is
        present = [s in row for s in ix.sources]
        if not any(present):
            continue
        if not all(present):
            raise ConfigurationError(
                f"{ix.spec.field_label}: a write sets only some of the fields of a compound "
                f"blind index ({', '.join(ix.sources)}); pass them all, or use the ORM, which "
                "loads the others. Nothing was written."
            )
        values = [row[s] for s in ix.sources]
        normalised = _normalise(ix.spec, values)
        new: int | None = None
        if normalised is not None:
            tenant = _param_tenant(ix, row, values, scope)
            new = _value(ix.spec, roots(ix, tenant)[0], normalised, tenant)
        if out is None:
            out = {}
        out[ix.column] = new
    return out


def _param_tenant(
    ix: _TableIndex, row: Mapping[str, Any], values: list[Any], scope: str | None
) -> str:
    tenant: str | None = None
    for v in values:
        if type(v) is BoundText:
            tenant = v.carnet_tenant
            break
    if tenant is None and ix.tenant is not None and row.get(ix.tenant) is not None:
        tenant = str(row[ix.tenant])
    if tenant is None:
        if scope is None:
            raise TenantRequired(
                f"writing {ix.spec.field_label}: no tenant. Pass the row's tenant column, or "
                "use carnet.tenant_scope(...)"
            )
        return scope
    if scope is not None and scope != tenant:
        raise TenantMismatch(scope, tenant)
    return tenant


def orm_execute(state: ORMExecuteState) -> Any:
    if not (state.is_insert or state.is_update):
        return None
    mapper = state.bind_mapper
    if mapper is None:
        return None
    if not mapper.configured:
        configure_mappers()
    indexes = _table_indexes(mapper.local_table)
    dates = _dates.get(mapper, ())
    if not indexes and not dates:
        return None
    _refuse_inline(state.statement, indexes)
    if not state.parameters:
        return None
    scope = context.current_tenant()
    session = state.session

    seen: dict[tuple[int, str], list[IndexRoot]] = {}

    def roots(ix: _TableIndex, tenant: str) -> list[IndexRoot]:
        manager = _manager_for(ix.spec, ix.source_types)
        got = seen.get((id(manager), tenant))
        if got is None:
            got = seen[(id(manager), tenant)] = _roots_for_flush(session, manager, tenant, mapper)
        return got

    if isinstance(state.parameters, list):
        extra = [_index_row(indexes, row, scope, roots) for row in state.parameters]
        if not any(extra) and not dates:
            return None
        rows = [
            _iso_dates({**row, **(e or {})}, dates)
            for row, e in zip(state.parameters, extra, strict=True)
        ]
        return state.invoke_statement(params=rows)
    # A single dict: invoke_statement merges what is returned into it.
    params = state.parameters
    assert isinstance(params, Mapping)  # noqa: S101 - the list case returned above
    one = _index_row(indexes, params, scope, roots) or {}
    one.update(_iso_dates({k: params[k] for k in dates if k in params}, dates))
    return state.invoke_statement(params=one) if one else None


def _iso_dates(row: dict[str, Any], dates: Sequence[str]) -> dict[str, Any]:
    # carnet.orm binds the text values of a bulk statement to each row's
    # tenant: give it an EncryptedDate's value as text too.
    for key in dates:
        v = row.get(key)
        if isinstance(v, dt.date) and not isinstance(v, dt.datetime):
            row[key] = v.isoformat()
    return row


def _refuse_inline(stmt: Any, indexes: list[_TableIndex]) -> None:
    # .values(phone=...) puts the plaintext in the statement, where no hook
    # can pair it with its tenant reliably: refuse instead of writing a row
    # without its index.
    keys = {getattr(k, "key", k) for k in _sa.dml_values(stmt) or ()}
    keys |= {k for k, _v in _sa.ordered_values(stmt)}
    table_keys = {c.key for c in stmt.table.c}
    for multi in _sa.multi_values(stmt):
        for row in multi:
            # A positional row sets every column in table order, the index
            # included: given explicitly, it is left as given.
            keys |= {getattr(k, "key", k) for k in row} if isinstance(row, dict) else table_keys
    # INSERT ... SELECT: the values never pass through Python.
    keys |= {getattr(k, "key", k) for k in _sa.select_names(stmt)}
    if not keys:
        return
    for ix in indexes:
        if ix.column not in keys and any(s in keys for s in ix.sources):
            raise ConfigurationError(
                f"{ix.spec.field_label}: a blind-indexed field written inside the statement "
                "(.values(...), or copied by the database); pass the values as execute parameters "
                "(conn.execute(stmt, {...})) so carnet can compute the index. Nothing was written."
            )


def index_columns(conn: sa.Connection, stmt: Any, multiparams: Any, params: Any) -> tuple[Any, Any]:
    """The pipeline's blind-index step: each written row gets its index values.

    Runs after the tenant binding, so a value bound to its row's practice
    (:class:`~carnet.types.BoundText`) tells the index which practice's root
    to use.
    """
    if not isinstance(stmt, Insert | Update):
        return multiparams, params
    indexes = _table_indexes(stmt.table)
    if not indexes:
        return multiparams, params
    _refuse_inline(stmt, indexes)
    scope = context.current_tenant()

    seen: dict[tuple[int, str], list[IndexRoot]] = {}

    def roots(ix: _TableIndex, tenant: str) -> list[IndexRoot]:
        manager = _manager_for(ix.spec, ix.source_types)
        got = seen.get((id(manager), tenant))
        if got is None:
            got = seen[(id(manager), tenant)] = _txkeys.index_roots(conn, manager, tenant)
        return got

    if multiparams:
        extra = [_index_row(indexes, dict(row), scope, roots) for row in multiparams]
        if any(extra):
            multiparams = [{**row, **(e or {})} for row, e in zip(multiparams, extra, strict=True)]
    elif params:
        one = _index_row(indexes, dict(params), scope, roots)
        if one:
            params = {**params, **one}
    return multiparams, params
