"""The tenant invariant, enforced where every write passes.

    After any commit, every non-NULL encrypted value opens under its own row's
    practice and label; a write carnet cannot make true is refused with a
    CarnetError and nothing of it is written (docs/threat-model.md).

Every INSERT and UPDATE reaches ``Connection.execute``, whatever built it: an
ORM flush, ``session.merge``, an ORM bulk or criteria statement, the legacy
bulk methods, Core. :func:`guard_write` runs there, the second step of
carnet's statement pipeline (:mod:`carnet._hooks`), and, for each row of the
statement:

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
- creates a practice's first key before the statement runs (:mod:`carnet._txkeys`).

A multi-row ``INSERT ... VALUES`` keeps its rows in SQLAlchemy's private
state, which carnet reads but does not rewrite: its rows are checked, and
refused when they would need binding to another practice than the scope's
(the executemany form, ``conn.execute(insert(t), rows)``, does that).

A column whose type names no practice column (``EncryptedText()``) trusts the
scope: there is nothing in the row to check it against.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.sql.elements import BindParameter, ClauseElement, Null

from . import _sa, _txkeys, context
from .errors import (
    ConfigurationError,
    InvalidPlaintext,
    TenantMismatch,
    TenantRequired,
    UnsupportedOperation,
)
from .types import BoundText, EncryptedText, ParentPractice, Sealed, encrypted_type

if TYPE_CHECKING:
    from .manager import KeyManager

_PIN = "carnet_pin_tenant"
_PIN_ANY = "carnet_pin_any"


class _Enc:
    """One encrypted column of a table, and where its row's practice is."""

    __slots__ = ("key", "column", "type", "tenant_key", "tenant_column", "parent")

    def __init__(self, column: sa.ColumnElement[Any], type_: EncryptedText) -> None:
        self.key: str = column.key or ""
        self.column = column
        self.type = type_
        # The column of this table that decides the practice: the practice
        # itself, or a foreign key to a parent row that holds it (``parent``).
        self.tenant_key: str | None = None
        self.tenant_column: sa.ColumnElement[Any] | None = None
        self.parent: ParentPractice | None = None


class _Spec:
    __slots__ = ("encs", "groups")

    def __init__(self, encs: list[_Enc]) -> None:
        self.encs = encs
        # The encrypted columns by the practice column that decides them; last,
        # those no column of the row decides (None: the scope or the ORM does).
        by_tenant: dict[str | None, list[_Enc]] = {}
        for e in encs:
            if e.tenant_key is not None:
                by_tenant.setdefault(e.tenant_key, []).append(e)
        free = [e for e in encs if e.tenant_key is None]
        if free:
            by_tenant[None] = free
        self.groups: list[tuple[str | None, list[_Enc]]] = list(by_tenant.items())


# Table -> dialect name -> its spec (with_variant may encrypt a column on one
# dialect only).
_specs: weakref.WeakKeyDictionary[Any, dict[str, _Spec | None]] = weakref.WeakKeyDictionary()


def spec_for(table: Any, dialect: str) -> _Spec | None:
    """The encrypted columns of ``table`` on ``dialect``, or None when it has none."""
    base = _sa.deannotated(table)
    try:
        per_dialect = _specs.get(base)
    except TypeError:  # not weak-referenceable: no cache
        return _build_spec(base, dialect)
    if per_dialect is None:
        per_dialect = _specs[base] = {}
    try:
        return per_dialect[dialect]
    except KeyError:
        spec = per_dialect[dialect] = _build_spec(base, dialect)
        return spec


def clear_caches() -> None:
    """Forget the tables' specs (tests that change how SQLAlchemy looks)."""
    _specs.clear()


def _build_spec(table: Any, dialect: str) -> _Spec | None:
    columns = getattr(table, "c", None)
    if columns is None:
        return None
    found = [(c, encrypted_type(c, dialect)) for c in columns]
    encrypted = [(c, t) for c, t in found if t is not None]
    if any(t.tenant_path is None and "." in (t.tenant or "") for _c, t in encrypted):
        # A practice on a parent row is resolved at mapper configuration: a Core
        # statement may come first.
        from sqlalchemy.orm import configure_mappers

        configure_mappers()
    encs: list[_Enc] = []
    for col, typ in encrypted:
        e = _Enc(col, typ)
        name = typ.tenant_column_name
        if typ.tenant_path is not None:
            fk = columns.get(typ.tenant_path.fk_key)
            if fk is not None:
                e.tenant_key, e.tenant_column, e.parent = fk.key, fk, typ.tenant_path
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
    values = _sa.dml_values(stmt)
    items: Sequence[tuple[Any, Any]] = list(values.items()) if values else _sa.ordered_values(stmt)
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
    """Bind, check and pin one INSERT or UPDATE; see the module docstring.

    The steps, in order: refuse what copies ciphertext or cannot be bound
    (INSERT ... FROM SELECT, an upsert's SET); a multi-row VALUES checked row
    by row; then, per practice column, each row's values bound to the row's
    practice (or refused); the first keys the statement needs; the UPDATE
    pinned to the practices it was bound for.
    """
    if isinstance(stmt, Insert):
        if _refuse_copy_from_select(stmt, spec):
            return stmt, multiparams, params
        _refuse_upsert_of_encrypted(stmt, spec)
        if _sa.multi_values(stmt):
            _check_multi_values(conn, stmt, spec)
            return stmt, multiparams, params
    write = _Write(conn, stmt, multiparams, params)
    for tenant_key, encs in spec.groups:
        write.bind_group(tenant_key, encs)
    write.create_first_keys()
    return write.result()


class _Write:
    """One INSERT or UPDATE going through :func:`guard_write`: its rows and what was decided."""

    def __init__(
        self,
        conn: sa.Connection,
        stmt: Insert | Update,
        multiparams: list[dict[str, Any]],
        params: dict[str, Any],
    ) -> None:
        self.conn = conn
        self.stmt: Any = stmt
        self.single = not multiparams
        self.embedded = _embedded(stmt)
        rows: list[dict[str, Any]] = [params] if self.single else multiparams
        if isinstance(stmt, Insert):
            rows = _with_defaults(stmt, rows, self.embedded)
        self.rows = rows
        self.is_update = isinstance(stmt, Update)
        self.scope = context.current_tenant()
        self.first: Mapping[str, Any] = rows[0] if rows else {}
        # Rows are copied only when a value in them is rebound: the caller's
        # dicts stay as given.
        self.out_rows: list[dict[str, Any]] = list(rows) if rows else [{}]
        self.is_copy = [False] * len(self.out_rows)
        self.new_embedded: dict[str, Any] = {}
        # The practices an UPDATE is pinned to, one per row (None: no pin).
        self.pins: list[str | None] | None = None
        self.pin_column: sa.ColumnElement[Any] | None = None
        self.pin_parent: ParentPractice | None = None
        # (manager, practice) pairs whose active key must exist before the statement runs.
        self.seen_keys: set[tuple[int, str]] = set()
        self.need_keys: dict[tuple[int, str], tuple[KeyManager, str]] = {}

    # -- per practice column --------------------------------------------------------

    def bind_group(self, tenant_key: str | None, encs: list[_Enc]) -> None:
        """Bind the values of the encrypted columns one practice column decides."""
        written = [e for e in encs if e.key in self.first or e.key in self.embedded]
        tenant_in_stmt = tenant_key is not None and (
            tenant_key in self.first or tenant_key in self.embedded
        )
        # An UPDATE that sets the practice and only some of its encrypted columns
        # may not move a row (the others would stay sealed for the old practice):
        # it is pinned to rows already in the practice it names.
        partial = self.is_update and tenant_in_stmt and len(written) != len(encs)
        if partial and not written:
            raise UnsupportedOperation(
                f"this UPDATE sets {tenant_key} but not the encrypted column(s) "
                f"{', '.join(e.key for e in encs)}: rows moved to another practice would keep "
                "values sealed for the old one. Change a row's practice through the ORM (it "
                "re-seals), or write every encrypted column in the same statement"
            )
        if not written:
            return
        managers = {e.key: e.type.manager_for(self.conn.dialect) for e in written}
        parent = encs[0].parent
        if self.is_update and tenant_in_stmt and self.scope is not None and not partial:
            # A scope never writes into, or moves, another practice's row: an
            # UPDATE that sets the practice under a scope only matches rows
            # that are in the scope's practice now (its rowcount says how many).
            self.pin([self.scope] * len(self.out_rows), encs[0])
        if not partial and parent is None and self.all_plain_in_scope(tenant_key, written):
            # The common Core case: every row names the scope's practice and holds
            # plain text, which the type seals for the scope as it is.
            return
        if not partial and parent is None and tenant_in_stmt and not self.embedded:
            # The common ORM flush (and a Core write naming each row's practice):
            # every row holds its own practice; bound row by row, in one frame.
            assert tenant_key is not None  # noqa: S101 - tenant_in_stmt implies it
            self.bind_rows_of_their_practice(tenant_key, encs, written, managers)
            return
        parents: dict[Any, Any] = {}
        if parent is not None and tenant_in_stmt:
            assert tenant_key is not None  # noqa: S101 - tenant_in_stmt implies it
            parents = _parent_practices(
                self.conn,
                parent,
                [_value(r, self.embedded, tenant_key)[0] for r in (self.rows or [{}])],
            )
        group_pins = [
            self.bind_row(
                i, tenant_key if tenant_in_stmt else None, encs, written, managers, parents, partial
            )
            for i in range(len(self.out_rows))
        ]
        if self.is_update and tenant_key is not None and (partial or not tenant_in_stmt):
            # The row's practice is not in the statement: pin it, so a value is
            # never written into another practice's row.
            if any(p is not None for p in group_pins):
                self.pin(group_pins, encs[0])

    def bind_rows_of_their_practice(
        self,
        tenant_key: str,
        encs: list[_Enc],
        written: list[_Enc],
        managers: dict[str, KeyManager],
    ) -> None:
        """Bind each row's values to the practice the row itself names.

        What :meth:`bind_row` decides for a row whose practice is a str in its
        own parameters (not an integer column's, which normalises it) and whose
        values are str or None, with no ``require_scope`` refusal and no scope
        of another practice: each str value bound to the row's practice (left
        as it is when that is the scope's, which the column type seals for), its
        key noted. Any other row goes through :meth:`bind_row`, which binds it
        or says what is wrong with it. No row of this shape is pinned.
        """
        scope = self.scope
        column = encs[0].tenant_column
        general = (
            (column is not None and isinstance(column.type, sa.Integer))
            or not all(e.type.text_values for e in written)
            or (scope is None and any(m.require_scope for m in managers.values()))
        )
        rows, out_rows, is_copy = self.rows, self.out_rows, self.is_copy
        values = [(e.key, managers[e.key]) for e in written]
        seen = self.seen_keys
        for i, row in enumerate(rows):
            tenant: Any = row.get(tenant_key)
            fits = not general and type(tenant) is str and (scope is None or tenant == scope)
            if fits:
                for key, _manager in values:
                    v = row.get(key, _MISSING)
                    if v is not None and type(v) is not str:
                        fits = False
                        break
            if not fits:
                self.bind_row(i, tenant_key, encs, written, managers, {}, False)
                continue
            for key, manager in values:
                v = row[key]
                if v is None:
                    continue
                if tenant != scope:
                    if not is_copy[i]:
                        out_rows[i] = dict(out_rows[i])
                        is_copy[i] = True
                    bound = BoundText(v)
                    bound.carnet_tenant = tenant
                    out_rows[i][key] = bound
                if (id(manager), tenant) not in seen:
                    self.note_key(manager, tenant)

    def all_plain_in_scope(self, tenant_key: str | None, written: list[_Enc]) -> bool:
        """Whether every row names the scope's practice and holds only str or None values.

        Then nothing needs rebinding; the keys the values need are noted.
        NULLs need no key (a destroyed practice may still store them).
        """
        scope = self.scope
        if scope is None or not self.rows or tenant_key is None or self.embedded:
            return False
        if tenant_key not in self.first:
            return False
        any_text = False
        keys = [e.key for e in written]
        for row in self.rows:
            if row.get(tenant_key) != scope:
                return False
            for k in keys:
                v = row.get(k)
                if v is None:
                    continue
                if type(v) is not str:
                    return False
                any_text = True
        if any_text:
            for e in written:
                self.note_key(e.type.manager_for(self.conn.dialect), scope)
        return True

    def bind_row(
        self,
        i: int,
        tenant_key: str | None,
        encs: list[_Enc],
        written: list[_Enc],
        managers: dict[str, KeyManager],
        parents: dict[Any, Any],
        partial: bool,
    ) -> str | None:
        """Bind row ``i``'s values to its practice; returns the practice to pin it to."""
        src = self.rows[i] if self.rows else {}
        row_tenant = self.row_practice(src, tenant_key, encs, parents)
        from_row = tenant_key is not None
        for e in written:
            tenant = self.bind_value(i, src, e, row_tenant, from_row, managers[e.key])
            if tenant is not None and not from_row:
                if row_tenant is None:
                    row_tenant = tenant
                elif row_tenant != tenant:
                    raise TenantMismatch(row_tenant, tenant)
        if not from_row and self.scope is not None and row_tenant is None:
            row_tenant = self.scope
        if partial and row_tenant is None:
            raise TenantRequired(
                f"this UPDATE sets {tenant_key} to NULL but does not write every encrypted "
                "column of the rows; nothing was written"
            )
        return row_tenant if partial or not from_row else None

    def row_practice(
        self,
        src: Mapping[str, Any],
        tenant_key: str | None,
        encs: list[_Enc],
        parents: dict[Any, Any],
    ) -> str | None:
        """The practice the statement gives the row (its own column, or its parent's)."""
        if tenant_key is None:
            return None
        tv, _ = _value(src, self.embedded, tenant_key)
        if tv is _MISSING:
            # A later row of an executemany without the practice: it would get
            # the column's default.
            raise TenantRequired(
                f"a row of this statement has no {tenant_key}: give every row its "
                "practice; nothing was written"
            )
        if encs[0].parent is not None:
            _tenant_str(tv)  # refuses an SQL expression
            return _tenant_str(parents.get(tv))
        return _tenant_str(tv, encs[0].tenant_column)

    def bind_value(
        self,
        i: int,
        src: Mapping[str, Any],
        e: _Enc,
        row_tenant: str | None,
        from_row: bool,
        manager: KeyManager,
    ) -> str | None:
        """Check one value and bind it to its practice; returns that practice (None: NULL)."""
        v, where = _value(src, self.embedded, e.key)
        raw = v
        if (
            v is not None
            and type(v) is not BoundText
            and (not isinstance(v, str) or not e.type.text_values)
        ):
            # The type's own plaintext form (a date's ISO text, a document's
            # bytes, canonical JSON); refuses what it cannot store (a str, for
            # the types whose values are not text).
            v = e.type.plaintext(v)
        _check_plain(e, v)
        if v is None:
            return None
        if isinstance(self.stmt, Insert) and e.tenant_key is not None and not from_row:
            # The row's practice would be the column's default: unknown here,
            # so neither a scope nor a binding may stand in for it.
            raise TenantRequired(
                f"writing {e.type.field_label}: give the row's {e.tenant_key} in the "
                "INSERT; nothing was written"
            )
        tenant = self.practice_for(e, v, row_tenant, from_row, manager)
        # A plain str under a scope of its own practice is sealed for the
        # scope by the type itself: nothing to rebind (the common Core case).
        # A value in the statement itself is always rebound: it may be a
        # literal() of another type, which would be sent as it is.
        if where is None or v is not raw or not (tenant == self.scope and type(v) is str):
            bound = _bind(v, tenant)
            if bound is not raw or where is None:
                if where is not None:
                    if not self.is_copy[i]:
                        self.out_rows[i] = dict(self.out_rows[i])
                        self.is_copy[i] = True
                    self.out_rows[i][where] = bound
                else:
                    self.new_embedded[e.key] = bound
        self.note_key(manager, tenant)
        return tenant

    def practice_for(
        self, e: _Enc, v: Any, row_tenant: str | None, from_row: bool, manager: KeyManager
    ) -> str:
        """The practice a value is sealed for: its row's, its ORM binding's, or the scope's."""
        scope = self.scope
        if from_row:
            if row_tenant is None:
                raise TenantRequired(
                    f"writing {e.type.field_label}: the row's {e.tenant_key} is NULL; "
                    "nothing was written"
                )
            tenant = row_tenant
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
        elif scope is None and manager.require_scope:
            raise TenantRequired(
                f"writing {e.type.field_label}: require_scope is on and no "
                "tenant_scope is active; nothing was written"
            )
        return tenant

    # -- keys and pins ------------------------------------------------------------------

    def note_key(self, manager: KeyManager, tenant: str) -> None:
        mark = (id(manager), tenant)
        if mark not in self.seen_keys:
            self.seen_keys.add(mark)
            if not manager._has_cached_active_key(tenant):
                self.need_keys[mark] = (manager, tenant)

    def create_first_keys(self) -> None:
        for manager, tenant in self.need_keys.values():
            _txkeys.data_key(self.conn, manager, tenant)

    def pin(self, pins: list[str | None], enc: _Enc) -> None:
        if self.pins is not None:
            raise UnsupportedOperation(
                "an UPDATE of encrypted columns decided by two practice columns"
            )
        self.pins = pins
        self.pin_column = enc.tenant_column
        self.pin_parent = enc.parent

    def result(self) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
        stmt = self.stmt
        out_rows = self.out_rows
        if self.new_embedded:
            try:
                stmt = stmt.values(self.new_embedded)
            except sa.exc.InvalidRequestError:
                # update().ordered_values(...) takes no further values: the
                # value cannot be bound to its practice inside the statement.
                raise UnsupportedOperation(
                    "an UPDATE with ordered_values() that writes an encrypted column: carnet "
                    "binds each value to its row's practice and cannot add it to ordered "
                    "values; use .values(...) or pass the value as an execute parameter"
                ) from None
        if self.pins is not None and self.pin_column is not None and self.is_update:
            out_rows = [r if c else dict(r) for r, c in zip(out_rows, self.is_copy, strict=True)]
            stmt = _pinned(stmt, self.pins, self.pin_column, self.pin_parent, out_rows)
        if self.single:
            return stmt, [], out_rows[0]
        return stmt, out_rows, {}


def _pinned(
    stmt: Update,
    pins: list[str | None],
    pin_column: sa.ColumnElement[Any],
    parent: ParentPractice | None,
    rows: list[dict[str, Any]],
) -> Update:
    """``stmt`` matching only rows of the practice each parameter row was bound for."""
    if parent is not None:
        # The practice is the parent's: pin to rows whose parent is in it.
        pinned: Any = pin_column.in_(
            sa.select(parent.pk).where(parent.practice == sa.bindparam(_PIN))
        )
    else:
        pinned = pin_column == sa.bindparam(_PIN)
    if all(p is not None for p in pins):
        for row, p in zip(rows, pins, strict=True):
            row[_PIN] = p
        return stmt.where(pinned)
    # Rows writing only NULLs need no pin: match them whatever their practice.
    for row, p in zip(rows, pins, strict=True):
        row[_PIN] = p
        row[_PIN_ANY] = 1 if p is None else 0
    return stmt.where(sa.or_(pinned, sa.bindparam(_PIN_ANY) == 1))


def _refuse_copy_from_select(stmt: Insert, spec: _Spec) -> bool:
    """INSERT ... FROM SELECT: refused if it fills an encrypted column; True if it is one."""
    names = _sa.select_names(stmt)
    if not names:
        return False
    copied = [e.key for e in spec.encs if e.key in {getattr(n, "key", n) for n in names}]
    if copied:
        raise UnsupportedOperation(
            f"INSERT ... FROM SELECT into encrypted column(s) {', '.join(copied)} copies "
            "ciphertext between rows: read, then insert the values"
        )
    return True


def _check_multi_values(conn: sa.Connection, stmt: Insert, spec: _Spec) -> None:
    """A multi-row INSERT ... VALUES: each row checked like a parameter set.

    Its rows live in the statement's private state, which carnet does not
    rewrite: a row whose values would need binding to a practice other than
    the scope's as given is refused, with the executemany form that does it.
    """
    rows: list[dict[str, Any]] = []
    for group in _sa.multi_values(stmt):
        for r in group:
            if not isinstance(r, Mapping):
                raise UnsupportedOperation(
                    "a multi-row INSERT ... VALUES given by position, with an encrypted column: "
                    "give each row as a dict"
                )
            rows.append({(k if isinstance(k, str) else k.key): v for k, v in r.items()})
    write = _Write(conn, stmt, rows, {})
    if write.rows is not rows:
        raise UnsupportedOperation(
            "a multi-row INSERT ... VALUES into a table whose encrypted column has a default=: "
            "carnet cannot seal the default inside the statement; pass the rows as execute "
            "parameters (conn.execute(insert(table), rows))"
        )
    for tenant_key, encs in spec.groups:
        write.bind_group(tenant_key, encs)
    if any(write.is_copy) or write.new_embedded:
        raise UnsupportedOperation(
            "a multi-row INSERT ... VALUES whose rows carnet must seal each for its own "
            "practice: carnet does not rewrite the statement's rows. Pass the rows as execute "
            "parameters (conn.execute(insert(table), rows)), or run it in a tenant_scope of "
            "the rows' practice"
        )
    write.create_first_keys()


class _NoContext:
    """Stands for SQLAlchemy's execution context when carnet computes a default itself."""

    def __getattr__(self, name: str) -> Any:
        raise UnsupportedOperation(
            "a default= of an encrypted column that reads the execution context cannot be "
            "sealed by carnet: give the value in the statement"
        )


def _with_defaults(
    stmt: Insert, rows: list[dict[str, Any]], embedded: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The rows with each encrypted column's ``default=`` filled in where absent.

    SQLAlchemy would fill it after the guard, as a bare value with no practice;
    filled here, it is sealed for its row's practice like any value. The same
    list is returned when no default applies.
    """
    first = rows[0] if rows else {}
    defaults = []
    for col in stmt.table.c:
        default = getattr(col, "default", None)
        if default is None or col.key in first or col.key in embedded:
            continue
        typ = encrypted_type(col)
        if typ is None:
            continue
        if default.is_scalar:
            defaults.append((col.key, lambda d=default: d.arg))
        elif default.is_callable:
            defaults.append((col.key, lambda d=default: d.arg(_NoContext())))
        else:
            raise UnsupportedOperation(
                f"{typ.field_label}: an SQL expression as default= cannot be sealed"
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
    conn: sa.Connection, parent: ParentPractice, fks: list[Any]
) -> dict[Any, Any]:
    """Parent primary key -> its practice, for the foreign keys of a statement's rows."""
    wanted = {fk for fk in fks if fk is not None and not isinstance(fk, ClauseElement)}
    if not wanted:
        return {}
    with context.without_scope():
        rows = conn.execute(
            sa.select(parent.pk, parent.practice).where(parent.pk.in_(sorted(wanted, key=repr)))
        ).all()
    return {pk: practice for pk, practice in rows}


# Parent table -> (where the practice is, the child's encrypted column): children
# whose values are sealed for their parent row's practice.
_dependents: weakref.WeakKeyDictionary[Any, list[tuple[ParentPractice, Any]]] = (
    weakref.WeakKeyDictionary()
)


def register_dependent(parent: ParentPractice, child_type: EncryptedText) -> None:
    """Record that ``child_type``'s values are sealed for their parent row's practice."""
    child_col = next((c for c in parent.fk.table.c if c.type is child_type), None)
    if child_col is None:
        return
    entries = _dependents.setdefault(_sa.deannotated(parent.pk.table), [])
    if all(e[1] is not child_col for e in entries):
        entries.append((parent, child_col))


def guard_parent_move(
    conn: sa.Connection, stmt: Update, multiparams: list[dict[str, Any]], params: dict[str, Any]
) -> None:
    """Refuse to change a parent's practice while children hold values sealed for it."""
    if not _dependents:
        return
    entries = _dependents.get(_sa.deannotated(stmt.table))
    if not entries:
        return
    embedded = _embedded(stmt)
    rows = multiparams or [params]
    for parent, child_col in entries:
        key = parent.practice.key
        if key not in rows[0] and key not in embedded:
            continue
        for row in rows:
            new, _ = _value(row, embedded, key)
            moving = sa.select(parent.pk).where(
                *([stmt.whereclause] if stmt.whereclause is not None else []),
                *(
                    []
                    if isinstance(new, ClauseElement)
                    else [parent.practice.is_distinct_from(new)]
                ),
            )
            held = conn.execute(
                sa.select(sa.literal(1))
                .select_from(parent.fk.table)
                .where(parent.fk.in_(moving), child_col.is_not(None))
                .limit(1),
                row,
            ).first()
            if held is not None:
                raise UnsupportedOperation(
                    f"this UPDATE changes {parent.practice.table.name}.{key} of rows whose "
                    f"{child_col.table.name}.{child_col.name} values are sealed for the old "
                    "practice: move those rows to a parent of the new practice first (the ORM "
                    "re-seals them), then change the practice"
                )


def _refuse_upsert_of_encrypted(stmt: Insert, spec: _Spec) -> None:
    # ON CONFLICT DO UPDATE / ON DUPLICATE KEY UPDATE overwrite whichever row
    # conflicts, of whatever practice: a value set there cannot be bound to it.
    post = _sa.post_values_clause(stmt)
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


def bind_write(
    conn: sa.Connection,
    stmt: Any,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
) -> tuple[Any, list[dict[str, Any]], dict[str, Any], bool]:
    """The pipeline's tenant step for one statement: returns it bound, and whether it
    writes an encrypted column (its parameters then hold notes)."""
    if not isinstance(stmt, Insert | Update):
        return stmt, multiparams, params, False
    if isinstance(stmt, Update):
        guard_parent_move(conn, stmt, multiparams, params)
    spec = spec_for(stmt.table, conn.dialect.name)
    if spec is None:
        return stmt, multiparams, params, False
    stmt, multiparams, params = guard_write(conn, stmt, spec, multiparams, params)
    return stmt, multiparams, params, True
