"""The tenant invariant, checked by the database itself (docs/threat-model.md).

carnet's Python guard recognises the statements SQLAlchemy builds; SQL has
more shapes than any guard can recognise, and other clients (``psql``, a
service in another language, ``pandas.to_sql``) skip it altogether. So each
encrypted column also carries checks the database runs on every row it is
asked to write, whoever sends it, with no key and nothing secret:

``carnet_f2_<table>_<column>`` (format)
    a non-NULL value is a well-framed carnet value of format v2 (``f1``: v1
    is accepted too, until ``carnet reencrypt`` upgrades the column; ``fm``:
    a migration's mixed-read phase, where legacy plaintext is accepted until
    ``carnet migrate finish``). Refused: :class:`~carnet.errors.InvalidCiphertext`.
``carnet_p_<table>_<column>`` (practice)
    a v2 value names, in its header, exactly the practice its row holds:
    the row's practice column, or the parent row's (``tenant="patient.practice_id"``,
    joined inheritance), compared byte for byte on the UTF-8 of the practice
    rendered as text (no collation, no padding, no case folding; an integer
    practice is its decimal digits). Refused: :class:`~carnet.errors.TenantMismatch`.
``carnet_k_<table>_<column>`` (key)
    where the key table is in the same database: the value's key id is a data
    key of that practice. Refused: :class:`~carnet.errors.UnknownKey`.
``carnet_m_<parent>_<column>`` (move)
    a parent's practice does not change while a child row holds a value
    sealed for it. Refused: :class:`~carnet.errors.TenantMismatch`.

Where each lives: CHECK constraints for what is local to the row on
PostgreSQL and MariaDB; triggers for what needs another row, and for
everything on SQLite (which cannot add a CHECK to an existing table, and whose
``PRAGMA ignore_check_constraints`` would switch a CHECK off). Triggers read
the parent row with a locking read (on PostgreSQL a no-op write of it, at
every isolation level), so a parent moved by a concurrent transaction is seen
(module docs in docs/threat-model.md).

The database checks what a value *claims*: a forged header or a value cut
short that still looks well framed passes here and fails at read with
``InvalidCiphertext``; the AEAD is what authenticates. No check decodes
base64 or hex (PostgreSQL's ``decode()`` quotes its bad input in its error);
the practice is compared as hex or bytes.
"""

# Every statement here is DDL built from identifiers quoted by the dialect and
# from constants of carnet's format: no value is ever interpolated.
# ruff: noqa: S608

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

from . import envelope
from .errors import (
    CarnetError,
    ConfigurationError,
    InvalidCiphertext,
    TenantMismatch,
    UnknownKey,
)
from .types import encrypted_type

if TYPE_CHECKING:
    from .types import EncryptedText

Mode = Literal["v2", "v1", "mixed"]
MODES: tuple[Mode, ...] = ("v2", "v1", "mixed")
_MODE_KIND = {"v2": "f2", "v1": "f1", "mixed": "fm"}
# Key kinds a value may be sealed under: a practice's data keys, and its decoy
# keys (carnet.decoys), whose notes must pass the same checks as real ones.
VALUE_KEY_KINDS = ("data", "decoy")
# Table option that opts a table out of the checks: ``info={"carnet_checks": False}``.
OPT_OUT = "carnet_checks"
_NAME_MAX = 60  # + a two-character per-event suffix stays within 63
_COLON = "':'"
_V1_HEAD = "'carnet:A'"
_NAME_RE = re.compile(r"carnet_(f2|f1|fm|p|k|m)_[a-z0-9_]+")


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


# -- SQL of the checks, per dialect -------------------------------------------------------


@dataclass(frozen=True)
class DDLObject:
    """One object the database holds for a check: a CHECK constraint or a trigger."""

    kind: Literal["check", "trigger", "function"]
    name: str
    table: str
    schema: str | None
    create: tuple[str, ...]
    drop: tuple[str, ...]


def _ok(cond: str, dialect: str) -> str:
    # A CHECK whose expression is NULL passes, and a trigger's WHEN that is
    # NULL does not fire: every check is wrapped so that unknown means refused.
    if dialect == "postgresql":
        return f"(CASE WHEN {cond} THEN true ELSE false END)"
    return f"(CASE WHEN {cond} THEN 1 ELSE 0 END = 1)"


class _Sql:
    """The expressions a dialect needs, over a value ``v`` and a practice ``p``."""

    def __init__(self, dialect: str) -> None:
        if dialect not in ("sqlite", "postgresql", "mysql", "mariadb"):
            raise ConfigurationError(f"carnet's database checks do not support {dialect}")
        self.d = "mysql" if dialect == "mariadb" else dialect

    def pbytes(self, p: str) -> str:
        if self.d == "sqlite":
            return f"CAST(CAST({p} AS TEXT) AS BLOB)"
        if self.d == "postgresql":
            return f"convert_to(CAST({p} AS text), 'UTF8')"
        return f"CAST(CONVERT({p} USING utf8mb4) AS BINARY)"

    def blen(self, b: str) -> str:
        return f"octet_length({b})" if self.d == "postgresql" else f"length({b})"

    def sub(self, v: str, start: int | str, n: int | str) -> str:
        if self.d == "postgresql":
            return f"substring({v} from {start} for {n})"
        return f"substr({v}, {start}, {n})"

    def byte(self, hex2: str) -> str:
        if self.d == "postgresql":
            return f"'\\x{hex2}'::bytea"
        return f"x'{hex2}'" if self.d == "sqlite" else f"X'{hex2}'"

    def lowhex(self, b: str) -> str:
        if self.d == "postgresql":
            return f"encode({b}, 'hex')"
        return f"lower(hex({b}))"

    def u16_is(self, two: str, n: str) -> str:
        # The header's u16be length compared as hex digits: no decoding of stored bytes.
        if self.d == "sqlite":
            return f"hex({two}) = printf('%04X', {n})"
        if self.d == "postgresql":
            return f"encode({two}, 'hex') = lpad(to_hex({n}), 4, '0')"
        return f"hex({two}) = lpad(hex({n}), 4, '0')"

    def text_eq(self, a: str, b: str) -> str:
        # Exact comparison of text, whatever the column's collation.
        if self.d == "sqlite":
            return f"{a} = {b} COLLATE BINARY"
        if self.d == "postgresql":
            return f'{a} COLLATE "C" = {b}'
        return f"CAST({a} AS BINARY) = {b}"

    def text_ne(self, a: str, b: str) -> str:
        return f"NOT ({self.text_eq(a, b)})"

    def length(self, v: str, storage: str) -> str:
        if self.d == "postgresql":
            return f"octet_length({v})" if storage == "binary" else f"char_length({v})"
        if self.d == "sqlite":
            return f"length({v})"  # characters for TEXT, bytes for a BLOB
        return f"length({v})" if storage == "binary" else f"char_length({v})"

    # -- the checks, over value v (and practice p) -----------------------------------

    def is_v2(self, v: str, storage: str) -> str:
        if storage == "binary":
            return f"{self.sub(v, 1, 1)} = {self.byte('02')}"
        return self.text_eq(self.sub(v, 1, len(envelope.TEXT_PREFIX_V2)), "'carnet:2:'")

    def format(self, v: str, storage: str, mode: Mode, labels: Sequence[str]) -> str:
        """A non-NULL ``v`` is a well-framed value of a version the mode accepts,
        and a v2 value names one of ``labels`` (its tag) in its header."""
        length = self.length(v, storage)
        tags = [envelope.label_tag(label).hex() for label in labels]
        if storage == "binary":
            at = self.sub(v, envelope.LABEL_TAG_AT + 1, envelope.LABEL_TAG_SIZE)
            tagged = " OR ".join(f"{at} = {self.byte(tag)}" for tag in tags)
            v2 = f"({length} >= {envelope.MIN_SIZE} AND {self.is_v2(v, storage)} AND ({tagged}))"
            v1 = f"({length} >= {envelope.V1_MIN_SIZE} AND {self.sub(v, 1, 1)} = {self.byte('01')})"
            typed = f"typeof({v}) = 'blob' AND " if self.d == "sqlite" else ""
        else:
            # "carnet:2:" + 32 hex + ":" + 8 hex (label tag) + ":" + at least 2 hex
            # (practice) + ":" + base64 of >= 28 bytes.
            colon = 1 + len(envelope.TEXT_PREFIX_V2) + 2 * envelope.KEY_ID_SIZE
            colon2 = colon + 1 + 2 * envelope.LABEL_TAG_SIZE
            at = self.sub(v, colon + 1, 2 * envelope.LABEL_TAG_SIZE)
            tagged = " OR ".join(self.text_eq(at, repr(tag)) for tag in tags)
            v2 = (
                f"({length} >= {colon2 + 3 + 40} AND {self.is_v2(v, storage)} "
                f"AND {self.text_eq(self.sub(v, colon, 1), _COLON)} "
                f"AND ({tagged}) "
                f"AND {self.text_eq(self.sub(v, colon2, 1), _COLON)})"
            )
            # v1's base64 starts with "A" (the version byte 0x01) and holds >= 45 bytes.
            v1 = f"({length} >= 67 AND {self.text_eq(self.sub(v, 1, 8), _V1_HEAD)})"
            typed = f"typeof({v}) = 'text' AND " if self.d == "sqlite" else ""
        if mode == "v2":
            cond = v2
        elif mode == "v1":
            cond = f"({v2} OR {v1})"
        else:
            legacy = self.text_ne(self.sub(v, 1, len(envelope.TEXT_PREFIX)), "'carnet:'")
            cond = f"({legacy} OR {v2} OR {v1})"
        return _ok(f"{typed}{cond}", self.d)

    def practice(self, v: str, storage: str, p: str) -> str:
        """A v2 value names exactly practice ``p`` (other values: the format check decides)."""
        pb = self.pbytes(p)
        n = self.blen(pb)
        if storage == "binary":
            start = envelope.PRACTICE_AT + 1
            fixed = envelope.PRACTICE_AT + envelope.NONCE_SIZE + envelope.TAG_SIZE
            same = (
                f"{p} IS NOT NULL AND {self.length(v, storage)} >= {fixed} + {n} "
                f"AND {self.u16_is(self.sub(v, envelope.PRACTICE_AT - 1, 2), n)} "
                f"AND {self.sub(v, start, n)} = {pb}"
            )
        else:
            # After "carnet:2:", the key id, ":", the label tag and ":".
            at = (
                len(envelope.TEXT_PREFIX_V2)
                + 2 * envelope.KEY_ID_SIZE
                + 2 * envelope.LABEL_TAG_SIZE
                + 3
            )
            same = (
                f"{p} IS NOT NULL "
                f"AND {self.text_eq(self.sub(v, at, f'2 * {n}'), self.lowhex(pb))} "
                f"AND {self.text_eq(self.sub(v, f'{at} + 2 * {n}', 1), _COLON)}"
            )
        return _ok(f"NOT ({self.is_v2(v, storage)}) OR ({same})", self.d)

    def key_id_hex(self, v: str, storage: str) -> str:
        if storage == "binary":
            return self.lowhex(self.sub(v, 2, envelope.KEY_ID_SIZE))
        return self.sub(v, len(envelope.TEXT_PREFIX_V2) + 1, 2 * envelope.KEY_ID_SIZE)

    def key_missing(self, v: str, storage: str, p: str, keys: str) -> str:
        """True when a v2 value's key id is not a value key of practice ``p``."""
        kinds = ", ".join(f"'{k}'" for k in VALUE_KEY_KINDS)
        return (
            f"{self.is_v2(v, storage)} AND NOT EXISTS (SELECT 1 FROM {keys} k "
            f"WHERE k.key_id = {self.key_id_hex(v, storage)} "
            f"AND {self.pbytes('k.tenant')} = {self.pbytes(p)} AND k.kind IN ({kinds}))"
        )


def _quote(dialect: sa.Dialect, name: str, schema: str | None = None) -> str:
    q = dialect.identifier_preparer
    return (q.quote_schema(schema) + "." if schema else "") + q.quote(name)


def ddl_objects(
    spec: ColumnSpec, dialect: sa.Dialect, *, keys_table: str | None = None
) -> list[DDLObject]:
    """The CHECK constraints and triggers that enforce ``spec`` on ``dialect``.

    ``keys_table``: the name of the key table when it lives in the same
    database (the key check is installed only then).
    """
    s = _Sql(dialect.name)
    tbl = _quote(dialect, spec.table, spec.schema)
    col = _quote(dialect, spec.column)
    st = spec.storage
    out: list[DDLObject] = []

    def row_check(kind: str, expr_of: Any, also: Sequence[str] = ()) -> None:
        name = spec.name(kind)
        if s.d == "sqlite":
            # SQLite: no ALTER TABLE ... ADD CONSTRAINT, so the row's checks are triggers.
            cond = expr_of(f"NEW.{col}")
            out.extend(_sqlite_triggers(name, spec, tbl, col, cond, dialect, also=also))
            return
        expr = expr_of(col)
        qn = _quote(dialect, name)
        drop = f"ALTER TABLE {tbl} DROP CONSTRAINT IF EXISTS {qn}"
        out.append(
            DDLObject(
                "check",
                name,
                spec.table,
                spec.schema,
                (f"ALTER TABLE {tbl} ADD CONSTRAINT {qn} CHECK ({col} IS NULL OR {expr})",),
                (drop,),
            )
        )

    labels = (spec.field_label, *spec.also_labels)
    row_check("f", lambda v: s.format(v, st, spec.mode, labels))
    if spec.practice is not None:
        pcol = _quote(dialect, spec.practice)
        prefix = "NEW." if s.d == "sqlite" else ""
        row_check("p", lambda v: s.practice(v, st, f"{prefix}{pcol}"), also=(pcol,))
        if keys_table is not None:
            out.extend(_key_triggers(spec, dialect, s, tbl, col, keys_table, local=pcol))
    elif spec.parent is not None:
        out.extend(_parent_triggers(spec, dialect, s, tbl, col, keys_table))
    elif keys_table is not None:
        pass  # no practice in the row: the key check has nothing to compare with
    return out


def _sqlite_triggers(
    name: str,
    spec: ColumnSpec,
    tbl: str,
    col: str,
    ok: str,
    dialect: sa.Dialect,
    also: Sequence[str] = (),
) -> list[DDLObject]:
    objs = []
    of = ", ".join([col, *also])
    for suffix, event in (("_i", "INSERT"), ("_u", f"UPDATE OF {of}")):
        tname = _quote(dialect, name + suffix)
        objs.append(
            DDLObject(
                "trigger",
                name + suffix,
                spec.table,
                spec.schema,
                (
                    f"CREATE TRIGGER {tname} BEFORE {event} ON {tbl} FOR EACH ROW "
                    f"WHEN NEW.{col} IS NOT NULL AND NOT {ok} "
                    f"BEGIN SELECT RAISE(ABORT, '{name}'); END",
                ),
                (f"DROP TRIGGER IF EXISTS {tname}",),
            )
        )
    return objs


def _key_triggers(
    spec: ColumnSpec,
    dialect: sa.Dialect,
    s: _Sql,
    tbl: str,
    col: str,
    keys_table: str,
    *,
    local: str,
) -> list[DDLObject]:
    name = spec.name("k")
    keys = _quote(dialect, keys_table, spec.schema)
    # Checked only for a value that names its row's practice: any other is
    # the practice check's to refuse, which says so more precisely.
    matches = s.practice(f"NEW.{col}", spec.storage, f"NEW.{local}")
    missing = s.key_missing(f"NEW.{col}", spec.storage, f"NEW.{local}", keys)
    if s.d == "sqlite":
        return _sqlite_triggers(
            name,
            spec,
            tbl,
            col,
            f"NOT ({matches} AND COALESCE({missing}, 1))",
            dialect,
            also=(local,),
        )
    body = (
        f"IF NEW.{col} IS NOT NULL AND {matches} AND COALESCE({missing}, true) "
        f"THEN {_raise(s, name)} END IF;"
    )
    return _procedural(spec, dialect, s, name, tbl, [col, local], body, declare="")


def _raise(s: _Sql, name: str) -> str:
    if s.d == "postgresql":
        return f"RAISE EXCEPTION '{name}' USING ERRCODE = '23514', CONSTRAINT = '{name}';"
    return f"SIGNAL SQLSTATE '23000' SET MESSAGE_TEXT = '{name}';"


def _procedural(
    spec: ColumnSpec,
    dialect: sa.Dialect,
    s: _Sql,
    name: str,
    tbl: str,
    of: Sequence[str],
    body: str,
    *,
    declare: str,
    table: str | None = None,
    schema: str | None = None,
    events: Sequence[str] = ("INSERT", "UPDATE"),
) -> list[DDLObject]:
    """A BEFORE trigger running ``body`` (PL/pgSQL or MariaDB SQL) for each row."""
    table = table or spec.table
    schema = schema if table != spec.table else spec.schema
    if s.d == "postgresql":
        fn = _quote(dialect, name, schema)
        evs = " OR ".join(e if e != "UPDATE" else f"UPDATE OF {', '.join(of)}" for e in events)
        return [
            DDLObject(
                "function",
                name,
                table,
                schema,
                (
                    f"CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql "
                    f"AS $carnet$ DECLARE {declare} BEGIN {body} RETURN NEW; END $carnet$",
                ),
                (f"DROP FUNCTION IF EXISTS {fn}()",),
            ),
            DDLObject(
                "trigger",
                name,
                table,
                schema,
                (
                    f"CREATE TRIGGER {_quote(dialect, name)} BEFORE {evs} ON {tbl} "
                    f"FOR EACH ROW EXECUTE FUNCTION {fn}()",
                ),
                (f"DROP TRIGGER IF EXISTS {_quote(dialect, name)} ON {tbl}",),
            ),
        ]
    objs = []
    for ev in events:
        suffix = "_i" if ev == "INSERT" else "_u"
        tname = _quote(dialect, name + suffix, schema)
        objs.append(
            DDLObject(
                "trigger",
                name + suffix,
                table,
                schema,
                (
                    f"CREATE TRIGGER {tname} BEFORE {ev} ON {tbl} FOR EACH ROW "
                    f"BEGIN {declare} {body} END",
                ),
                (f"DROP TRIGGER IF EXISTS {tname}",),
            )
        )
    return objs


def _parent_triggers(
    spec: ColumnSpec,
    dialect: sa.Dialect,
    s: _Sql,
    tbl: str,
    col: str,
    keys_table: str | None,
) -> list[DDLObject]:
    parent = spec.parent
    assert parent is not None  # noqa: S101 - only called for a parent spec
    ptbl = _quote(dialect, parent.table, parent.schema)
    pkey = _quote(dialect, parent.key)
    pprac = _quote(dialect, parent.practice)
    fk = _quote(dialect, parent.fk)
    st = spec.storage
    pname = spec.name("p")
    kname = spec.name("k")
    mname = spec.name("m")
    keys = _quote(dialect, keys_table, spec.schema) if keys_table else None
    out: list[DDLObject] = []
    if s.d == "sqlite":
        # SQLite serialises writers: a plain read of the parent is current.
        pp = f"(SELECT {pprac} FROM {ptbl} WHERE {pkey} = NEW.{fk})"
        out.extend(
            _sqlite_triggers(
                pname, spec, tbl, col, s.practice(f"NEW.{col}", st, pp), dialect, also=(fk,)
            )
        )
        if keys is not None:
            # As for a practice in the row: a value naming another practice is
            # the practice check's to refuse.
            matches = s.practice(f"NEW.{col}", st, pp)
            missing = s.key_missing(f"NEW.{col}", st, pp, keys)
            out.extend(
                _sqlite_triggers(
                    kname,
                    spec,
                    tbl,
                    col,
                    f"NOT ({matches} AND COALESCE({missing}, 1))",
                    dialect,
                    also=(fk,),
                )
            )
        moved = (
            f"{s.pbytes('OLD.' + pprac)} IS NOT {s.pbytes('NEW.' + pprac)} "
            f"AND EXISTS (SELECT 1 FROM {tbl} c WHERE c.{fk} = OLD.{pkey} AND c.{col} IS NOT NULL)"
        )
        tname = _quote(dialect, mname + "_u")
        out.append(
            DDLObject(
                "trigger",
                mname + "_u",
                parent.table,
                parent.schema,
                (
                    f"CREATE TRIGGER {tname} BEFORE UPDATE OF {pprac} ON {ptbl} FOR EACH ROW "
                    f"WHEN {moved} BEGIN SELECT RAISE(ABORT, '{mname}'); END",
                ),
                (f"DROP TRIGGER IF EXISTS {tname}",),
            )
        )
        return out
    practice_ok = s.practice(f"NEW.{col}", st, "pp")
    key_check = ""
    if keys is not None:
        missing = s.key_missing(f"NEW.{col}", st, "pp", keys)
        true = "true" if s.d == "postgresql" else "1"
        key_check = f"IF COALESCE({missing}, {true}) THEN {_raise(s, kname)} END IF;"
    if s.d == "postgresql":
        # The child writes its parent row (a no-op UPDATE) at every isolation
        # level, and reads the practice from what it wrote:
        # - parent moved first, uncommitted: the UPDATE waits for the mover;
        #   at READ COMMITTED it then returns the moved row's new practice
        #   (refused here), at REPEATABLE READ and above it fails to serialize.
        # - child first, uncommitted: the mover waits for the child's row lock
        #   and, since the child *updated* the row, a REPEATABLE READ (or
        #   SERIALIZABLE) mover fails to serialize, a READ COMMITTED one
        #   re-reads and its trigger below sees the committed child.
        # A READ COMMITTED child used to take only FOR SHARE: a lock that
        # commits leaves no trace a REPEATABLE READ mover can see, whose trigger
        # reads its older snapshot without the child, so both committed and
        # the value stayed sealed for the old practice (tests/scenarios/
        # test_db_interleave.py, insert first, mover REPEATABLE READ, inserter
        # READ COMMITTED). The price: each child write makes a (HOT) version of
        # its parent row and fires the parent's UPDATE triggers, and two
        # transactions writing children of one parent queue on it (REPEATABLE
        # READ: the second fails to serialize) until the first ends.
        read = (
            f"UPDATE {ptbl} SET {pprac} = {pprac} WHERE {pkey} = NEW.{fk} "
            f"RETURNING CAST({pprac} AS text) INTO pp;"
        )
        declare = "pp text;"
        # Nested, so that the children are read (and locked) only on a real move,
        # not on the no-op write of the parent above.
        moved_body = (
            f"IF {s.pbytes('OLD.' + pprac)} IS DISTINCT FROM {s.pbytes('NEW.' + pprac)} THEN "
            f"IF EXISTS (SELECT 1 FROM {tbl} c WHERE c.{fk} = OLD.{pkey} "
            f"AND c.{col} IS NOT NULL FOR SHARE) THEN {_raise(s, mname)} END IF; END IF;"
        )
        mdeclare = ""
    else:
        # InnoDB: a locking read sees the newest committed row, not the snapshot.
        read = (
            f"SELECT CAST(CONVERT({pprac} USING utf8mb4) AS BINARY) INTO pp FROM {ptbl} "
            f"WHERE {pkey} = NEW.{fk} LOCK IN SHARE MODE;"
        )
        declare = (
            "DECLARE pp LONGBLOB DEFAULT NULL; "
            "DECLARE CONTINUE HANDLER FOR NOT FOUND SET pp = NULL;"
        )
        moved_body = (
            f"IF NOT ({s.pbytes('OLD.' + pprac)} <=> {s.pbytes('NEW.' + pprac)}) THEN "
            f"SELECT COUNT(*) INTO n FROM {tbl} c WHERE c.{fk} = OLD.{pkey} "
            f"AND c.{col} IS NOT NULL LOCK IN SHARE MODE; "
            f"IF n > 0 THEN {_raise(s, mname)} END IF; END IF;"
        )
        mdeclare = "DECLARE n INT DEFAULT 0;"
    body = (
        f"IF NEW.{col} IS NOT NULL THEN {read} "
        f"IF NOT {practice_ok} THEN {_raise(s, pname)} END IF; {key_check} END IF;"
    )
    out.extend(_procedural(spec, dialect, s, pname, tbl, [col, fk], body, declare=declare))
    out.extend(
        _procedural(
            spec,
            dialect,
            s,
            mname,
            ptbl,
            [pprac],
            moved_body,
            declare=mdeclare,
            table=parent.table,
            schema=parent.schema,
            events=("UPDATE",),
        )
    )
    return out


# -- installing, finding, removing ---------------------------------------------------------


def key_table_here(conn: sa.Connection, schema: str | None = None) -> str | None:
    """The key table's name when it lives in ``conn``'s database, else None."""
    from . import context

    names = ["carnet_keys"]
    manager = context.default_manager()
    if manager is not None and manager.store.name not in names:
        names.insert(0, manager.store.name)
    insp = sa.inspect(conn)
    for name in names:
        if insp.has_table(name, schema=schema):
            return name
    return None


def install(
    conn: sa.Connection,
    specs: Iterable[ColumnSpec],
    *,
    keys_table: str | None | Literal["auto"] = "auto",
) -> list[str]:
    """Create the checks of ``specs`` on ``conn`` (replacing carnet's earlier ones).

    Returns the names of the objects created. Fails, and creates nothing
    (inside the caller's transaction where the database has transactional
    DDL), when existing rows break a check: ``carnet verify`` names them.
    """
    made: list[str] = []
    for spec in specs:
        keys = key_table_here(conn, spec.schema) if keys_table == "auto" else keys_table
        drop(conn, [spec])
        for obj in ddl_objects(spec, conn.dialect, keys_table=keys):
            for sql in obj.create:
                conn.exec_driver_sql(sql)
            made.append(obj.name)
    return made


def drop(conn: sa.Connection, specs: Iterable[ColumnSpec]) -> None:
    """Remove carnet's checks of ``specs``, in every mode (an opt-out, or before a change)."""
    for spec in specs:
        seen: set[tuple[str, str]] = set()
        for mode in MODES:
            for keys in (None, "carnet_keys"):
                objs = ddl_objects(replace(spec, mode=mode), conn.dialect, keys_table=keys)
                # Triggers before the functions they call (PostgreSQL refuses otherwise).
                for obj in reversed(objs):
                    if (obj.kind, obj.name) in seen:
                        continue
                    seen.add((obj.kind, obj.name))
                    for sql in obj.drop:
                        conn.exec_driver_sql(sql)


def installed(conn: sa.Connection, table: str, schema: str | None = None) -> set[str]:
    """Names of carnet's checks and triggers found on ``table`` (and on it as a parent)."""
    d = conn.dialect.name
    if d == "sqlite":
        rows = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ?", (table,)
        )
        return {r[0] for r in rows if r[0].startswith("carnet_")}
    if d == "postgresql":
        rows = conn.execute(
            sa.text(
                "SELECT c.conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
                "WHERE t.relname = :t AND c.contype = 'c' AND c.convalidated "
                "UNION SELECT g.tgname FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid "
                "WHERE t.relname = :t AND NOT g.tgisinternal AND g.tgenabled <> 'D'"
            ),
            {"t": table},
        )
        return {r[0] for r in rows if r[0].startswith("carnet_")}
    rows = conn.execute(
        sa.text(
            "SELECT CONSTRAINT_NAME FROM information_schema.TABLE_CONSTRAINTS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = :t AND CONSTRAINT_TYPE = 'CHECK' "
            "UNION SELECT TRIGGER_NAME FROM information_schema.TRIGGERS "
            "WHERE TRIGGER_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = :t"
        ),
        {"t": table},
    )
    return {r[0] for r in rows if r[0].startswith("carnet_")}


def expected(
    spec: ColumnSpec, dialect: sa.Dialect, keys_table: str | None
) -> list[tuple[str, str]]:
    """(table, name) of each constraint or trigger ``spec`` needs (functions left out)."""
    return [
        (o.table, o.name)
        for o in ddl_objects(spec, dialect, keys_table=keys_table)
        if o.kind != "function"
    ]


def missing(conn: sa.Connection, spec: ColumnSpec) -> list[str]:
    """The checks of ``spec`` that the database lacks (or holds disabled)."""
    keys = key_table_here(conn, spec.schema)
    want = expected(spec, conn.dialect, keys)
    found: dict[str, set[str]] = {}
    out = []
    for table, name in want:
        if table not in found:
            found[table] = installed(conn, table, spec.schema)
        if name not in found[table]:
            out.append(name)
    return out


def mode_installed(conn: sa.Connection, spec: ColumnSpec) -> Mode | None:
    """The mode of the format check found on ``spec``'s column, or None."""
    names = installed(conn, spec.table, spec.schema)
    for mode in MODES:
        name = replace(spec, mode=mode).name("f")
        if name in names or name + "_i" in names:
            return mode
    return None


# -- table events: checks created with the table ------------------------------------------


def attach(table: sa.Table) -> None:
    """Have ``table`` create its checks right after CREATE TABLE (once per table)."""
    from . import _hooks

    # Configuration errors (a CHAR(n) practice column) before CREATE TABLE:
    # SQLite and MariaDB would keep a table created without its checks.
    _hooks.on_table_create(table, before=_before_create, after=_after_create)


def _before_create(table: sa.Table, conn: Any, **_kw: Any) -> None:
    specs_for(table, conn.dialect.name)


def _after_create(table: sa.Table, conn: Any, **_kw: Any) -> None:
    specs = specs_for(table, conn.dialect.name)
    if not specs:
        return
    if not isinstance(conn, sa.Connection):
        # Offline (``alembic upgrade --sql``): emit the DDL as text, key check left
        # out since the key table cannot be looked up.
        for spec in specs:
            for obj in ddl_objects(spec, conn.dialect, keys_table=None):
                for sql in obj.create:
                    conn.execute(sa.DDL(sql.replace("%", "%%")))
        return
    install(conn, specs)


# -- errors: the database's refusal as carnet's error --------------------------------------

_MESSAGES = {
    "f": "the database refused a value that is not carnet ciphertext of a format this column "
    "accepts",
    "p": "the database refused a value sealed for another practice than its row's",
    "k": "the database refused a value whose key is not a data key of its row's practice",
    "m": "the database refused to change a practice while rows hold values sealed for it",
}


def check_of(exc: BaseException) -> str | None:
    """The name of the carnet check a DBAPI error reports, else None.

    PostgreSQL names it in the error's diagnostics; SQLite and MariaDB in the
    message, which for carnet's checks is the name itself (a trigger's RAISE
    or SIGNAL) or names the constraint.
    """
    diag = getattr(exc, "diag", None)
    if diag is not None:
        name = getattr(diag, "constraint_name", None)
        return name if name and _NAME_RE.fullmatch(name) else None
    args = getattr(exc, "args", ())
    for arg in args:
        if isinstance(arg, str):
            m = _NAME_RE.search(arg)
            if m:
                return m.group(0)
    return None


def error_for(name: str) -> CarnetError:
    """carnet's error for a refusal by check ``name``."""
    kind = name.split("_", 2)[1]
    base = kind[0]
    message = f"{_MESSAGES[base]} ({name}); nothing of the statement was written"
    err: CarnetError
    if base == "f":
        err = InvalidCiphertext(f"not stored: {message}")
    elif base == "k":
        err = UnknownKey(b"", message)
    else:
        err = TenantMismatch("", "", message)
    err.constraint = name
    return err


def scrub(exc: BaseException, name: str) -> None:
    """Drop from a driver's error what it quotes of the refused row.

    PostgreSQL's CHECK error carries ``Failing row contains (...)``: the
    row, plaintext note included when plaintext was refused.
    """
    exc.args = (f"refused by {name}",)


# -- operations: which mode a column's data allows, installing for an application ---------
#
# The library side of ``carnet checks``, ``carnet doctor``, ``carnet verify``,
# ``carnet migrate finish`` and ``carnet reencrypt``: small functions, so the
# commands stay thin.


@dataclass(frozen=True)
class Census:
    """How a column's non-NULL values are framed, counted by the database (nothing decoded)."""

    rows: int
    nulls: int
    v2: int
    v1: int
    plaintext: int  # no carnet prefix: legacy plaintext of a migration
    bad: int  # carnet-prefixed (or of the wrong type) but not well framed
    other_practice: int = 0  # v2 values whose header names another practice than the row's

    def as_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "nulls": self.nulls,
            "v2": self.v2,
            "v1": self.v1,
            "plaintext": self.plaintext,
            "bad": self.bad,
            "other_practice": self.other_practice,
        }


def storage_of(conn: sa.Connection, table: str, column: str, schema: str | None = None) -> str:
    """``"binary"`` or ``"text"``: what the database column holds, by its reflected type."""
    for c in sa.inspect(conn).get_columns(table, schema=schema):
        if c["name"] == column:
            try:
                return "text" if c["type"].python_type is str else "binary"
            except NotImplementedError:
                return "binary"
    raise ConfigurationError(f"{table} has no column {column!r}")


def census(conn: sa.Connection, spec: ColumnSpec) -> Census:
    """Count ``spec``'s column values by format, with the same expressions the checks use."""
    s = _Sql(conn.dialect.name)
    d = conn.dialect
    tbl = _quote(d, spec.table, spec.schema)
    col = "t." + _quote(d, spec.column)
    st = spec.storage
    label = (spec.field_label, *spec.also_labels)
    f2, f1 = s.format(col, st, "v2", label), s.format(col, st, "v1", label)
    # Legacy plaintext (mixed-read) lives in text columns only.
    fm = s.format(col, st, "mixed", label) if st == "text" else f1

    def n(cond: str) -> str:
        return f"SUM(CASE WHEN {col} IS NOT NULL AND {cond} THEN 1 ELSE 0 END)"

    if spec.practice is not None:
        practice = f"t.{_quote(d, spec.practice)}"
    elif spec.parent is not None:
        p = spec.parent
        practice = (
            f"(SELECT pt.{_quote(d, p.practice)} FROM {_quote(d, p.table, p.schema)} pt "
            f"WHERE pt.{_quote(d, p.key)} = t.{_quote(d, p.fk)})"
        )
    else:
        practice = None
    other = "0" if practice is None else n(f"NOT {s.practice(col, st, practice)}")
    row = conn.exec_driver_sql(
        f"SELECT COUNT(*), SUM(CASE WHEN {col} IS NULL THEN 1 ELSE 0 END), "
        f"{n(f2)}, {n(f'{f1} AND NOT {f2}')}, {n(f'{fm} AND NOT {f1}')}, "
        f"{n(f'NOT {fm}')}, {other} FROM {tbl} t"
    ).one()
    return Census(*(int(x or 0) for x in row))


def choose_mode(conn: sa.Connection, spec: ColumnSpec) -> tuple[Mode | None, Census]:
    """The strictest mode the column's data allows, or None (then ``census.bad`` > 0).

    Every non-NULL value v2: ``v2``; some v1: ``v1`` (``carnet reencrypt``
    upgrades them); legacy plaintext on a mixed-read column (``spec.mode ==
    "mixed"``): ``mixed``. Plaintext on a column that is not mixed-read counts
    as bad.
    """
    c = census(conn, spec)
    if c.bad or c.other_practice or (c.plaintext and spec.mode != "mixed"):
        return None, c
    if c.plaintext:
        return "mixed", c
    return ("v1" if c.v1 else "v2"), c


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


def set_format_mode(conn: sa.Connection, spec: ColumnSpec, mode: Mode) -> list[str]:
    """Replace the format check of ``spec``'s column by the one of ``mode``; others untouched."""
    fmt = format_only(spec)
    for m in MODES:
        for obj in ddl_objects(replace(fmt, mode=m), conn.dialect):
            for sql in obj.drop:
                conn.exec_driver_sql(sql)
    made = []
    for obj in ddl_objects(replace(fmt, mode=mode), conn.dialect):
        for sql in obj.create:
            conn.exec_driver_sql(sql)
        made.append(obj.name)
    return made


def tighten(
    conn: sa.Connection,
    table: str,
    column: str,
    schema: str | None = None,
    *,
    label: str | None = None,
    relabel: bool = False,
) -> bool:
    """After a re-encryption: an ``f1`` format check becomes ``f2`` once no v1 value
    is left, and with ``relabel`` (the pass moved values to ``label``) the check
    accepts ``label`` alone.

    Returns True when the check changed. A column without a format check, or
    with one already as strict as its data allows, is left as it is (no DDL:
    on MariaDB a new CHECK rescans the table).
    """
    spec = ColumnSpec(
        table,
        schema,
        column,
        storage_of(conn, table, column, schema),  # type: ignore[arg-type]
        label=label,
    )
    mode = mode_installed(conn, spec)
    if mode is None:
        return False
    c = census(conn, spec)
    if c.bad:
        return False  # values of another label left: keep accepting them
    tighter = mode == "v1" and not (c.v1 or c.plaintext)
    if not (tighter or relabel):
        return False
    set_format_mode(conn, spec, "v2" if tighter else mode)
    return True


def accept_labels(engine: sa.Engine, table: str, column: str, label: str, old_label: str) -> bool:
    """Before ``carnet reencrypt`` moves values from ``old_label`` to ``label``: the
    column's format check accepts both (the application writes the new one,
    the rows still hold the old). Returns False when the column has no check."""
    with engine.begin() as conn:
        spec = ColumnSpec(
            table,
            None,
            column,
            storage_of(conn, table, column),  # type: ignore[arg-type]
            label=label,
            also_labels=(old_label,),
        )
        mode = mode_installed(conn, spec)
        if mode is None:
            return False
        set_format_mode(conn, spec, mode)
        return True


@dataclass(frozen=True)
class ColumnChecks:
    """What the database holds for one encrypted column, against what its data allows."""

    spec: ColumnSpec
    mode: Mode | None  # the format check found, if any
    allowed: Mode | None  # the strictest mode the data allows
    missing: tuple[str, ...]
    census: Census

    @property
    def weaker(self) -> bool:
        order = {"v2": 0, "v1": 1, "mixed": 2}
        return (
            self.mode is not None
            and self.allowed is not None
            and order[self.mode] > order[self.allowed]
        )

    @property
    def ok(self) -> bool:
        return not self.missing and not self.weaker

    @property
    def fix(self) -> str | None:
        if self.ok:
            return None
        return install_command(replace(self.spec, mode=self.allowed or self.spec.mode))

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.spec.table,
            "column": self.spec.column,
            "mode": self.mode,
            "allowed": self.allowed,
            "missing": list(self.missing),
            "weaker": self.weaker,
            "ok": self.ok,
            "census": self.census.as_dict(),
            "fix": self.fix,
        }


def column_checks(conn: sa.Connection, spec: ColumnSpec) -> ColumnChecks:
    """The checks of ``spec`` found, and missing, in the mode its data allows.

    ``spec.mode`` says what the application declares (``mixed`` for a
    mixed-read column); the mode expected is the strictest the data allows
    (``f1`` while no v1 value is left, or ``fm`` on a column whose values are
    all carnet's, is weaker than it could be). A disabled trigger or a NOT
    VALID constraint on PostgreSQL counts as missing.
    """
    found = mode_installed(conn, spec)
    allowed, c = choose_mode(conn, spec)
    want = replace(spec, mode=found or allowed or spec.mode)
    return ColumnChecks(spec, found, allowed, tuple(missing(conn, want)), c)


def status(conn: sa.Connection, specs: Iterable[ColumnSpec]) -> list[ColumnChecks]:
    """:func:`column_checks` of each spec whose table exists."""
    insp = sa.inspect(conn)
    return [column_checks(conn, s) for s in specs if insp.has_table(s.table, schema=s.schema)]


def install_chosen(
    conn: sa.Connection, specs: Iterable[ColumnSpec], mode: Mode | None = None
) -> list[tuple[ColumnSpec, Census]]:
    """Install each spec's checks in ``mode``, or in the mode its data allows.

    Raises :class:`ConfigurationError` naming the column and its count of bad
    rows when the data allows no mode (``carnet verify`` lists them).
    """
    out = []
    for spec in specs:
        chosen, c = choose_mode(conn, spec)
        use = mode or chosen
        if use is None:
            bad = c.bad + c.other_practice + (c.plaintext if spec.mode != "mixed" else 0)
            why = "not carnet ciphertext of any accepted format, or sealed for another practice"
            if spec.mode != "mixed":
                why += ", or plaintext on a column that is not mixed-read"
            tenant = ""
            if spec.practice is not None:
                tenant = f" --tenant-column {spec.practice}"
            elif spec.parent is not None:
                tenant = f" --tenant-column {spec.parent.table}.{spec.parent.practice}"
            raise ConfigurationError(
                f"{spec.table}.{spec.column}: {bad} row(s) hold values no check mode accepts "
                f"({why}); nothing installed. List them with `carnet verify --table {spec.table} "
                f"--column {spec.column}{tenant}`"
            )
        spec = replace(spec, mode=use)
        install(conn, [spec])
        out.append((spec, c))
    return out


def tighten_after_reencrypt(
    engine: sa.Engine, table: str, column: str, label: str | None = None, relabel: bool = False
) -> bool:
    """:func:`tighten`, in its own transaction, for ``carnet reencrypt`` at the end of a pass.

    Workers of one pass each call it; only the one that finds no v1 value
    left tightens. A concurrent DDL of another worker is not an error of the
    re-encryption: the check stays as it was, and ``carnet doctor`` reports
    it with the command that tightens it.
    """
    try:
        with engine.begin() as conn:
            return tighten(conn, table, column, label=label, relabel=relabel)
    except sa.exc.DBAPIError:
        return False


def disabled(conn: sa.Connection, table: str) -> set[str]:
    """carnet's checks present but not in force: a disabled trigger, a NOT VALID constraint.

    PostgreSQL only (``ALTER TABLE ... DISABLE TRIGGER``, ``ADD CONSTRAINT ...
    NOT VALID``); :func:`installed` leaves them out, so :func:`missing` lists
    them. MariaDB's ``SET check_constraint_checks=0`` and SQLite's ``PRAGMA
    ignore_check_constraints`` are settings of one session, invisible here.
    """
    if conn.dialect.name != "postgresql":
        return set()
    rows = conn.execute(
        sa.text(
            "SELECT c.conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "WHERE t.relname = :t AND c.contype = 'c' AND NOT c.convalidated "
            "UNION SELECT g.tgname FROM pg_trigger g JOIN pg_class t ON t.oid = g.tgrelid "
            "WHERE t.relname = :t AND NOT g.tgisinternal AND g.tgenabled = 'D'"
        ),
        {"t": table},
    )
    return {r[0] for r in rows if r[0].startswith("carnet_")}
