"""ORM integration: the row's own tenant column chooses the key.

Installed once, when :mod:`carnet` is imported:

- ``mapper_configured``: find each mapper's EncryptedText columns and check
  that their ``tenant=`` attribute exists (a typo fails at configuration).
- ``load`` / ``refresh``: open the :class:`~carnet.types.Sealed` values of a
  loaded row with that row's tenant.
- ``before_flush``: bind every plaintext about to be written to its row's
  tenant (:class:`~carnet.types.BoundText`); a row with no tenant raises
  ``TenantRequired`` before any SQL is sent. A changed tenant re-seals the
  row's encrypted values under the new tenant.
- ``after_flush_postexec``: put plain ``str`` back on the instances.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, attributes, configure_mappers
from sqlalchemy.orm.state import InstanceState

from .context import _tenant
from .errors import ConfigurationError, TenantMismatch, TenantRequired
from .manager import KeyManager
from .types import BoundText, EncryptedText, Sealed

Spec = tuple[str, EncryptedText, "str | None"]
_specs: weakref.WeakKeyDictionary[Mapper[Any], list[Spec]] = weakref.WeakKeyDictionary()
_BOUND = "_carnet_bound"
_NEW_KEYS = "_carnet_new_keys"


def _open_state(specs: list[Spec], state: InstanceState[Any], *_context: Any) -> None:
    # Called for every loaded row: kept lean (no work unless a value is Sealed).
    d = state.dict
    for key, typ, tkey in specs:
        v = d.get(key)
        if v.__class__ is not Sealed:
            continue
        scope = _tenant.get()
        tenant = d.get(tkey) if tkey is not None else None
        if tenant is None:
            if scope is None:
                continue  # tenant column not loaded: the value stays Sealed, never garbage
            tenant = scope
        else:
            tenant = str(tenant)
            if scope is not None and scope != tenant:
                raise TenantMismatch(scope, tenant)
        d[key] = typ.decrypt(v.data, tenant)


def _setup(mapper: Mapper[Any], class_: type) -> None:
    specs: list[Spec] = []
    for prop in mapper.column_attrs:
        for col in prop.columns:
            typ = getattr(col, "type", None)
            if isinstance(typ, EncryptedText):
                tkey = typ.tenant
                if tkey is not None and tkey not in mapper.attrs:
                    raise ConfigurationError(
                        f"{class_.__name__}.{prop.key}: EncryptedText(tenant={tkey!r}) names no "
                        f"attribute of {class_.__name__}"
                    )
                specs.append((prop.key, typ, tkey))
    if not specs:
        return
    _specs[mapper] = specs

    # raw=True hands the InstanceState itself to a partial: no per-row lookup
    # and no extra Python frame on the load path.
    opener = functools.partial(_open_state, specs)
    event.listen(mapper, "load", opener, raw=True)
    event.listen(mapper, "refresh", opener, raw=True)


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    bound: list[tuple[InstanceState[Any], str, str]] = []
    need_keys: dict[tuple[int, str], tuple[KeyManager, str, Mapper[Any]]] = {}
    scope = _tenant.get()
    for obj in itertools.chain(session.new, session.dirty):
        state = attributes.instance_state(obj)
        specs = _specs.get(state.mapper)
        if not specs:
            continue
        d = state.dict
        pending = state.key is None
        for key, _typ, tkey in specs:
            if key not in d:
                continue
            tenant_changed = tkey is not None and tkey in state.committed_state
            if not (pending or key in state.committed_state or tenant_changed):
                continue
            v = d[key]
            if v is None:
                continue
            if isinstance(v, Sealed):
                if tenant_changed:
                    raise ConfigurationError(
                        f"{type(obj).__name__}.{key}: the tenant changed but the value was never "
                        "opened; load it with its tenant first"
                    )
                continue
            if tkey is None:
                tenant = None
            elif tkey in d:
                tenant = d[tkey]
            else:
                tenant = getattr(obj, tkey)  # expired after commit: load it, don't guess
            if tenant is None:
                if tkey is not None or scope is None:
                    raise TenantRequired(
                        f"{type(obj).__name__}.{key}: the row has no tenant"
                        + (
                            f" (set {type(obj).__name__}.{tkey})"
                            if tkey
                            else " (use carnet.tenant_scope)"
                        )
                        + "; nothing was written"
                    )
                tenant = scope
            tenant = str(tenant)
            if scope is not None and scope != tenant:
                raise TenantMismatch(scope, tenant)
            if tenant_changed and key not in state.committed_state:
                attributes.flag_modified(obj, key)
            bv = BoundText(v)
            bv.carnet_tenant = tenant
            d[key] = bv
            bound.append((state, key, str(v)))
            manager = _typ.manager
            if not manager.has_cached_active_key(tenant):
                need_keys[(id(manager), tenant)] = (manager, tenant, state.mapper)
    if bound:
        session.info[_BOUND] = bound
    for manager, tenant, mapper in need_keys.values():
        _ensure_key(session, manager, tenant, mapper)


def _ensure_key(session: Session, manager: KeyManager, tenant: str, mapper: Mapper[Any]) -> None:
    # Create a practice's first key before the flush sends any SQL. On SQLite,
    # when the key table lives in the session's own database, create it inside
    # the session's transaction: a second connection would wait on the write
    # lock this transaction may already hold. Elsewhere a short transaction of
    # its own commits the key whatever becomes of the application's.
    bind = session.get_bind(mapper)
    if manager.shares_sqlite_database(bind):
        conn = session.connection(bind_arguments={"mapper": mapper})
        created = manager.ensure_key_in(conn, tenant)
        if created is not None:
            session.info.setdefault(_NEW_KEYS, []).append((manager, tenant, created))
    else:
        manager.ensure_key(tenant)


def _bind_row(specs: list[Spec], row: Any, scope: str | None) -> dict[str, Any] | None:
    """For one parameter dict of an ORM bulk statement: its values bound to its tenant."""
    out: dict[str, Any] | None = None
    for key, _typ, tkey in specs:
        v = row.get(key)
        if tkey is None or not isinstance(v, str) or type(v) is BoundText:
            continue
        tenant = row.get(tkey)
        if tenant is None:
            continue  # bind processing then needs a scope, or raises TenantRequired
        tenant = str(tenant)
        if scope is not None and scope != tenant:
            raise TenantMismatch(scope, tenant)
        bv = BoundText(v)
        bv.carnet_tenant = tenant
        if out is None:
            out = {}
        out[key] = bv
    return out


def _do_orm_execute(state: ORMExecuteState) -> Any:
    # ORM bulk INSERT / UPDATE (session.execute(insert(Note), [{...}, ...])) skip
    # the flush: bind each parameter dict's note to that dict's own tenant, as a
    # flush does for each object.
    if not (state.is_insert or state.is_update) or not state.parameters:
        return None
    mapper = state.bind_mapper
    if mapper is None:
        return None
    if not mapper.configured:
        configure_mappers()  # a first statement may come before any query configured them
    specs = _specs.get(mapper)
    if not specs:
        return None
    scope = _tenant.get()
    if isinstance(state.parameters, list):
        rows = [_bind_row(specs, row, scope) or {} for row in state.parameters]
        if not any(rows):
            return None
        return state.invoke_statement(params=rows)
    one = _bind_row(specs, state.parameters, scope)
    return state.invoke_statement(params=one) if one else None


def _after_commit(session: Session) -> None:
    session.info.pop(_NEW_KEYS, None)


def _after_rollback(session: Session) -> None:
    # Keys created inside the rolled-back transaction no longer exist.
    for manager, tenant, key_id in session.info.pop(_NEW_KEYS, ()):
        manager.forget_key(tenant, key_id)


def _after_flush_postexec(session: Session, flush_context: Any) -> None:
    bound = session.info.pop(_BOUND, None)
    if not bound:
        return
    for state, key, plain in bound:
        v = state.dict.get(key)
        if type(v) is BoundText:
            state.dict[key] = plain


_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    event.listen(Mapper, "mapper_configured", _setup)
    event.listen(Session, "before_flush", _before_flush)
    event.listen(Session, "after_flush_postexec", _after_flush_postexec)
    event.listen(Session, "after_commit", _after_commit)
    event.listen(Session, "do_orm_execute", _do_orm_execute)
    event.listen(Session, "after_rollback", _after_rollback)
    _installed = True
