"""Which columns carry checks, and what each check compares (:class:`ColumnSpec`).

A declared table gives its specs (:func:`specs_for`, :func:`specs_for_metadata`);
a column named on the command line gives one (:func:`column_spec`). A spec
also names its checks (:func:`check_name`): deterministic, so that carnet
finds, replaces and drops its own objects and nothing else.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

from ..errors import ConfigurationError
from ..types import encrypted_type

if TYPE_CHECKING:
    from ..types import EncryptedText

Mode = Literal["v2", "v1", "mixed"]
MODES: tuple[Mode, ...] = ("v2", "v1", "mixed")
_MODE_KIND = {"v2": "f2", "v1": "f1", "mixed": "fm"}
# Table option that opts a table out of the checks: ``info={"carnet_checks": False}``.
OPT_OUT = "carnet_checks"
_NAME_MAX = 60  # + a two-character per-event suffix stays within 63
# Every name :func:`check_name` makes: how carnet tells its own objects (and
# its refusals, :mod:`carnet.dbchecks.refusals`) from the application's.
NAME_RE = re.compile(r"carnet_(f2|f1|fm|p|k|m)_[a-z0-9_]+")


# -- which columns are encrypted ----------------------------------------------------------


def is_encrypted(obj: Any, dialect: str | None = None) -> bool:
    """Whether a column (or type) stores carnet values on ``dialect``."""
    return encrypted_type(obj, dialect) is not None


# -- where a column's practice is ---------------------------------------------------------


@dataclass(frozen=True)
class Parent:
    """The row's practice lives on a parent row: ``fk`` (this table) -> ``key`` of ``table``."""

    fk: str
    table: str
    schema: str | None
    key: str
    practice: str


@dataclass(frozen=True)
class ColumnSpec:
    """One encrypted column and what its checks compare."""

    table: str
    schema: str | None
    column: str
    storage: Literal["binary", "text"]
    practice: str | None = None  # a practice column of the same row
    parent: Parent | None = None  # or on a parent row
    mode: Mode = "v2"
    # The field label values are sealed for (default ``table.column``), and
    # the labels also accepted while ``carnet reencrypt`` moves values from an
    # old label to this one (a table or column renamed).
    label: str | None = None
    also_labels: tuple[str, ...] = ()

    @property
    def field_label(self) -> str:
        return self.label if self.label is not None else f"{self.table}.{self.column}"

    def name(self, kind: str) -> str:
        if kind == "f":
            kind = _MODE_KIND[self.mode]
        if kind == "m" and self.parent is not None:
            return check_name(kind, self.parent.table, f"{self.table}_{self.column}")
        return check_name(kind, self.table, self.column)


def check_name(kind: str, table: str, column: str) -> str:
    """The deterministic name of a check, at most 60 characters, ``[a-z0-9_]`` only."""
    base = f"carnet_{kind}_{table}_{column}"
    safe = re.sub(r"[^a-z0-9_]", "_", base.lower())
    if safe != base or len(safe) > _NAME_MAX:
        digest = hashlib.sha256(base.encode("utf-8")).hexdigest()[:8]
        safe = safe[: _NAME_MAX - 9].rstrip("_") + "_" + digest
    return safe


def check_practice_type(column: sa.Column[Any]) -> None:
    """Refuse a practice column whose text rendering differs between databases."""
    typ = column.type
    while isinstance(typ, TypeDecorator):
        typ = typ.impl_instance
    where = f"{column.table.name}.{column.name}" if column.table is not None else column.name
    if isinstance(typ, sa.CHAR | sa.NCHAR):
        raise ConfigurationError(
            f"practice column {where} is CHAR(n): PostgreSQL pads it with spaces and MariaDB "
            "strips them, so the database cannot compare it exactly with the practice sealed "
            "in a value. Use VARCHAR (String) or an integer"
        )
    if isinstance(typ, sa.Integer | sa.String) and not isinstance(typ, sa.Enum | sa.Interval):
        return
    if isinstance(typ, sa.Enum):
        return
    raise ConfigurationError(
        f"practice column {where} is {type(typ).__name__}: carnet compares practices as text, "
        "and floats, decimals, dates and UUIDs are rendered differently by each database. "
        "Use VARCHAR (String) or an integer"
    )


def specs_for(table: sa.Table, dialect: str) -> list[ColumnSpec]:
    """The checked encrypted columns of a declared ``table`` on ``dialect``."""
    if table.info.get(OPT_OUT) is False:
        return []
    out: list[ColumnSpec] = []
    for col in table.columns:
        typ = encrypted_type(col, dialect)
        if typ is None:
            continue
        practice, parent = _practice_of(table, col, typ)
        if practice is not None:
            check_practice_type(table.c[practice])
        out.append(
            ColumnSpec(
                table=table.name,
                schema=table.schema,
                column=col.name,
                storage=typ.storage,
                practice=None if practice is None else table.c[practice].name,
                parent=parent,
                mode="mixed" if typ.mixed_read else "v2",
                label=typ.field_label,
            )
        )
    return out


def _practice_of(
    table: sa.Table, col: sa.Column[Any], typ: EncryptedText
) -> tuple[str | None, Parent | None]:
    path = typ.tenant_path
    if path is None and typ.tenant is not None and "." in typ.tenant:
        # ``tenant="patient.practice_id"`` names a relationship: the ORM resolves it.
        sa.orm.configure_mappers()
        path = typ.tenant_path
        if path is None:
            raise ConfigurationError(
                f"{table.name}.{col.name}: EncryptedText(tenant={typ.tenant!r}) names a "
                "relationship that no mapped class resolves; map the model before creating "
                "the table, or give carnet.dbchecks a ColumnSpec"
            )
    if path is not None:
        fk_key, remote, parent_tenant = path.fk_key, path.pk, path.practice
        check_practice_type(parent_tenant)
        fk = table.c[fk_key] if fk_key in table.c else _column_by_key(table, fk_key)
        return None, Parent(
            fk=fk.name,
            table=remote.table.name,
            schema=remote.table.schema,
            key=remote.name,
            practice=parent_tenant.name,
        )
    key = typ.tenant_column_name
    if key is None:
        return None, None  # the scope decides: nothing in the row to compare
    found = _practice_column(table, key)
    if found is None:
        # ``tenant=`` names a mapped attribute whose column has another key: the
        # ORM resolves it to the column at mapper configuration.
        sa.orm.configure_mappers()
        key = typ.tenant_column_name or key
        found = _practice_column(table, key)
    if found is None:
        raise ConfigurationError(
            f"{table.name}.{col.name}: EncryptedText(tenant={key!r}) names no column of "
            f"{table.name} nor of a table its primary key references"
        )
    return found


def _practice_column(table: sa.Table, key: str) -> tuple[str | None, Parent | None] | None:
    if key in table.c:
        return key, None
    # Joined inheritance: the practice is on the base table, reached by the
    # foreign key from this table's primary key.
    for ref in table.foreign_keys:
        target = ref.column.table
        if key in target.c and ref.parent.primary_key:
            check_practice_type(target.c[key])
            return None, Parent(
                fk=ref.parent.name,
                table=target.name,
                schema=target.schema,
                key=ref.column.name,
                practice=target.c[key].name,
            )
    return None


def _column_by_key(table: sa.Table, key: str) -> sa.Column[Any]:
    for c in table.columns:
        if c.key == key or c.name == key:
            return c
    raise ConfigurationError(f"{table.name}: no column {key!r}")


# -- columns named on the command line ------------------------------------------------


def storage_of(conn: sa.Connection, table: str, column: str, schema: str | None = None) -> str:
    """``"binary"`` or ``"text"``: what the database column holds, by its reflected type."""
    for c in sa.inspect(conn).get_columns(table, schema=schema):
        if c["name"] == column:
            try:
                return "text" if c["type"].python_type is str else "binary"
            except NotImplementedError:
                return "binary"
    raise ConfigurationError(f"{table} has no column {column!r}")


def specs_for_metadata(metadata: sa.MetaData, dialect: str) -> list[ColumnSpec]:
    """The checked encrypted columns of every table of an application's metadata."""
    out: list[ColumnSpec] = []
    for table in metadata.sorted_tables:
        out.extend(specs_for(table, dialect))
    return out


def column_spec(
    conn: sa.Connection,
    table: str,
    column: str,
    *,
    tenant_column: str | None = None,
    parent_fk: str | None = None,
    schema: str | None = None,
    storage: str | None = None,
    mode: Mode = "v2",
    label: str | None = None,
) -> ColumnSpec:
    """A spec for a column named on the command line, not declared in a model.

    ``tenant_column``: the row's practice column, or with ``parent_fk``
    (``fk=parent.key``) the practice column of the parent row it references.
    """
    st = storage or storage_of(conn, table, column, schema)
    parent = None
    practice = tenant_column
    if parent_fk is not None:
        if tenant_column is None:
            raise ConfigurationError("--parent-fk needs --tenant-column (the parent's column)")
        fk, sep, target = parent_fk.partition("=")
        ptable, dot, pkey = target.rpartition(".")
        if not sep or not dot or not fk or not ptable or not pkey:
            raise ConfigurationError(
                f"{parent_fk!r}: expected FK=PARENT.KEY, e.g. patient_id=patients.id"
            )
        pcol = tenant_column.rpartition(".")[2]
        parent = Parent(fk=fk, table=ptable, schema=schema, key=pkey, practice=pcol)
        practice = None
    return ColumnSpec(
        table=table,
        schema=schema,
        column=column,
        storage=st,  # type: ignore[arg-type]
        practice=practice,
        parent=parent,
        mode=mode,
        label=label,
    )


def install_command(spec: ColumnSpec) -> str:
    """The ``carnet checks install`` command that restores ``spec``'s checks."""
    cmd = f"carnet checks install --table {spec.table} --column {spec.column}"
    if spec.parent is not None:
        p = spec.parent
        cmd += f" --tenant-column {p.practice} --parent-fk {p.fk}={p.table}.{p.key}"
    elif spec.practice is not None:
        cmd += f" --tenant-column {spec.practice}"
    if spec.label is not None and spec.label != f"{spec.table}.{spec.column}":
        cmd += f" --label {spec.label}"
    return cmd + f" --mode {spec.mode}"


def format_only(spec: ColumnSpec) -> ColumnSpec:
    """``spec`` reduced to its format check (no practice, no parent)."""
    return replace(spec, practice=None, parent=None)
