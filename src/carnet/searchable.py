"""Searchable encrypted identifiers: typed encrypted columns and blind indexes.

- :class:`EncryptedString` and :class:`EncryptedDate`: :class:`EncryptedText`
  with a bounded length or a ``datetime.date`` plaintext; same format, keys,
  and tenant binding (only the plaintext encoding differs).
- :func:`BlindIndex`: an indexed integer column beside the ciphertext holding
  a truncated keyed hash of a normalised value (see :mod:`carnet.indexkeys`
  and :mod:`carnet.transforms`), kept up to date on every write path:

  * ORM flush: a ``before_flush`` listener computes it from the plaintext
    attributes and the row's tenant (a compound index whose other field is
    not loaded loads it; a field that cannot be opened refuses the flush);
  * ORM bulk INSERT / UPDATE (``session.execute(insert(Model), [...])``): a
    ``do_orm_execute`` listener computes it for each parameter dict;
  * Core INSERT / UPDATE: the third step of carnet's statement pipeline
    (:func:`index_columns`, run by :mod:`carnet._hooks`) computes it for each
    parameter dict from its source values and its tenant (the dict's tenant
    column, else :func:`carnet.tenant_scope`). Values written inline with
    ``.values(...)`` must be passed as execute parameters instead: such a
    statement is refused rather than written without its index.

- :func:`search`: equality lookup through the index, exact (false positives
  of the truncated hash are dropped after decryption).
- :func:`reindex`: recompute a practice's index values after
  :meth:`KeyManager.rotate_index_root`, resumably, through the batch engine.

docs/searchable.md explains the threat model and how to size ``bits``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.orm import (
    InstrumentedAttribute,
    Mapper,
    ORMExecuteState,
    Session,
    attributes,
    configure_mappers,
)
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql.base import SchemaEventTarget
from sqlalchemy.sql.dml import Insert, Update
from sqlalchemy.types import TypeDecorator

from . import _sa, _txkeys, context, envelope, indexkeys
from .batch import BatchReport, BatchRow, raw_type, run_batches
from .errors import (
    ConfigurationError,
    InvalidCiphertext,
    InvalidPlaintext,
    TenantMismatch,
    TenantRequired,
)
from .manager import IndexRoot, KeyManager
from .transforms import Transform
from .types import BoundText, EncryptedText, Sealed, Storage, encrypted_type

__all__ = [
    "BlindIndex",
    "BlindIndexAttribute",
    "BlindIndexColumn",
    "BlindIndexType",
    "EncryptedDate",
    "EncryptedString",
    "reindex",
    "search",
]


# -- typed encrypted columns ----------------------------------------------------------


def ciphertext_width(max_bytes: int, storage: Storage = "binary") -> int:
    """Stored width of a value whose UTF-8 plaintext is at most ``max_bytes`` bytes.

    A v2 value carries its practice id in its header, so the width is sized
    for the longest one: 255 characters (the key table's practice column), at
    most 1020 UTF-8 bytes (``envelope.PRACTICE_BOUND_BYTES``).
    """
    return envelope.width(max_bytes, envelope.PRACTICE_BOUND_BYTES, text=storage == "text")


class EncryptedString(EncryptedText):
    """:class:`EncryptedText` for a plaintext of at most ``length`` characters.

    The column is sized for the worst case, 4 UTF-8 bytes per character, and
    the longest practice id (255 characters, 1020 UTF-8 bytes, carried in the
    value's header): ``1071 + 4 * length`` bytes (``VARBINARY`` on MariaDB,
    ``BYTEA`` on PostgreSQL, ``BLOB`` on SQLite), or with ``storage="text"`` a
    ``VARCHAR(2092 + 4 * ceil((28 + 4 * length) / 3))`` of the text form (see
    :func:`ciphertext_width`). A longer value raises
    :class:`~carnet.errors.InvalidPlaintext`.
    """

    cache_ok = True

    def __init__(
        self,
        length: int,
        tenant: str | None = None,
        *,
        label: str | None = None,
        storage: Storage = "binary",
        mixed_read: bool = False,
        manager: KeyManager | None = None,
    ) -> None:
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ConfigurationError("EncryptedString needs a positive length in characters")
        super().__init__(
            tenant, label=label, storage=storage, mixed_read=mixed_read, manager=manager
        )
        self.length = length

    @property
    def width(self) -> int:
        """Bytes (binary storage) or characters (text storage) of the column."""
        return ciphertext_width(4 * self.length, self.storage)

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if self.storage == "text":
            return dialect.type_descriptor(sa.String(self.width))
        if dialect.name in ("mysql", "mariadb"):
            # Inline VARBINARY instead of LONGBLOB: short values, kept in the row.
            return dialect.type_descriptor(mysql.VARBINARY(self.width))
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        return dialect.type_descriptor(sa.LargeBinary(self.width))

    def plaintext(self, value: Any) -> Any:
        """The text sealed for ``value``: checked against the length (no echo of the value)."""
        if isinstance(value, str) and len(value) > self.length:
            raise InvalidPlaintext(
                f"{self.field_label}: value longer than {self.length} characters"
            )
        return value

    # Extra arguments (a per-engine manager) pass through untouched: only
    # the plaintext encoding is this type's own.
    def encrypt(self, value: str, tenant: str, *args: Any, **kwargs: Any) -> bytes:
        return super().encrypt(self.plaintext(value), tenant, *args, **kwargs)

    def copy(self, **kw: Any) -> EncryptedString:
        new = EncryptedString(
            self.length,
            self.tenant,
            label=self.label,
            storage=self.storage,
            mixed_read=self.mixed_read,
            manager=self._manager,
        )
        self.copy_attachment(new)
        return new

    def __repr__(self) -> str:
        return (
            f"EncryptedString({self.length}, tenant={self.tenant!r}, "
            f"label={self.field_label!r}, storage={self.storage!r})"
        )


_ISO_LEN = 10  # YYYY-MM-DD


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        raise InvalidPlaintext("EncryptedDate stores datetime.date values, not datetime")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str) and len(value) == _ISO_LEN:
        # The ORM flush hands the value over as text (BoundText of the date).
        try:
            return dt.date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    raise InvalidPlaintext(f"EncryptedDate stores datetime.date values, not {type(value).__name__}")


class EncryptedDate(EncryptedText):
    """:class:`EncryptedText` whose plaintext is a ``datetime.date``.

    The plaintext sealed is the ISO 8601 calendar date ``YYYY-MM-DD`` (10
    ASCII bytes, docs/format.md), so every value of one practice has the same
    length, ``61 + p`` bytes (binary storage) or ``104 + 2p`` characters (text
    storage) for a practice id of ``p`` UTF-8 bytes: the length leaks nothing
    but the practice, which the row holds anyway.
    """

    cache_ok = True

    @property
    def python_type(self) -> type:
        return dt.date

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        width = ciphertext_width(_ISO_LEN, self.storage)
        if self.storage == "text":
            return dialect.type_descriptor(sa.String(width))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(width))
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        return dialect.type_descriptor(sa.LargeBinary(width))

    def plaintext(self, value: Any) -> Any:
        """The text sealed for ``value``: a date's ISO form (None stays None)."""
        return None if value is None else _iso(value)

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = value.isoformat()  # Core: a date in, its ISO text sealed
        return super().process_bind_param(value, dialect)

    def encrypt(self, value: Any, tenant: str, *args: Any, **kwargs: Any) -> bytes:
        return super().encrypt(_iso(value), tenant, *args, **kwargs)

    def decrypt(  # type: ignore[override]
        self, blob: bytes, tenant: str, *args: Any, **kwargs: Any
    ) -> dt.date:
        text = super().decrypt(blob, tenant, *args, **kwargs)
        if len(text) == _ISO_LEN:
            try:
                return dt.date.fromisoformat(text)
            except ValueError:
                pass
        # Authentic, yet not a date: written by another type under this label.
        # Raised outside the except block, whose error quotes the text.
        raise InvalidCiphertext("value is not an ISO date", label=self.field_label)

    def copy(self, **kw: Any) -> EncryptedDate:
        new = EncryptedDate(
            self.tenant,
            label=self.label,
            storage=self.storage,
            mixed_read=self.mixed_read,
            manager=self._manager,
        )
        self.copy_attachment(new)
        return new

    def __repr__(self) -> str:
        return (
            f"EncryptedDate(tenant={self.tenant!r}, label={self.field_label!r}, "
            f"storage={self.storage!r})"
        )


# -- the blind index column -----------------------------------------------------------


@dataclass
class _Spec:
    sources: tuple[str, ...]
    transform: Transform
    bits: int
    name: str
    tenant: str | None
    lenient: bool
    label: str | None
    manager: KeyManager | None
    column: str | None = None  # learnt when attached to a table
    auto_label: str | None = None

    @property
    def field_label(self) -> str:
        label = self.label if self.label is not None else self.auto_label
        if label is None:
            raise ConfigurationError(
                "BlindIndex is not attached to a table column: give it label='table.column'"
            )
        return label


class BlindIndexType(TypeDecorator[int], SchemaEventTarget):
    """Storage of a blind index: an unsigned integer below ``2**bits`` in a BIGINT column.

    Built by :func:`BlindIndex`; the spec lives on a private attribute, out of
    SQLAlchemy's statement cache key (it holds a transform and maybe a manager).
    """

    impl = sa.BigInteger
    cache_ok = True

    def __init__(self, spec: _Spec | None = None) -> None:
        super().__init__()
        if spec is None:
            raise ConfigurationError("declare blind indexes with carnet.BlindIndex(...)")
        self._spec = spec

    @property
    def index_spec(self) -> _Spec:
        """The index's declaration (transform, sources, bits, practice column)."""
        return self._spec

    @property
    def bits(self) -> int:
        """How many bits of the keyed hash this index keeps (not ``spec``: that name would
        enter SQLAlchemy's cache key)."""
        return self._spec.bits

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        # SQLAlchemy's SchemaEventTarget protocol: told of the column, then of its table.
        _sa.on_table_attach(parent, self._set_table)

    def _set_table(self, column: sa.Column[Any], table: sa.Table) -> None:
        from . import _hooks

        _hooks.install()  # before any mapper of this table is configured
        spec = self._spec
        if spec.column is not None and spec.column != column.key:
            raise ConfigurationError(
                f"one BlindIndex is shared by {spec.auto_label} and {table.name}.{column.name}: "
                "declare one per column"
            )
        spec.column = column.key
        spec.auto_label = f"{table.name}.{column.name}"
        # Lookups filter on the practice and the index value together: one
        # composite index when the tenant column is known here (declared
        # before this one), else an index on the value alone.
        tenant = spec.tenant
        if tenant is None:
            for src in spec.sources:
                typ = table.c[src].type if src in table.c else None
                if (enc := encrypted_type(typ)) is not None and enc.tenant is not None:
                    tenant = enc.tenant
                    break
        cols: list[Any] = [column]
        if tenant is not None and tenant in table.c:
            cols.insert(0, table.c[tenant])
        sa.Index(f"ix_{table.name}_{column.name}", *cols)

    def copy(self, **kw: Any) -> BlindIndexType:
        # Its own spec: a copy attached to another table (to_metadata) learns
        # its own label without changing this one's.
        return BlindIndexType(dataclasses.replace(self._spec))

    def __repr__(self) -> str:
        s = self._spec
        return f"BlindIndexType({s.name!r}, sources={s.sources!r}, bits={s.bits})"


_M = TypeVar("_M")

if TYPE_CHECKING:

    class BlindIndexAttribute(InstrumentedAttribute[int | None], Generic[_M]):
        """``Model.index_attr``: the ORM's attribute, remembering its model for :func:`search`."""

    class BlindIndexColumn(sa.Column[int]):
        """What :func:`BlindIndex` returns, as type checkers see it once the model is mapped.

        The ORM replaces the column on a mapped class with an attribute: on the
        class, a :class:`BlindIndexAttribute` of the model; on a row, the
        stored index value (``int | None``). At run time it is the plain
        ``sa.Column`` (a Core ``Table`` takes it as one).
        """

        # SQLAlchemy 2.1 types Column.__get__ for its TypedColumns; 2.0 has none.
        @overload  # type: ignore[override, unused-ignore]
        def __get__(self, instance: None, owner: type[_M]) -> BlindIndexAttribute[_M]: ...
        @overload
        def __get__(self, instance: object, owner: Any) -> int | None: ...
        def __get__(self, instance: object | None, owner: Any) -> Any: ...

else:
    # At run time the ORM's own classes: isinstance() checks hold.
    BlindIndexAttribute = InstrumentedAttribute
    BlindIndexColumn = sa.Column


def BlindIndex(  # noqa: N802 - reads as a column type in a model
    *sources: str,
    transform: Transform,
    bits: int,
    name: str | None = None,
    tenant: str | None = None,
    lenient: bool = False,
    label: str | None = None,
    manager: KeyManager | None = None,
    column_name: str | None = None,
) -> BlindIndexColumn:
    """A blind-index column over the plaintext of ``sources`` (attribute / column names).

    ``transform`` normalises the value(s) (:mod:`carnet.transforms`; a
    compound transform takes one value per source). ``bits``: how many bits
    of the keyed hash to keep (1 to 63); see :func:`carnet.plan_bits` and
    docs/searchable.md. ``tenant``: the attribute holding the row's practice
    (default: that of the first source's ``EncryptedText``). ``lenient``: a
    value the transform refuses gets no index value (NULL) instead of failing
    the write. ``name`` (default: the transform's name) and ``label`` (default
    ``table.column`` of this index column) are bound into the index key:
    set ``label`` explicitly to survive a rename. ``column_name`` names the
    column in a Core ``Table`` (declarative models name it by attribute).
    """
    if not sources or not all(isinstance(s, str) and s for s in sources):
        raise ConfigurationError("BlindIndex needs the name(s) of the indexed attribute(s)")
    if not isinstance(transform, Transform):
        raise ConfigurationError("transform must be one of carnet.transforms (a Transform)")
    if transform.arity != len(sources):
        raise ConfigurationError(
            f"transform {transform.name} takes {transform.arity} value(s); "
            f"{len(sources)} source(s) given"
        )
    spec = _Spec(
        sources=tuple(sources),
        transform=transform,
        bits=indexkeys.check_bits(bits),
        name=name if name is not None else transform.name,
        tenant=tenant,
        lenient=lenient,
        label=label,
        manager=manager,
    )
    typ = BlindIndexType(spec)
    if column_name is None:
        return cast("BlindIndexColumn", sa.Column(typ, nullable=True))
    return cast("BlindIndexColumn", sa.Column(column_name, typ, nullable=True))


# -- computing index values -----------------------------------------------------------


def _manager_for(spec: _Spec, source_types: Sequence[Any]) -> KeyManager:
    if spec.manager is not None:
        return spec.manager
    for typ in source_types:
        enc = encrypted_type(typ)
        if enc is not None and enc.own_manager is not None:
            return enc.own_manager
    return context.get_manager()


def _normalise(spec: _Spec, values: Sequence[Any]) -> str | None:
    """The transform's output, or None for no index value (a NULL source, a lenient refusal)."""
    if any(v is None for v in values):
        return None
    try:
        return spec.transform(*values)
    except InvalidPlaintext:
        if spec.lenient:
            return None
    raise InvalidPlaintext(f"{spec.field_label}: value refused by transform {spec.transform.name}")


def _value(spec: _Spec, root: IndexRoot, normalised: str, tenant: str) -> int:
    return indexkeys.index_value(
        root, normalised, label=spec.field_label, index=spec.name, tenant=tenant, bits=spec.bits
    )


@dataclass
class _Resolved:
    """A blind index of a mapper: attribute names resolved at mapper configuration."""

    key: str  # the index attribute
    spec: _Spec
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
    scope = context.current_tenant()
    dated: list[tuple[InstanceState[Any], str]] = []
    # One root lookup per practice and flush, not per row.
    roots_seen: dict[tuple[int, str], list[IndexRoot]] = {}
    for obj in itertools.chain(session.new, session.dirty):
        state = attributes.instance_state(obj)
        mapper = state.mapper
        for key in _dates.get(mapper, ()):
            dated.append((state, key))
        specs = _orm.get(mapper)
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
    spec: _Spec
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
    __import__("carnet.audit_rows").audit_rows.searched(
        session, mapper, r.key, tenant, len(rows), out
    )
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


# -- re-indexing after an index root rotation -----------------------------------------


def _job_name(label: str, tenant: str) -> str:
    name = f"bidx:{label}:{tenant}"
    if len(name) <= 255:
        return name
    # carnet_jobs.job holds 255 characters: a long practice id is hashed (ids are metadata).
    return f"bidx:{label[:100]}:{hashlib.sha256(name.encode()).hexdigest()}"


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


def _open_stored(typ: Any, raw: Any, tenant: str, manager: KeyManager) -> Any:
    """A source column's plaintext from its stored value (authenticated; no value in errors)."""
    enc = encrypted_type(typ)
    if raw is None or enc is None:
        return raw  # NULL, or a source kept in clear
    typ = enc
    if isinstance(raw, str):
        if not envelope.looks_like_text_ciphertext(raw):
            if typ.mixed_read:
                return raw  # legacy plaintext of a column still being migrated in place
            raise InvalidCiphertext("stored value is not carnet ciphertext", label=typ.field_label)
        blob = envelope.from_text(raw)
    else:
        blob = bytes(raw)
    if manager.is_decoy(envelope.key_id_of(blob)):
        return _DECOY  # recognised by its key, never opened (carnet.decoys)
    return typ.decrypt(blob, tenant, manager)


# What _open_stored returns for a decoy note: the row is skipped.
_DECOY = object()


def reindex(
    engine: sa.Engine,
    attr: Any,
    *,
    tenant: str,
    batch_size: int = 500,
    worker: tuple[int, int] = (0, 1),
    restart: bool = False,
    manager: KeyManager | None = None,
) -> BatchReport:
    """Recompute one practice's values of one blind index under its active root.

    Run after :meth:`KeyManager.rotate_index_root` (and once the other
    processes' key caches have expired, so none still writes under the old
    root), then retire the old root. Lookups search under every root that is
    not retired, so rows stay findable while this runs. Resumable: a rerun
    continues after the last committed batch (job ``bidx:<label>:<tenant>``);
    a concurrent application write wins over the batch (compare-and-set).
    """
    mapper, r = _resolve(attr)
    if r.tenant_column is None:
        raise ConfigurationError(f"{r.key}: re-indexing needs the row's tenant column")
    table = r.column.table
    if not isinstance(table, sa.Table):
        raise ConfigurationError(f"{r.key}: not a table column")
    if manager is None:
        manager = _manager_for(r.spec, r.source_types)
    cols = [mapper.column_attrs[s].columns[0] for s in r.sources]
    # Read as stored and opened here with ``manager``: the run depends on no
    # process-wide manager or scope (a CLI or a migration passes its own).
    sources = {
        f"src{i}": sa.type_coerce(c, raw_type(c, engine.dialect)) for i, c in enumerate(cols)
    }
    root = manager.index_roots(tenant)[0]
    spec = r.spec

    def transform(row: BatchRow) -> Any | None:
        values = [
            _open_stored(c.type, row.extra[f"src{i}"], tenant, manager) for i, c in enumerate(cols)
        ]
        if any(v is _DECOY for v in values):
            return None  # a decoy's index stays as planted; it is never opened
        normalised = _normalise(spec, values)
        if normalised is None:
            return None
        return _value(spec, root, normalised, tenant)

    return run_batches(
        engine,
        table,
        str(r.column.key),
        transform,
        job=_job_name(spec.field_label, tenant),
        extra_columns=sources,
        where=_tenant_eq(r.tenant_column, tenant),
        batch_size=batch_size,
        worker=worker,
        restart=restart,
    )
