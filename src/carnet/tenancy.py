"""The tenant invariant, enforced where every write passes.

    After any commit, every non-NULL encrypted value opens under its own row's
    practice and label; a write carnet cannot make true is refused with a
    CarnetError and nothing of it is written (docs/threat-model.md).

Every INSERT and UPDATE reaches ``Connection.execute``, whatever built it: an
ORM flush, ``session.merge``, an ORM bulk or criteria statement, the legacy
bulk methods, Core. :func:`guard_write` runs there (a ``before_execute``
hook) and, for each row of the statement:

- binds each plaintext to the practice of the row that will hold it: the
  practice column's value in the same row of the statement, else the
  practice the ORM bound it to (:class:`~carnet.types.BoundText`), else the
  tenant scope;
- refuses a scope that names another practice than the row (``TenantMismatch``);
- refuses an UPDATE that moves rows to another practice without writing every
  encrypted column of those rows (carnet cannot re-seal what it does not
  read; the ORM reads and re-seals, see :mod:`carnet.orm`);
- pins an UPDATE whose practice comes from a scope or from the ORM to that
  practice (``AND practice = :tenant``), so a value is never written into a
  row of another practice; the statement's rowcount says how many rows matched;
- creates a practice's first key before the statement runs, on the
  statement's own connection on SQLite, and forgets keys created in a
  transaction or savepoint that rolls back.

A column whose type names no practice column (``EncryptedText()``) trusts the
scope: there is nothing in the row to check it against.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.elements import BindParameter, ClauseElement, Null

from . import context
from .errors import (
    ConfigurationError,
    InvalidPlaintext,
    TenantMismatch,
    TenantRequired,
    UnsupportedOperation,
)
from .types import BoundText, EncryptedText, Sealed

if TYPE_CHECKING:
    from .manager import KeyManager

_PIN = "carnet_pin_tenant"
_PIN_ANY = "carnet_pin_any"
_NEW_KEYS = "carnet_new_keys"


class _Enc:
    """One encrypted column of a table, and where its row's practice is."""

    __slots__ = ("key", "column", "type", "tenant_key", "tenant_column", "parent")

    def __init__(self, column: sa.ColumnElement[Any], type_: EncryptedText) -> None:
        self.key: str = column.key or ""
        self.column = column
        self.type = type_
        # The column of this table that decides the practice: the practice
        # itself, or a foreign key to a parent row that holds it (``parent``:
        # the parent's primary key and practice columns).
        self.tenant_key: str | None = None
        self.tenant_column: sa.ColumnElement[Any] | None = None
        self.parent: tuple[Any, Any] | None = None


class _Spec:
    __slots__ = ("encs", "by_tenant")

    def __init__(self, encs: list[_Enc]) -> None:
        self.encs = encs
        # Practice column key -> the encrypted columns it decides.
        self.by_tenant: dict[str, list[_Enc]] = {}
        for e in encs:
            if e.tenant_key is not None:
                self.by_tenant.setdefault(e.tenant_key, []).append(e)


_specs: weakref.WeakKeyDictionary[Any, _Spec | None] = weakref.WeakKeyDictionary()


def _base_table(table: Any) -> Any:
    # ORM statements carry annotated copies of the Table; key the cache on the original.
    return getattr(table, "_Annotated__element", table)


def _spec_for(table: Any) -> _Spec | None:
    base = _base_table(table)
    try:
        return _specs[base]
    except KeyError:
        pass
    except TypeError:  # not weak-referenceable: no cache
        return _build_spec(base)
    spec = _build_spec(base)
    _specs[base] = spec
    return spec


def _build_spec(table: Any) -> _Spec | None:
    columns = getattr(table, "c", None)
    if columns is None:
        return None
    if any(
        isinstance(c.type, EncryptedText)
        and c.type.tenant_path is None
        and "." in (c.type.tenant or "")
        for c in columns
    ):
        # A practice on a parent row is resolved at mapper configuration: a Core
        # statement may come first.
        from sqlalchemy.orm import configure_mappers

        configure_mappers()
    encs: list[_Enc] = []
    for col in columns:
        typ = col.type
        if not isinstance(typ, EncryptedText):
            continue
        e = _Enc(col, typ)
        name = typ.tenant_column_name
        if typ.tenant_path is not None:
            fk_key, parent_pk, parent_tenant = typ.tenant_path
            fk = columns.get(fk_key)
            if fk is not None:
                e.tenant_key, e.tenant_column, e.parent = fk.key, fk, (parent_pk, parent_tenant)
        elif name is not None and "." in name:
            raise ConfigurationError(
                f"{typ.field_label}: EncryptedText(tenant={name!r}) names a parent's practice, "
                "which needs an ORM mapping with that relationship"
            )
        elif name is not None:
            tcol = columns.get(name)
            if tcol is not None:
                e.tenant_key = tcol.key
                e.tenant_column = tcol
            # Otherwise the practice lives in another table (joined inheritance,
            # a parent row): the ORM binds each value to it, or a scope decides.
        encs.append(e)
    return _Spec(encs) if encs else None


# -- values of a statement ------------------------------------------------------------


_MISSING = object()


def _embedded(stmt: Insert | Update) -> dict[str, Any]:
    """Values written into the statement itself (``.values(...)``), by column key."""
    out: dict[str, Any] = {}
    items: Sequence[tuple[Any, Any]] = ()
    if stmt._values:
        items = list(stmt._values.items())
    else:
        items = list(getattr(stmt, "_ordered_values", None) or ())
    for k, v in items:
        if hasattr(k, "__clause_element__"):
            k = k.__clause_element__()
        name = k if isinstance(k, str) else getattr(k, "key", None)
        if name is not None:
            out[name] = v
    return out


def _value(row: Mapping[str, Any], embedded: Mapping[str, Any], key: str) -> tuple[Any, Any]:
    """(value, where): where is the params key holding it, or None for a value in the statement."""
    if key in row:
        return row[key], key
    v = embedded.get(key, _MISSING)
    if v is _MISSING:
        return _MISSING, None
    if isinstance(v, BindParameter):
        if v.key in row:
            return row[v.key], v.key
        return (v.effective_value if v.callable is not None else v.value), None
    if isinstance(v, Null):
        return None, None
    if isinstance(v, ClauseElement):
        return v, None  # an SQL expression
    return v, None


def _all_plain_in_scope(
    rows: Sequence[Mapping[str, Any]], tenant_key: str, keys: Sequence[str], scope: str
) -> bool | None:
    """Whether every row names ``scope`` as its practice and holds only str or None values:
    None when not, else whether any value is a str (a key is needed)."""
    any_text = False
    for row in rows:
        if row.get(tenant_key) != scope:
            return None
        for k in keys:
            v = row.get(k)
            if v is None:
                continue
            if type(v) is not str:
                return None
            any_text = True
    return any_text


def _written(
    encs: Sequence[_Enc], row: Mapping[str, Any], embedded: Mapping[str, Any]
) -> list[_Enc]:
    return [e for e in encs if e.key in row or e.key in embedded]


def _check_plain(e: _Enc, v: Any) -> None:
    if v is None or isinstance(v, str):
        return
    label = e.type.field_label
    if isinstance(v, Sealed):
        raise ConfigurationError(f"{label}: a Sealed value cannot be written back; open it first")
    if isinstance(v, ClauseElement):
        raise UnsupportedOperation(
            f"{label}: an SQL expression cannot be written into an encrypted column "
            "(the database would compute on or copy ciphertext); write a str value"
        )
    raise InvalidPlaintext(
        f"{label} stores str values, not {type(v).__name__}; nothing was written"
    )


_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*")


def _tenant_str(v: Any, column: Any = None) -> str | None:
    if v is None:
        return None
    if isinstance(v, ClauseElement):
        raise UnsupportedOperation(
            "the practice column is set from an SQL expression in a statement that writes "
            "encrypted columns: carnet cannot know which practice each row gets"
        )
    return practice_text(v, column)


def practice_text(v: Any, column: Any = None) -> str:
    """The practice a row holds once ``v`` is written into practice ``column``.

    An integer column stores "007" or True as 7 or 1, and the row's practice
    is then "7" or "1" (what a read gives back and what the database's
    practice check compares): values are sealed for that.
    """
    if column is not None and isinstance(column.type, sa.Integer):
        if isinstance(v, bool) or (isinstance(v, str) and _INT_TEXT.fullmatch(v)):
            return str(int(v))
    return v if type(v) is str else str(v)


def _bind(v: Any, tenant: str) -> BoundText:
    if type(v) is BoundText and v.carnet_tenant == tenant:
        return v
    bv = BoundText(v)
    bv.carnet_tenant = tenant
    if type(v) is BoundText:
        bv.carnet_moved_from = v.carnet_moved_from
    return bv


# -- the guard -------------------------------------------------------------------------


def guard_write(
    conn: sa.Connection,
    stmt: Insert | Update,
    spec: _Spec,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Bind, check and pin one INSERT or UPDATE; see the module docstring."""
    if isinstance(stmt, Insert) and stmt._select_names:
        copied = [e.key for e in spec.encs if e.key in stmt._select_names]
        if copied:
            raise UnsupportedOperation(
                f"INSERT ... FROM SELECT into encrypted column(s) {', '.join(copied)} copies "
                "ciphertext between rows: read, then insert the values"
            )
        return stmt, multiparams, params
    if isinstance(stmt, Insert):
        _refuse_upsert_of_encrypted(stmt, spec)
        if stmt._multi_values:
            return _guard_multi_values(conn, stmt, spec), multiparams, params
    single = not multiparams
    rows: list[dict[str, Any]] = [params] if single else multiparams
    embedded = _embedded(stmt)
    if isinstance(stmt, Insert):
        rows = _with_defaults(spec, rows, embedded)
    is_update = isinstance(stmt, Update)
    scope = context.current_tenant()
    first = rows[0] if rows else {}

    # Rows are copied only when a value in them is rebound: the caller's dicts stay as given.
    out_rows: list[dict[str, Any]] = list(rows) if rows else [{}]
    is_copy = [False] * len(out_rows)
    seen_tenants: set[tuple[int, str]] = set()
    new_embedded: dict[str, Any] = {}
    pins: list[str | None] | None = None
    pin_column: sa.ColumnElement[Any] | None = None
    pin_parent: tuple[Any, Any] | None = None
    need_keys: dict[tuple[int, str], tuple[KeyManager, str]] = {}

    groups: list[tuple[str | None, list[_Enc]]] = list(spec.by_tenant.items())
    free = [e for e in spec.encs if e.tenant_key is None]
    if free:
        groups.append((None, free))

    for tenant_key, encs in groups:
        written = _written(encs, first, embedded)
        tenant_in_stmt = tenant_key is not None and (tenant_key in first or tenant_key in embedded)
        # An UPDATE that sets the practice and only some of its encrypted columns
        # may not move a row (the others would stay sealed for the old practice):
        # it is pinned to rows already in the practice it names.
        partial = is_update and tenant_in_stmt and len(written) != len(encs)
        if partial and not written:
            missing = [e.key for e in encs]
            raise UnsupportedOperation(
                f"this UPDATE sets {tenant_key} but not the encrypted column(s) "
                f"{', '.join(missing)}: rows moved to another practice would keep values sealed "
                "for the old one. Change a row's practice through the ORM (it re-seals), or "
                "write every encrypted column in the same statement"
            )
        if not written:
            continue
        group_pins: list[str | None] = []
        managers = {e.key: e.type.manager_for(conn.dialect) for e in written}
        parent = encs[0].parent
        if is_update and tenant_in_stmt and scope is not None and not partial:
            # A scope never writes into, or moves, another practice's row: an
            # UPDATE that sets the practice under a scope only matches rows
            # that are in the scope's practice now (its rowcount says how many).
            assert tenant_key is not None  # noqa: S101 - tenant_in_stmt implies it
            if pins is not None:
                raise UnsupportedOperation(
                    "an UPDATE of encrypted columns decided by two practice columns"
                )
            pins = [scope] * len(out_rows)
            pin_column = encs[0].tenant_column
            pin_parent = parent
        if (
            scope is not None
            and rows
            and not partial
            and parent is None
            and tenant_key is not None
            and tenant_key in first
            and not embedded
            and (plain := _all_plain_in_scope(rows, tenant_key, [e.key for e in written], scope))
            is not None
        ):
            # The common Core case: every row names the scope's practice and holds
            # plain text, which the type seals for the scope as it is. NULLs need
            # no key (a destroyed practice may still store them).
            for manager in managers.values() if plain else ():
                mark = (id(manager), scope)
                if mark not in seen_tenants:
                    seen_tenants.add(mark)
                    if not manager.has_cached_active_key(scope):
                        need_keys[mark] = (manager, scope)
            continue
        parents: dict[Any, Any] = {}
        if parent is not None and tenant_in_stmt:
            assert tenant_key is not None  # noqa: S101 - tenant_in_stmt implies it
            parents = _parent_practices(
                conn, parent, [_value(r, embedded, tenant_key)[0] for r in (rows or [{}])]
            )
        for i in range(len(out_rows)):
            src = rows[i] if rows else {}
            row_tenant: str | None = None
            from_row = False
            if tenant_in_stmt:
                assert tenant_key is not None  # noqa: S101 - tenant_in_stmt implies it
                tv, _ = _value(src, embedded, tenant_key)
                if tv is _MISSING:
                    # A later row of an executemany or a multi-row VALUES without
                    # the practice: it would get the column's default.
                    raise TenantRequired(
                        f"a row of this statement has no {tenant_key}: give every row its "
                        "practice; nothing was written"
                    )
                if parent is not None:
                    _tenant_str(tv)  # refuses an SQL expression
                    tv = parents.get(tv)
                row_tenant = _tenant_str(tv, encs[0].tenant_column if parent is None else None)
                from_row = True
            for e in written:
                v, where = _value(src, embedded, e.key)
                raw = v
                if v is not None and type(v) is not BoundText and not isinstance(v, str):
                    # The type's own plaintext form (a date's ISO text); refuses what it
                    # cannot store.
                    v = e.type.plaintext(v)
                _check_plain(e, v)
                if v is None:
                    continue
                if isinstance(stmt, Insert) and e.tenant_key is not None and not from_row:
                    # The row's practice would be the column's default: unknown here,
                    # so neither a scope nor a binding may stand in for it.
                    raise TenantRequired(
                        f"writing {e.type.field_label}: give the row's {e.tenant_key} in the "
                        "INSERT; nothing was written"
                    )
                if from_row:
                    tenant = row_tenant
                    if tenant is None:
                        raise TenantRequired(
                            f"writing {e.type.field_label}: the row's {tenant_key} is NULL; "
                            "nothing was written"
                        )
                elif type(v) is BoundText:
                    tenant = v.carnet_tenant
                elif scope is not None:
                    tenant = scope
                else:
                    raise TenantRequired(
                        f"writing {e.type.field_label}: no practice. With the ORM set the "
                        "row's practice column; in Core use carnet.tenant_scope(...)"
                    )
                if scope is not None and tenant != scope:
                    # carnet's own re-seal of a row leaving the scope's practice.
                    if not (type(v) is BoundText and v.carnet_moved_from == scope):
                        raise TenantMismatch(scope, tenant)
                elif scope is None and managers[e.key].require_scope:
                    raise TenantRequired(
                        f"writing {e.type.field_label}: require_scope is on and no "
                        "tenant_scope is active; nothing was written"
                    )
                if not from_row:
                    if row_tenant is None:
                        row_tenant = tenant
                    elif row_tenant != tenant:
                        raise TenantMismatch(row_tenant, tenant)
                # A plain str under a scope of its own practice is sealed for the
                # scope by the type itself: nothing to rebind (the common Core case).
                # A value in the statement itself is always rebound: it may be a
                # literal() of another type, which would be sent as it is.
                if where is None or v is not raw or not (tenant == scope and type(v) is str):
                    bound = _bind(v, tenant)
                    if bound is not raw or where is None:
                        if where is not None:
                            if not is_copy[i]:
                                out_rows[i] = dict(out_rows[i])
                                is_copy[i] = True
                            out_rows[i][where] = bound
                        else:
                            new_embedded[e.key] = bound
                manager = managers[e.key]
                mark = (id(manager), tenant)
                if mark not in seen_tenants:
                    seen_tenants.add(mark)
                    if not manager.has_cached_active_key(tenant):
                        need_keys[mark] = (manager, tenant)
            if not from_row and scope is not None and row_tenant is None:
                row_tenant = scope
            if partial and row_tenant is None:
                raise TenantRequired(
                    f"this UPDATE sets {tenant_key} to NULL but does not write every encrypted "
                    "column of the rows; nothing was written"
                )
            group_pins.append(row_tenant if partial or not from_row else None)
        if is_update and tenant_key is not None and (partial or not tenant_in_stmt):
            # The row's practice is not in the statement: pin it, so a value is
            # never written into another practice's row.
            if any(p is not None for p in group_pins):
                if pins is not None:
                    raise UnsupportedOperation(
                        "an UPDATE of encrypted columns decided by two practice columns"
                    )
                pins = group_pins
                pin_column = encs[0].tenant_column
                pin_parent = parent

    for manager, tenant in need_keys.values():
        ensure_key_for(conn, manager, tenant)

    if new_embedded:
        stmt = stmt.values(new_embedded)
    if pins is not None and pin_column is not None and isinstance(stmt, Update):
        out_rows = [r if c else dict(r) for r, c in zip(out_rows, is_copy, strict=True)]
        if pin_parent is not None:
            # The practice is the parent's: pin to rows whose parent is in it.
            parent_pk, parent_tenant = pin_parent
            pinned: Any = pin_column.in_(
                sa.select(parent_pk).where(parent_tenant == sa.bindparam(_PIN))
            )
        else:
            pinned = pin_column == sa.bindparam(_PIN)
        if all(p is not None for p in pins):
            stmt = stmt.where(pinned)
            for row, p in zip(out_rows, pins, strict=True):
                row[_PIN] = p
        else:
            # Rows writing only NULLs need no pin: match them whatever their practice.
            stmt = stmt.where(sa.or_(pinned, sa.bindparam(_PIN_ANY) == 1))
            for row, p in zip(out_rows, pins, strict=True):
                row[_PIN] = p
                row[_PIN_ANY] = 1 if p is None else 0
    if single:
        return stmt, [], out_rows[0]
    return stmt, out_rows, {}


class _NoContext:
    """Stands for SQLAlchemy's execution context when carnet computes a default itself."""

    def __getattr__(self, name: str) -> Any:
        raise UnsupportedOperation(
            "a default= of an encrypted column that reads the execution context cannot be "
            "sealed by carnet: give the value in the statement"
        )


def _with_defaults(
    spec: _Spec, rows: list[dict[str, Any]], embedded: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The rows with each encrypted column's ``default=`` filled in where absent.

    SQLAlchemy would fill it after the guard, as a bare value with no practice;
    filled here, it is sealed for its row's practice like any value.
    """
    first = rows[0] if rows else {}
    defaults = []
    for e in spec.encs:
        default = getattr(e.column, "default", None)
        if default is None or e.key in first or e.key in embedded:
            continue
        if default.is_scalar:
            defaults.append((e.key, lambda d=default: d.arg))
        elif default.is_callable:
            defaults.append((e.key, lambda d=default: d.arg(_NoContext())))
        else:
            raise UnsupportedOperation(
                f"{e.type.field_label}: an SQL expression as default= cannot be sealed"
            )
    if not defaults:
        return rows
    out = []
    for row in rows or [{}]:
        row = dict(row)
        for key, value in defaults:
            if key not in row:
                row[key] = value()
        out.append(row)
    return out


def _parent_practices(
    conn: sa.Connection, parent: tuple[Any, Any], fks: list[Any]
) -> dict[Any, Any]:
    """Parent primary key -> its practice, for the foreign keys of a statement's rows."""
    parent_pk, parent_tenant = parent
    wanted = {fk for fk in fks if fk is not None and not isinstance(fk, ClauseElement)}
    if not wanted:
        return {}
    with context.without_scope():
        rows = conn.execute(
            sa.select(parent_pk, parent_tenant).where(parent_pk.in_(sorted(wanted, key=repr)))
        ).all()
    return {pk: practice for pk, practice in rows}


# Parent table -> (its primary key, its practice column, a child's foreign key, the
# child's encrypted column): children whose values are sealed for the parent's practice.
_Dependent = tuple[Any, Any, Any, Any]
_dependents: weakref.WeakKeyDictionary[Any, list[_Dependent]] = weakref.WeakKeyDictionary()


def register_dependent(
    parent_pk: Any, parent_tenant: Any, child_fk: Any, child_type: EncryptedText
) -> None:
    """Record that ``child_type``'s values are sealed for their parent row's practice."""
    child_col = next((c for c in child_fk.table.c if c.type is child_type), None)
    if child_col is None:
        return
    entries = _dependents.setdefault(_base_table(parent_pk.table), [])
    if all(e[3] is not child_col for e in entries):
        entries.append((parent_pk, parent_tenant, child_fk, child_col))


def _guard_parent_move(
    conn: sa.Connection,
    stmt: Update,
    entries: list[_Dependent],
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
) -> None:
    """Refuse to change a parent's practice while children hold values sealed for it."""
    embedded = _embedded(stmt)
    rows = multiparams or [params]
    for parent_pk, parent_tenant, child_fk, child_col in entries:
        key = parent_tenant.key
        if key not in rows[0] and key not in embedded:
            continue
        for row in rows:
            new, _ = _value(row, embedded, key)
            moving = sa.select(parent_pk).where(
                *([stmt.whereclause] if stmt.whereclause is not None else []),
                *([] if isinstance(new, ClauseElement) else [parent_tenant.is_distinct_from(new)]),
            )
            held = conn.execute(
                sa.select(sa.literal(1))
                .select_from(child_fk.table)
                .where(child_fk.in_(moving), child_col.is_not(None))
                .limit(1),
                row,
            ).first()
            if held is not None:
                raise UnsupportedOperation(
                    f"this UPDATE changes {parent_tenant.table.name}.{key} of rows whose "
                    f"{child_col.table.name}.{child_col.name} values are sealed for the old "
                    "practice: move those rows to a parent of the new practice first (the ORM "
                    "re-seals them), then change the practice"
                )


def _guard_multi_values(conn: sa.Connection, stmt: Insert, spec: _Spec) -> Insert:
    """A multi-row INSERT ... VALUES: each row checked and bound like a parameter set."""
    rows: list[dict[str, Any]] = []
    for group in stmt._multi_values:
        for r in group:
            if not isinstance(r, Mapping):
                raise UnsupportedOperation(
                    "a multi-row INSERT ... VALUES given by position, with an encrypted column: "
                    "give each row as a dict"
                )
            rows.append({(k if isinstance(k, str) else k.key): v for k, v in r.items()})
    plain = stmt._generate()
    plain._multi_values = ()
    _, bound, _ = guard_write(conn, plain, spec, rows, {})
    columns = stmt.table.c
    out = stmt._generate()
    out._multi_values = ([{columns[k]: v for k, v in row.items()} for row in bound],)  # type: ignore[assignment]
    return out


def _refuse_upsert_of_encrypted(stmt: Insert, spec: _Spec) -> None:
    # ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE overwrite whichever row
    # conflicts, of whatever practice: a value set there cannot be bound to it.
    post = getattr(stmt, "_post_values_clause", None)
    if post is None:
        return
    sets = getattr(post, "update_values_to_set", None) or getattr(post, "update", None) or {}
    # A dict (SQLAlchemy 2.1, MySQL) or a list of (column, value) pairs (2.0).
    keys = sets.keys() if isinstance(sets, Mapping) else [pair[0] for pair in sets]
    names = {k if isinstance(k, str) else getattr(k, "key", None) for k in keys}
    hit = [e.key for e in spec.encs if e.key in names]
    if hit:
        raise UnsupportedOperation(
            f"an upsert that updates encrypted column(s) {', '.join(hit)} on conflict: the "
            "conflicting row may belong to another practice, so the value cannot be sealed "
            "for it. Read the row, then INSERT or UPDATE it"
        )


def _before_execute(
    conn: sa.Connection,
    clauseelement: Any,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
    execution_options: Any,
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    if isinstance(clauseelement, Insert | Update):
        if _dependents and isinstance(clauseelement, Update):
            entries = _dependents.get(_base_table(clauseelement.table))
            if entries:
                _guard_parent_move(conn, clauseelement, entries, multiparams, params)
        spec = _spec_for(clauseelement.table)
        if spec is not None:
            return guard_write(conn, clauseelement, spec, multiparams, params)
    return clauseelement, multiparams, params


# -- first keys and rollbacks -----------------------------------------------------------


def ensure_key_for(conn: sa.Connection, manager: KeyManager, tenant: str) -> None:
    """Create ``tenant``'s first key if needed, where the statement on ``conn`` can see it.

    On SQLite, when the key table lives in the statement's own database, the
    key is created inside ``conn``'s transaction: a second connection would
    wait on the write lock this one may hold. It then lives and dies with that
    transaction: a rollback, of the transaction or of any savepoint, makes
    carnet forget it (forgetting a key that did commit costs one reload, never
    a wrong answer). Elsewhere the key commits in a short transaction of its own.
    """
    if manager.shares_sqlite_database(conn):
        created = manager.ensure_key_in(conn, tenant)
        if created is not None:
            conn.info.setdefault(_NEW_KEYS, []).append((manager, tenant, created))
    else:
        manager.ensure_key(tenant)


def _forget(conn: sa.Connection, *_args: Any) -> None:
    created = conn.info.get(_NEW_KEYS)
    if created:
        for manager, tenant, key_id in created:
            manager.forget_key(tenant, key_id)


def _on_rollback(conn: sa.Connection) -> None:
    _forget(conn)
    conn.info.pop(_NEW_KEYS, None)


def _on_commit(conn: sa.Connection) -> None:
    conn.info.pop(_NEW_KEYS, None)


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    event.listen(sa.Engine, "before_execute", _before_execute, retval=True)
    event.listen(sa.Engine, "rollback", _on_rollback)
    # A savepoint rolled back may have held the key: forget, but keep the
    # list, since the enclosing transaction may still roll back too.
    event.listen(sa.Engine, "rollback_savepoint", _forget)
    event.listen(sa.Engine, "commit", _on_commit)
    _installed = True
