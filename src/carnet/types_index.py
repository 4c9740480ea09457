"""The blind index column: :func:`BlindIndex`, its type and its declaration.

Re-exported by :mod:`carnet.types` (every column type is importable from
there), kept apart for its size. A blind index holds a truncated keyed hash of
a field's normalised plaintext (:mod:`carnet.indexing` computes it on write,
:mod:`carnet.lookup` searches it); this module only declares the column.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

import sqlalchemy as sa
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.base import SchemaEventTarget
from sqlalchemy.types import TypeDecorator

from . import _sa, indexkeys
from .errors import ConfigurationError
from .transforms import Transform

if TYPE_CHECKING:
    from .manager import KeyManager


@dataclass
class IndexSpec:
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

    def __init__(self, spec: IndexSpec | None = None) -> None:
        super().__init__()
        if spec is None:
            raise ConfigurationError("declare blind indexes with carnet.BlindIndex(...)")
        self._spec = spec

    @property
    def index_spec(self) -> IndexSpec:
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
        # Imported here: carnet.types imports this module as it loads.
        from . import _hooks
        from .types import encrypted_type

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
    spec = IndexSpec(
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
