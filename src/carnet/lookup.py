"""Finding rows by a blind-indexed value: :func:`search` and :func:`candidates`.

An equality lookup through the index, exact: the truncated hash's false
positives are dropped after decryption. docs/searchable.md explains the
threat model and how to size ``bits``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, overload

import sqlalchemy as sa
from sqlalchemy.orm import (
    InstrumentedAttribute,
    Mapper,
    Session,
    configure_mappers,
)

from . import context
from .errors import (
    ConfigurationError,
    InvalidPlaintext,
    TenantRequired,
)
from .indexing import _manager_for, _normalise, _orm, _Resolved, _value
from .manager import KeyManager
from .types import (
    BlindIndexAttribute,
    Sealed,
)

_M = TypeVar("_M")


# -- lookups ----------------------------------------------------------------------------


_resolved: dict[int, tuple[Any, Mapper[Any], _Resolved]] = {}


def _resolve(attr: Any) -> tuple[Mapper[Any], _Resolved]:
    # Per lookup: remembered by attribute (holding it, so its id stays its own).
    hit = _resolved.get(id(attr))
    if hit is not None and hit[0] is attr:
        return hit[1], hit[2]
    mapper, r = _resolve_uncached(attr)
    if len(_resolved) > 10_000:
        _resolved.clear()
    _resolved[id(attr)] = (attr, mapper, r)
    return mapper, r


def _resolve_uncached(attr: Any) -> tuple[Mapper[Any], _Resolved]:
    if not isinstance(attr, InstrumentedAttribute):
        raise ConfigurationError("search() takes a mapped attribute, e.g. Patient.phone")
    configure_mappers()
    mapper = attr.parent.mapper
    specs = _orm.get(mapper, [])
    by_index = [r for r in specs if r.key == attr.key]
    if by_index:
        return mapper, by_index[0]
    by_source = [r for r in specs if attr.key in r.sources]
    if len(by_source) == 1:
        return mapper, by_source[0]
    if not by_source:
        raise ConfigurationError(f"{mapper.class_.__name__}.{attr.key} has no blind index")
    raise ConfigurationError(
        f"{mapper.class_.__name__}.{attr.key} has several blind indexes "
        f"({', '.join(r.key for r in by_source)}): pass the index attribute"
    )


def _lookup(
    r: _Resolved, mapper: Mapper[Any], value: Any, tenant: str | None, manager: KeyManager | None
) -> tuple[str, list[int], str | None]:
    """(tenant, candidate index values, normalised value) of one lookup."""
    tenant = tenant if tenant is not None else context.current_tenant()
    if tenant is None:
        raise TenantRequired("search: no tenant; pass tenant= or use carnet.tenant_scope(...)")
    if r.tenant_column is None:
        raise ConfigurationError(
            f"{mapper.class_.__name__}.{r.key}: a lookup needs the row's tenant column "
            "(BlindIndex(..., tenant=...))"
        )
    values = tuple(value) if len(r.sources) > 1 else (value,)
    if len(values) != len(r.sources):
        raise ConfigurationError(
            f"{r.key} is a compound index over {r.sources}: pass a tuple of {len(r.sources)}"
        )
    normalised = _normalise(r.spec, values)
    if manager is None:
        manager = _manager_for(r.spec, r.source_types)
    roots = manager.index_roots(tenant, create=False) if normalised is not None else []
    if normalised is None or not roots:
        return tenant, [], None
    return tenant, sorted({_value(r.spec, root, normalised, tenant) for root in roots}), normalised


def candidates(
    attr: Any, value: Any, *, tenant: str | None = None, manager: KeyManager | None = None
) -> tuple[sa.ColumnElement[bool], str | None]:
    """The SQL condition selecting a value's candidate rows, and the normalised value.

    The condition is ``tenant = :tenant AND index IN (:values)`` (one value per
    usable index root). Candidates include false positives of the truncated
    hash: compare the decrypted rows (as :func:`search` does) before trusting
    them. The normalised value is None when nothing can match.
    """
    mapper, r = _resolve(attr)
    tenant, found, normalised = _lookup(r, mapper, value, tenant, manager)
    if normalised is None:
        return sa.false(), None
    assert r.tenant_column is not None  # noqa: S101 - checked by _lookup
    col = r.column
    cond = col == found[0] if len(found) == 1 else col.in_(found)
    same_tenant = _tenant_eq(r.tenant_column, tenant)
    return sa.and_(same_tenant, cond), normalised


def _tenant_value(col: sa.ColumnElement[Any], tenant: str) -> Any:
    """The practice id as the tenant column stores it.

    Practice ids are strings to carnet (``str(1) == "1"``, the text bound into
    keys), but a legacy schema may keep them in an INTEGER column, which
    PostgreSQL refuses to compare with text.
    """
    try:
        integer = col.type.python_type is int
    except NotImplementedError:
        integer = False
    if integer:
        # Only the canonical spelling: "01" is another practice than "1".
        return int(tenant) if tenant.lstrip("-").isdigit() and str(int(tenant)) == tenant else None
    return tenant


def _tenant_eq(col: sa.ColumnElement[Any], tenant: str) -> sa.ColumnElement[bool]:
    value = _tenant_value(col, tenant)
    if value is None:
        return sa.false()  # no row of an integer column holds this practice id
    return col == sa.bindparam(None, value, type_=col.type)


def _statement(r: _Resolved, mapper: Mapper[Any], n: int) -> sa.Select[Any]:
    # Built once per index and number of roots, with bound parameters: a
    # lookup then costs SQLAlchemy no expression building or cache-key work.
    stmt = r.statements.get(n)
    if stmt is None:
        assert r.tenant_column is not None  # noqa: S101 - checked by _lookup
        values = [sa.bindparam(f"carnet_v{i}", type_=sa.BigInteger) for i in range(n)]
        cond = r.column == values[0] if n == 1 else r.column.in_(values)
        stmt = sa.select(mapper.class_).where(
            r.tenant_column == sa.bindparam("carnet_tenant", type_=r.tenant_column.type), cond
        )
        r.statements[n] = stmt
    return stmt


@overload
def search(
    session: Session,
    attr: BlindIndexAttribute[_M],
    value: Any,
    *,
    tenant: str | None = None,
    where: Sequence[sa.ColumnElement[bool]] = (),
    manager: KeyManager | None = None,
    legacy: Sequence[Any] | None = None,
) -> list[_M]: ...


# A source attribute (``Patient.phone``) does not carry its model's type.
@overload
def search(
    session: Session,
    attr: Any,
    value: Any,
    *,
    tenant: str | None = None,
    where: Sequence[sa.ColumnElement[bool]] = (),
    manager: KeyManager | None = None,
    legacy: Sequence[Any] | None = None,
) -> list[Any]: ...


def search(
    session: Session,
    attr: Any,
    value: Any,
    *,
    tenant: str | None = None,
    where: Sequence[sa.ColumnElement[bool]] = (),
    manager: KeyManager | None = None,
    legacy: Sequence[Any] | None = None,
) -> list[Any]:
    """The rows of ``attr``'s model whose indexed field(s) equal ``value`` after normalisation.

    ``attr``: the index attribute (``Patient.phone_bidx``) or its source
    (``Patient.phone``, if it has exactly one index). For a compound index
    pass a tuple (``("Hélène", "Dupont")``). The practice is ``tenant`` or
    :func:`carnet.current_tenant`. The query is an indexed equality on the
    tenant and index columns; the candidate rows are decrypted and those
    whose normalised value differs (hash collisions) are dropped, so the
    result is exact. A value the transform refuses raises
    :class:`~carnet.errors.InvalidPlaintext` (or, lenient index, finds nothing).

    ``legacy``: while ``carnet migrate`` moves a clear column into the
    encrypted one (expand/contract), the legacy attribute(s) holding the clear
    values, one per source (``legacy=[Patient.phone_legacy]``). Rows of the
    practice with no index value yet are then also read and compared by
    their normalised value: the encrypted field if it is set, else the
    legacy one. Such a lookup reads every not-yet-indexed row of the
    practice, a cost that falls to nothing as the migration progresses;
    drop ``legacy`` once it is finished (docs/migration.md).
    """
    mapper, r = _resolve(attr)
    if legacy is not None:
        return _search_migrating(session, mapper, r, value, tenant, where, manager, legacy)
    tenant, found, normalised = _lookup(r, mapper, value, tenant, manager)
    if normalised is None:
        return []
    assert r.tenant_column is not None  # noqa: S101 - checked by _lookup
    params: dict[str, Any] = {f"carnet_v{i}": v for i, v in enumerate(found)}
    params["carnet_tenant"] = _tenant_value(r.tenant_column, tenant)
    stmt = _statement(r, mapper, len(found))
    if where:
        stmt = stmt.where(*where)
    rows = session.scalars(stmt, params).all()
    out = []
    for obj in rows:
        vals = [getattr(obj, s) for s in r.sources]
        if any(isinstance(v, Sealed) for v in vals):
            raise ConfigurationError(f"search: {r.key}'s fields did not open")
        try:
            if _normalise(r.spec, vals) == normalised:
                out.append(obj)
        except InvalidPlaintext:
            continue
    from . import audit_rows  # loaded with the first search: not on `import carnet`

    audit_rows.searched(session, mapper, r.key, tenant, len(rows), out)
    return out


def _legacy_columns(mapper: Mapper[Any], r: _Resolved, legacy: Sequence[Any]) -> list[Any]:
    if len(legacy) != len(r.sources):
        raise ConfigurationError(
            f"{r.key}: legacy= takes one attribute per source ({', '.join(r.sources)})"
        )
    cols = []
    for a in legacy:
        if not isinstance(a, InstrumentedAttribute) or a.parent.mapper is not mapper:
            raise ConfigurationError(
                f"{r.key}: legacy= takes attributes of {mapper.class_.__name__} (the clear columns)"
            )
        cols.append(a)
    return cols


def _search_migrating(
    session: Session,
    mapper: Mapper[Any],
    r: _Resolved,
    value: Any,
    tenant: str | None,
    where: Sequence[sa.ColumnElement[bool]],
    manager: KeyManager | None,
    legacy: Sequence[Any],
) -> list[Any]:
    """search() during a migration: indexed rows by the index, the others by their values."""
    cols = _legacy_columns(mapper, r, legacy)
    tenant = tenant if tenant is not None else context.current_tenant()
    if tenant is None:
        raise TenantRequired("search: no tenant; pass tenant= or use carnet.tenant_scope(...)")
    if r.tenant_column is None:
        raise ConfigurationError(f"{r.key}: a lookup needs the row's tenant column")
    values = tuple(value) if len(r.sources) > 1 else (value,)
    if len(values) != len(r.sources):
        raise ConfigurationError(
            f"{r.key} is a compound index over {r.sources}: pass a tuple of {len(r.sources)}"
        )
    normalised = _normalise(r.spec, values)
    if normalised is None:
        return []
    if manager is None:
        manager = _manager_for(r.spec, r.source_types)
    roots = manager.index_roots(tenant, create=False)
    out: list[Any] = []
    seen: set[int] = set()
    if roots:
        # Rows already indexed (migrated, or written since): the usual lookup.
        out = search(
            session, r.column_attr(mapper), value, tenant=tenant, where=where, manager=manager
        )
        seen = {id(o) for o in out}
    # Rows not indexed yet: every one of the practice, compared in Python (the
    # clear legacy column may spell the value any way: "06 12..." or "0612...").
    stmt = sa.select(mapper.class_).where(
        _tenant_eq(r.tenant_column, tenant), r.column.is_(None), *where
    )
    for obj in session.scalars(stmt):
        if id(obj) in seen:
            continue
        vals = []
        for src, leg in zip(r.sources, cols, strict=True):
            v = getattr(obj, src)
            if isinstance(v, Sealed):
                raise ConfigurationError(f"search: {r.key}'s fields did not open")
            vals.append(v if v is not None else getattr(obj, leg.key))
        try:
            if _normalise(r.spec, vals) == normalised:
                out.append(obj)
        except InvalidPlaintext:
            continue  # a legacy value the transform refuses matches nothing
    return out


def index_spec(
    attr: Any,
) -> tuple[sa.ColumnElement[Any], list[sa.ColumnElement[Any]], sa.ColumnElement[Any], bool]:
    """(index column, source columns, tenant column, lenient) of a mapped blind index."""
    mapper, r = _resolve(attr)
    if r.tenant_column is None:
        raise ConfigurationError(f"{r.key}: needs the row's tenant column")
    sources: list[sa.ColumnElement[Any]] = [mapper.column_attrs[s].columns[0] for s in r.sources]
    return r.column, sources, r.tenant_column, r.spec.lenient


def index_tenants(engine: sa.Engine, attr: Any) -> list[str]:
    """The practices with rows in ``attr``'s table (for a re-index or backfill of each)."""
    _, r = _resolve(attr)
    if r.tenant_column is None:
        raise ConfigurationError(f"{r.key}: re-indexing needs the row's tenant column")
    with engine.connect() as conn:
        got = conn.execute(
            sa.select(r.tenant_column).where(r.tenant_column.is_not(None)).distinct()
        ).scalars()
        return sorted({str(t) for t in got})
