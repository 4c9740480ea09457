"""Which rows were disclosed: the ORM's load events and blind-index searches, for the trail.

``KeyManager.decrypt`` sees a value, its practice and its label, never its
row. The ORM does: a listener on every mapper's ``load`` and ``refresh``
events records, for a row whose encrypted attributes were loaded, its
primary key (or the attribute a column names with
``info={"carnet_audit_rows": "patient_id"}``) under the principal, the
practice and the field, when the trail has ``rows=True`` or the column asks
for it (``info={"carnet_audit_rows": True}``). The values opened for that
row are counted by the decrypt hook as any others; this adds the keys.

Core statements have no row identity at decrypt time: see docs/audit.md
("Rows") for what the trail records there.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

from sqlalchemy.orm import Mapper

from . import _hooks
from .context import current_tenant, manager_for
from .trail import current_principal
from .types import encrypted_type

ROWS_INFO = "carnet_audit_rows"

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
