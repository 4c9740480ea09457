"""ORM integration: the row's own practice column chooses the key.

Attached by :mod:`carnet._hooks` (when carnet is first used, never at import):

- ``mapper_configured``: find each mapper's EncryptedText columns and check
  that their ``tenant=`` attribute exists (a typo fails at configuration).
- Loading: an attribute whose practice is a column of its own row is loaded
  by a column loader of SQLAlchemy's own kind (:func:`carnet._sa.load_column_with`)
  that opens the value as the row is loaded, under the practice read from
  the same row, with no per-row listener (EncryptedText's own values read as
  the driver returned them, :class:`carnet._sa.LoadedColumn`); when the
  practice is not in the row (``load_only``, a refresh of the value alone),
  after the row's columns.
  ``load`` (a practice on a parent row) and ``refresh`` (a safety net) open
  the :class:`~carnet.types.Sealed` values left with the row's practice.
- ``before_update`` (per row, after the flush has synchronised foreign keys,
  so a practice changed through a relationship is seen too): when the row's
  practice changes, every encrypted value of the row is read under the old
  practice (from the database when it is not loaded, deferred or expired)
  and written again, to be sealed for the new one; otherwise each changed
  value is bound to the row's practice (:class:`~carnet.types.BoundText`),
  which the write guard pins the UPDATE to.

Every INSERT and UPDATE then passes the write guard of :mod:`carnet.tenancy`,
which binds each value to its row's practice and refuses what it cannot make
true: the ORM only supplies what the statement alone does not say.
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapper, ORMExecuteState
from sqlalchemy.orm.base import NO_VALUE
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.elements import ClauseElement

from . import _sa, envelope
from ._aead import AuthenticationFailed
from .context import EPOCH as _EPOCH
from .context import SCOPE as _tenant
from .dbchecks import check_practice_type
from .errors import ConfigurationError, InvalidCiphertext, TenantMismatch, TenantRequired
from .tenancy import practice_text
from .tenancy import register_dependent as _register_dependent
from .types import BoundText, EncryptedText, ParentPractice, Sealed, encrypted_type

Spec = tuple[str, EncryptedText, "str | None"]


class _Group:
    """The encrypted attributes of a mapper decided by one practice.

    ``tkey``/``tcol``: the attribute (and column) whose change moves the row
    to another practice: the practice column itself, or, for a practice on a
    parent row (``tenant="patient.practice_id"``), the foreign key to it.
    ``parent``: for the latter, where the practice is; ``hidden`` names the
    attribute (a correlated subquery ``expr`` loaded with the row) that holds
    the row's practice.
    """

    __slots__ = ("tkey", "tcol", "parent", "hidden", "expr", "items")

    def __init__(
        self,
        tkey: str,
        tcol: sa.Column[Any],
        parent: ParentPractice | None = None,
        hidden: str | None = None,
        expr: Any = None,
    ) -> None:
        self.tkey = tkey
        self.tcol = tcol
        self.parent = parent
        self.hidden = hidden
        self.expr = expr
        self.items: list[tuple[str, EncryptedText, sa.Column[Any]]] = []

    def practice_key(self) -> str:
        return self.hidden if self.hidden is not None else self.tkey

    def practice_source(self) -> Any:
        """What to SELECT for the practice the row is stored under."""
        return self.expr if self.expr is not None else self.tcol


_specs: weakref.WeakKeyDictionary[Mapper[Any], list[Spec]] = weakref.WeakKeyDictionary()
_TEXT_DECRYPT = EncryptedText.decrypt
_KEY_ID = envelope.KEY_ID


def _open_state(specs: list[Spec], state: InstanceState[Any], *_context: Any) -> None:
    # Called for every loaded row: kept lean (no work unless a value is Sealed,
    # which a read outside a scope always gives).
    d = state.dict
    for key, typ, tkey in specs:
        v = d.get(key)
        if v.__class__ is not Sealed:
            continue
        # The common case in one step: EncryptedText itself, its practice a
        # str on the row, unchanged, no scope, no strict mode. Anything else
        # takes the general path below, which checks each of these.
        tenant = d.get(tkey) if tkey is not None else None
        manager = v._manager
        if (
            tenant.__class__ is str
            and manager is not None
            and not state.committed_state
            and _tenant.get() is None
            and not manager.require_scope
            and typ.__class__.decrypt is _TEXT_DECRYPT
        ):
            label = typ._resolved_label
            if label is not None:
                d[key] = manager._open_text(v.data, tenant, label)
                continue
        _open_value(state, d, key, typ, tkey, v)


def _open_value(
    state: InstanceState[Any], d: dict[str, Any], key: str, typ: EncryptedText, tkey: Any, v: Sealed
) -> None:
    """Open one Sealed value of a loaded row: every case, each check."""
    scope = _tenant.get()
    tenant = d.get(tkey) if tkey is not None else None
    if tkey is not None and state.committed_state and tkey in state.committed_state:
        # The practice was changed and not flushed yet: the stored value is
        # still sealed for the practice it had.
        before = state.committed_state[tkey]
        if before is not NO_VALUE:
            tenant = before
        elif tenant is not None:
            raise TenantRequired(
                f"{state.class_.__name__}.{key}: its practice was changed before it "
                "was loaded; load it first"
            )
    if tenant is None:
        if scope is not None:
            tenant = scope
        elif tkey is not None and tkey not in d and tkey not in state.committed_state:
            # Loaded without its practice (load_only, a refresh of the value
            # alone): never leave a Sealed in a str attribute. Expire both,
            # so the first access loads them together and opens the value.
            _expire(state, [key, tkey])
            return
        else:
            raise TenantRequired(
                f"{state.class_.__name__}.{key}: no practice to open it with"
                + (f" ({tkey} is NULL)" if tkey is not None else " (use carnet.tenant_scope)")
            )
    else:
        tenant = str(tenant)
        if scope is not None and scope != tenant:
            raise TenantMismatch(scope, tenant)
    d[key] = _open_under(typ, v, tenant)


def _row_loader(where: str, typ: EncryptedText, spec: Spec) -> _sa.MakeGetter:
    """How the ORM loads one encrypted attribute (:func:`carnet._sa.load_column_with`):
    with the row's practice column in the same row, the value opens as the row is
    loaded, under that practice, with no per-row listener; without it, after the
    row's columns, as the ``load`` listener would (:func:`_open_state`)."""
    fallback = functools.partial(_open_loaded, [spec])
    text = typ.__class__.decrypt is _TEXT_DECRYPT
    get_scope = _tenant.get
    monotonic = time.monotonic
    # No length compared before opening, as in the column type's processor: a
    # value cut short after its header fails in the AEAD (ValueError for a nonce
    # too short, a failed tag otherwise) and is refused the same way.
    cut_or_failed = (AuthenticationFailed, ValueError)
    epoch = _EPOCH

    def make(
        key: str, column: _sa.LoadedColumn, practice: _sa.RowGetter | None
    ) -> tuple[_sa.RowGetter | None, Any]:
        if practice is None:
            return None, fallback
        label = typ._resolved_label
        # EncryptedText's own binary values are read as the driver returned them
        # (this result's rows skip the column type's processor and its Sealed
        # placeholder) unless another entity of the query reads an encrypted column
        # as the column type makes it; what the fast path below does not open goes
        # through the processor (``process``), as any other value.
        raw = (
            column.unprocessed(_is_encrypted)
            if text and label is not None and typ.storage != "text"
            else None
        )
        if raw is None:
            body, process = column.processed(), None
        else:
            body, process = raw
        # This result's openers, by practice: a warm one opens the next value of
        # that practice and key in this frame, as the column type's processor
        # does in a scope (carnet.types), after the same checks: same manager,
        # unexpired, no scope, no required scope, and the whole v2 header
        # (version, key id, label tag, practice) compared; the decrypt hook (the
        # audit trail, a budget) is called before the value opens. Anything else
        # takes the manager's path, which checks everything. A value read as
        # stored has no manager of its own: its opener serves it only while no
        # manager was configured or bound since the opener was found (EPOCH),
        # when the column type would resolve the same manager.
        fast: dict[Any, tuple[Any, ...]] = {}
        # Lives as long as this result's getter: what a tally watches.
        owner = _ResultToken()

        def getter(row: Any) -> Any:
            v = body(row)
            since = epoch[0]
            if process is not None:
                # As the driver returned it.
                if v.__class__ is bytes:
                    tenant = practice(row)
                    hot = fast.get(tenant)
                    if hot is not None:
                        seen, manager, opener, tallied, cell, head, at, end, _s, open_, aad = hot
                        if (
                            seen == since
                            and v[:at] == head
                            and (opener.live or opener.expires > monotonic())
                            and not manager.require_scope
                            and get_scope() is None
                        ):
                            hook = manager.decrypt_hook
                            if hook is not None:
                                # Charged before the value opens (the manager's path does
                                # the same): a refused read never has its text here.
                                if hook is tallied:
                                    cell[0] += 1
                                else:
                                    hook(tenant, label, 1)
                            try:
                                plain = open_(v[at:end], v[end:], aad)
                            except cut_or_failed:
                                raise InvalidCiphertext(label=label, tenant=tenant) from None
                            manager._fast_hits += 1
                            return plain.decode("utf-8")
                if v is not None:
                    # What the column type makes of it (a Sealed value, the text
                    # opened in a scope, or its refusal of what is not carnet's).
                    v = process(v)
            if v.__class__ is Sealed:
                tenant = practice(row)
                manager = v._manager
                hot = fast.get(tenant)
                if hot is not None:
                    _seen, of, opener, tallied, cell, head, at, end, _s, open_, aad = hot
                    data = v.data
                    if (
                        of is manager
                        and data[:at] == head
                        and (opener.live or opener.expires > monotonic())
                        and not manager.require_scope
                        and get_scope() is None
                    ):
                        hook = manager.decrypt_hook
                        if hook is not None:
                            if hook is tallied:
                                cell[0] += 1
                            else:
                                hook(tenant, label, 1)
                        try:
                            plain = open_(data[at:end], data[end:], aad)
                        except cut_or_failed:
                            raise InvalidCiphertext(label=label, tenant=tenant) from None
                        manager._fast_hits += 1
                        return plain.decode("utf-8")
                if (
                    text
                    and label is not None
                    and tenant.__class__ is str
                    and manager is not None
                    and get_scope() is None
                    and not manager.require_scope
                ):
                    data = v.data
                    opened = manager._open_text(data, tenant, label)
                    opener = manager._openers.get((data[_KEY_ID], label, tenant))
                    if opener is not None:
                        # A hook that keeps a count per result (the audit trail's
                        # best_effort hook: AuditTrail._tally) is charged by adding one
                        # to this result's count for the practice, while it is the
                        # manager's hook; any other hook is called for each value.
                        hook = manager.decrypt_hook
                        tally = getattr(hook, "tally", None)
                        cell = None if tally is None else tally(tenant, label, owner)
                        tallied = None if cell is None else hook
                        fast[tenant] = (since, manager, opener, tallied, cell, *opener.parts())
                    return opened
                return _open_sealed(where, typ, v, tenant)
            if v is not None:
                # Opened by the result processor under the scope: the row must be
                # the scope's practice too (a value copied into another practice's
                # row with the database checks off is refused here).
                scope = get_scope()
                if scope is not None:
                    tenant = practice(row)
                    if tenant is not None and str(tenant) != scope:
                        raise TenantMismatch(scope, str(tenant))
            return v

        return getter, None

    return make


class _ResultToken:
    """Referenced by one result's row getter alone; freed with it."""

    __slots__ = ("__weakref__",)


def _is_encrypted(column: Any) -> bool:
    return encrypted_type(column) is not None


def _open_loaded(specs: list[Spec], state: InstanceState[Any], dict_: Any, row: Any) -> None:
    _open_state(specs, state)


def _open_sealed(where: str, typ: EncryptedText, v: Sealed, practice: Any) -> Any:
    """Open a loaded value under its row's practice ``practice``: every check."""
    scope = _tenant.get()
    if practice is None:
        if scope is None:
            raise TenantRequired(f"{where}: no practice to open it with (its practice is NULL)")
        tenant = scope
    else:
        tenant = str(practice)
        if scope is not None and scope != tenant:
            raise TenantMismatch(scope, tenant)
    return _open_under(typ, v, tenant)


def _open_under(typ: EncryptedText, v: Sealed, tenant: str) -> Any:
    """A loaded value opened under ``tenant`` by its manager (strict mode asked)."""
    manager = v._manager
    if manager is None:
        manager = typ.manager
    if manager.require_scope:
        typ.check_scope(tenant, manager)
    label = typ._resolved_label
    if label is not None and type(typ).decrypt is _TEXT_DECRYPT:
        # EncryptedText itself: one frame into the manager's hot path.
        return manager._open_text(v.data, tenant, label)
    return typ.decrypt(v.data, tenant, manager)


_seen: weakref.WeakSet[Mapper[Any]] = weakref.WeakSet()


def setup_mapper(mapper: Mapper[Any], class_: type) -> None:
    if mapper in _seen:
        return  # set up already (configured before carnet was installed, then again)
    _seen.add(mapper)
    specs: list[Spec] = []
    groups: dict[str, _Group] = {}
    # The attributes whose values open as their row is loaded (their practice is
    # a column of the row): no per-row ``load`` listener is needed for them.
    loaded_with_row: set[str] = set()
    for prop in mapper.column_attrs:
        for col in prop.columns:
            typ = encrypted_type(col)
            if typ is None:
                continue
            tkey = typ.tenant
            if tkey is not None and "." in tkey:
                group = _parent_group(mapper, class_, prop.key, typ, tkey, groups)
                group.items.append((prop.key, typ, col))  # type: ignore[arg-type]
                specs.append((prop.key, typ, group.practice_key()))
                continue
            if tkey is not None:
                tprop = mapper.attrs.get(tkey)
                if isinstance(tprop, sa.orm.RelationshipProperty):
                    raise ConfigurationError(
                        f"{class_.__name__}.{prop.key}: EncryptedText(tenant={tkey!r}) names a "
                        f"relationship; name its practice attribute, e.g. '{tkey}.practice_id'"
                    )
                if tprop is None or not isinstance(tprop, sa.orm.ColumnProperty):
                    raise ConfigurationError(
                        f"{class_.__name__}.{prop.key}: EncryptedText(tenant={tkey!r}) names "
                        f"no column attribute of {class_.__name__}"
                    )
                tcol = tprop.columns[0]
                if isinstance(tcol, sa.Column):
                    # CHAR(n), floats: the database could not compare it exactly.
                    check_practice_type(tcol)
                # The Core write guard finds the practice by column key.
                typ.resolve_tenant(column=tcol.key)
                same = groups.get(tkey)
                if same is None:
                    same = groups[tkey] = _Group(tkey, tcol)  # type: ignore[arg-type]
                same.items.append((prop.key, typ, col))  # type: ignore[arg-type]
                spec = (prop.key, typ, tkey)
                where = f"{class_.__name__}.{prop.key}"
                _sa.load_column_with(prop, tcol, _row_loader(where, typ, spec))
                loaded_with_row.add(prop.key)
            specs.append((prop.key, typ, tkey))
    if not specs:
        return
    _specs[mapper] = specs

    # The InstanceState itself is handed to a partial: no per-row lookup and
    # no extra Python frame on the load path.
    from . import _hooks

    opener = functools.partial(_open_state, specs)
    handlers: dict[str, Any] = {}
    if groups:
        group_list = list(groups.values())
        restore = functools.partial(_restore, group_list)
        handlers.update(
            before_update=functools.partial(_before_update, group_list),
            after_update=restore,
        )
        if any(
            g.parent is None and col.table is not g.tcol.table
            for g in group_list
            for _key, _typ, col in g.items
        ):
            # Only a value whose practice lives in another table of the mapper
            # (joined inheritance) is bound on the instance for an INSERT: the
            # write guard binds every other one in the statement's parameters,
            # and an INSERT then costs no per-row listener.
            handlers.update(
                before_insert=functools.partial(_before_insert, group_list),
                after_insert=restore,
            )
    # Values are opened before any other load listener runs, such as
    # SQLAlchemy's mutation tracking (MutableDict.as_mutable(EncryptedJSON())),
    # registered earlier, which would otherwise meet a Sealed value.
    # An attribute opened as its row is loaded needs the ``refresh`` listener only,
    # as a safety net (it does nothing to an opened value).
    load_events: dict[str, Any] = {"refresh": opener}
    if any(key not in loaded_with_row for key, _typ, _tkey in specs):
        load_events["load"] = opener
    _hooks.on_mapper(mapper, load_events, first=True)
    _hooks.on_mapper(mapper, handlers)


def _parent_group(
    mapper: Mapper[Any],
    class_: type,
    key: str,
    typ: EncryptedText,
    path: str,
    groups: dict[str, _Group],
) -> _Group:
    """The group for ``tenant="relationship.attribute"``: the practice lives on a parent row."""
    rel_name, attr = path.split(".", 1)
    where = f"{class_.__name__}.{key}: EncryptedText(tenant={path!r})"
    rel = mapper.relationships.get(rel_name)
    if rel is None:
        raise ConfigurationError(f"{where}: {class_.__name__} has no relationship {rel_name!r}")
    if rel.direction is not sa.orm.MANYTOONE or len(rel.local_remote_pairs or ()) != 1:
        raise ConfigurationError(
            f"{where}: {rel_name!r} must be a many-to-one relationship on one foreign key"
        )
    tprop = rel.mapper.attrs.get(attr)
    if tprop is None or not isinstance(tprop, sa.orm.ColumnProperty):
        raise ConfigurationError(
            f"{where}: {rel.mapper.class_.__name__} has no column attribute {attr!r}"
        )
    local, remote = (rel.local_remote_pairs or [])[0]
    parent_tenant = tprop.columns[0]
    if isinstance(parent_tenant, sa.Column):
        check_practice_type(parent_tenant)
    fk_prop = mapper.get_property_by_column(local)
    hidden = f"_carnet_practice_{rel_name}"
    expr = (
        sa.select(parent_tenant)
        .where(remote == local)
        .correlate_except(remote.table)
        .scalar_subquery()
    )
    if hidden not in mapper.attrs:
        # Loaded with every row, so a value opens under its parent's practice
        # without a query of its own; never written.
        mapper.add_property(hidden, sa.orm.column_property(expr))
    where_practice = ParentPractice(fk=local, pk=remote, practice=parent_tenant)
    typ.resolve_tenant(path=where_practice)
    _register_dependent(where_practice, typ)
    group = groups.get(fk_prop.key)
    if group is None:
        group = groups[fk_prop.key] = _Group(
            fk_prop.key,
            local,  # type: ignore[arg-type]
            where_practice,
            hidden,
            expr,
        )
    return group


def _parent_practice(connection: sa.Connection, g: _Group, fk: Any) -> Any:
    assert g.parent is not None  # noqa: S101 - only for parent groups
    if fk is None:
        return None
    return connection.execute(
        sa.select(g.parent.practice).where(g.parent.pk == fk)
    ).scalar_one_or_none()


def _fetch(
    mapper: Mapper[Any],
    connection: sa.Connection,
    state: InstanceState[Any],
    columns: list[Any],
    table: Any = None,
) -> dict[Any, Any]:
    """The row's stored values of ``columns``, encrypted ones as Sealed (never opened here).

    ``columns`` are columns of the mapper's tables, or expressions read from
    ``table`` (the practice of a parent row).
    """
    out: dict[Any, Any] = {}
    by_table: dict[Any, list[Any]] = {}
    for c in columns:
        by_table.setdefault(c.table if isinstance(c, sa.Column) else table, []).append(c)
    token = _tenant.set(None)  # no scope: values come back Sealed, opened by the caller
    try:
        for tbl, cols in by_table.items():
            table = tbl
            # The identity key, not the attributes: reading an expired attribute
            # here would load (and open) the whole row in the middle of the flush.
            pks = _sa.pks_by_table(mapper, table)
            ident = list(state.key[1]) if state.key is not None else []
            if len(ident) != len(pks):
                raise ConfigurationError(
                    f"{mapper.class_.__name__}: cannot find the row to re-seal in {table.name}"
                )
            row = connection.execute(
                sa.select(*cols)
                .select_from(table)
                .where(*(pk == v for pk, v in zip(pks, ident, strict=True)))
            ).first()
            if row is None:
                raise ConfigurationError(
                    f"{mapper.class_.__name__}: the row to update is gone from {table.name}"
                )
            out.update(zip(cols, row, strict=True))
    finally:
        _tenant.reset(token)
    return out


def _plain(typ: EncryptedText, v: Any, tenant: str | None) -> Any:
    """A stored value as plaintext, opened under the practice it is stored for."""
    if isinstance(v, Sealed):
        if tenant is None:
            raise TenantRequired(
                f"{typ.field_label}: a stored value has no practice to open it with"
            )
        # Strict mode holds for carnet's own reads too: checked before opening.
        typ.check_scope(tenant, v.manager)
        return typ.decrypt(v.data, tenant, v.manager)
    return v


def _bind(v: Any, tenant: Any) -> Any:
    if not isinstance(v, str):
        return v  # None, or a wrong type the write guard refuses with a clear error
    if tenant is None:
        return v  # the write guard raises TenantRequired
    bv = BoundText(v)
    bv.carnet_tenant = tenant if type(tenant) is str else str(tenant)
    return bv


def _bind_value(typ: EncryptedText, v: Any, tenant: Any) -> Any:
    """``v`` bound to ``tenant``, as the write guard seals it.

    A value that is not text (a date, a document, a JSON value, possibly
    changed in place) is bound as its type's text form and remembered, for
    :func:`_restore` to put the object itself back after the flush. A str
    given to a type whose values are not text is left for the guard to refuse.
    """
    if isinstance(v, str):
        return _bind(v, tenant) if typ.text_values else v
    if v is None or tenant is None or isinstance(v, Sealed | ClauseElement):
        return v  # the write guard's own checks name these
    bound = _bind(typ.plaintext(v), tenant)
    if type(bound) is BoundText:
        bound.carnet_original = v
    return bound


def _stored_practice(
    g: _Group, mapper: Mapper[Any], connection: sa.Connection, state: InstanceState[Any]
) -> Any:
    src = g.practice_source()
    return _fetch(mapper, connection, state, [src], g.tcol.table)[src]


def _before_update(
    groups: list[_Group], mapper: Mapper[Any], connection: sa.Connection, state: InstanceState[Any]
) -> None:
    d = state.dict
    cs = state.committed_state
    for g in groups:
        tkey = g.tkey
        moved = False
        if tkey in cs:
            before = cs[tkey]
            if before is NO_VALUE:
                # Set without being loaded first: the database knows the old value.
                before = _fetch(mapper, connection, state, [g.tcol])[g.tcol]
                if before == d.get(tkey):
                    cs[tkey] = before  # not a move: the UPDATE leaves it out
                else:
                    moved = True
            else:
                moved = not (d.get(tkey) == before)
        if moved:
            _reseal(g, mapper, connection, state)
            continue
        tenant: Any = d.get(g.practice_key(), NO_VALUE)
        for key, typ, _col in g.items:
            if key in cs and d.get(key) is not None:
                if tenant is NO_VALUE:
                    tenant = _stored_practice(g, mapper, connection, state)
                d[key] = _bind_value(typ, d[key], tenant)


def _reseal(
    g: _Group,
    mapper: Mapper[Any],
    connection: sa.Connection,
    state: InstanceState[Any],
) -> None:
    """The row moves to another practice: write every encrypted value again, sealed for it."""
    d = state.dict
    cs = state.committed_state
    if g.parent is not None:
        new = _parent_practice(connection, g, d.get(g.tkey))
    else:
        new = d.get(g.tkey)
        if new is not None:
            new = practice_text(new, g.tcol)
    # Values not loaded (deferred, load_only, expired) or loaded without a
    # practice (Sealed) are read from the database and opened under the
    # practice they are stored for: the database's, not the object's.
    missing = [
        col
        for key, _typ, col in g.items
        if key not in cs and (key not in d or isinstance(d[key], Sealed))
    ]
    src = g.practice_source()
    stored = _fetch(mapper, connection, state, [src, *missing], g.tcol.table)
    old = stored[src]
    old_tenant = None if old is None else str(old)
    for key, typ, col in g.items:
        if key in cs:
            v = d.get(key)  # written by the application: its new plaintext
        elif col in stored:
            v = _plain(typ, stored[col], old_tenant)
        else:
            v = d.get(key)
        if isinstance(v, Sealed):
            v = _plain(typ, v, old_tenant)
        v = _bind_value(typ, v, new)
        if type(v) is BoundText:
            v.carnet_moved_from = old_tenant
        d[key] = v
        # Written even when equal to the loaded text: it must be sealed for the new practice.
        cs[key] = NO_VALUE
    if g.parent is None:
        _empty_inherited(g, mapper, connection, state)


def _empty_inherited(
    g: _Group, mapper: Mapper[Any], connection: sa.Connection, state: InstanceState[Any]
) -> None:
    """Joined inheritance: empty the row's values held in a table other than its practice's.

    The flush updates the base table's practice first, and the database
    refuses to move a practice while values sealed for it remain in the
    subclass's table (``carnet_m_*``). They are emptied here, and the same
    flush writes them again, sealed for the new practice, in one transaction.
    """
    by_table: dict[Any, list[Any]] = {}
    for _key, _typ, col in g.items:
        if col.table is not g.tcol.table:
            by_table.setdefault(col.table, []).append(col)
    for table, cols in by_table.items():
        pks = _sa.pks_by_table(mapper, table)
        ident = list(state.key[1]) if state.key is not None else []
        if len(ident) != len(pks):
            raise ConfigurationError(
                f"{mapper.class_.__name__}: cannot find the row to re-seal in {table.name}"
            )
        connection.execute(
            sa.update(table)
            .where(*[pk == v for pk, v in zip(pks, ident, strict=True)])
            .values({c.key: None for c in cols})
        )


def _before_insert(
    groups: list[_Group], mapper: Mapper[Any], connection: sa.Connection, state: InstanceState[Any]
) -> None:
    # A practice column in the same table reaches the write guard in the
    # INSERT itself; bind here only values whose practice lives in another
    # table (joined inheritance), which the guard cannot see.
    d = state.dict
    for g in groups:
        if g.parent is not None:
            continue  # the guard finds the parent's practice from the foreign key
        for key, typ, col in g.items:
            if col.table is not g.tcol.table and d.get(key) is not None:
                tenant = d.get(g.tkey)
                d[key] = _bind_value(
                    typ, d[key], None if tenant is None else practice_text(tenant, g.tcol)
                )


def _restore(
    groups: list[_Group], mapper: Mapper[Any], connection: sa.Connection, state: InstanceState[Any]
) -> None:
    # Put plain str (or the value itself: a date, a document, a tracked
    # MutableDict) back on the instance: BoundText is a flush-time detail.
    d = state.dict
    for g in groups:
        for key, _typ, _col in g.items:
            v = d.get(key)
            if type(v) is BoundText:
                original = v.carnet_original
                d[key] = original if original is not None else str.__str__(v)


def _written_keys(state: ORMExecuteState) -> set[str]:
    """The names an ORM UPDATE writes, as given (column keys or attribute names)."""
    keys: set[Any] = _sa.written_names(state.statement)
    params = state.parameters
    if isinstance(params, list):
        for row in params:
            keys.update(row)
    elif params:
        keys.update(params)
    return {k for k in keys if isinstance(k, str)}


def expire_after_update(state: ORMExecuteState) -> Any:
    """Never let an ORM UPDATE copy its new plaintext onto objects in the session.

    ``synchronize_session`` ("evaluate", "auto", "fetch", and the bulk UPDATE
    by primary key) sets the statement's values on the objects it believes
    matched. The evaluator judges the WHERE clause alone, in Python, and the
    fetch strategy on a database without UPDATE ... RETURNING selects the rows
    before the write guard pins the UPDATE to the scope's practice: both may
    match rows the database never changed, another practice's among them.
    The encrypted attributes the statement writes are expired instead, on
    every object of the mapper in the session; they load again from the
    database, opened under each row's own practice. Simpler than choosing a
    strategy per backend, and correct whatever the statement matched.
    """
    if not state.is_update:
        return None
    mapper = state.bind_mapper
    if mapper is None or state.execution_options.get("synchronize_session") is False:
        return None
    targets = [(m, specs) for m, specs in list(_specs.items()) if m.isa(mapper) or mapper.isa(m)]
    if not targets:
        return None
    written = _written_keys(state)
    expire: dict[Mapper[Any], list[str]] = {}
    for m, specs in targets:
        cols = {key: m.get_property(key).columns[0] for key, _typ, _t in specs}
        names = [
            key
            for key, col in cols.items()
            if key in written or getattr(col, "key", None) in written
        ]
        if names:
            expire[m] = names
    if not expire:
        return None
    result = state.invoke_statement()
    session = state.session
    for obj_state in list(session.identity_map.all_states()):
        for m, names in expire.items():
            if obj_state.mapper.isa(m):
                # Pending changes of the application stay (the ORM has already
                # expired those it would have overwritten).
                d, cs = obj_state.dict, obj_state.committed_state
                keys = [n for n in names if n in d and n not in cs]
                obj = obj_state.obj()
                if keys and obj is not None:
                    session.expire(obj, keys)
                break
    return result


def _expire(state: InstanceState[Any], keys: list[str]) -> None:
    """Expire attributes of an object being loaded, through its session."""
    session = state.session
    obj = state.obj()
    if session is None or obj is None:
        raise TenantRequired(
            f"{state.class_.__name__}: loaded without its practice and outside a session; "
            "load the practice attribute with it"
        )
    session.expire(obj, keys)
