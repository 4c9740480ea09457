"""Table reflection, in one place: every table carnet reads by name, and where a column's
practice is.

- :func:`resolve_table`: a ``Table`` as given, or reflected by name
  (``schema.name`` accepted); :func:`check_column`: that table, after
  checking a column exists and can hold carnet values;
- :func:`resolve`: a column to migrate or verify, with the path to its row's
  practice (a column of the row, or of a parent reached through foreign
  keys, found or given with ``--via``), every name checked before any row is
  touched; :func:`checks_spec`: the database checks that path gives.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from . import dbchecks
from .errors import ConfigurationError, InvalidPlaintext

IN_PLACE = "in-place"
EXPAND = "expand"
TEXT = "text"
DATE = "date"
BYTES = "bytes"
JSON = "json"


@dataclass(frozen=True)
class JoinStep:
    """``child.child_col = parent.parent_col``, walking from the migrated table upwards."""

    child: str
    child_col: str
    parent: str
    parent_col: str

    def __str__(self) -> str:
        return f"{self.child}.{self.child_col}={self.parent}.{self.parent_col}"


@dataclass(frozen=True)
class TenantPath:
    table: str
    column: str
    steps: tuple[JoinStep, ...] = ()

    def __str__(self) -> str:
        via = "".join(f" via {s}" for s in self.steps)
        return f"{self.table}.{self.column}{via}"


@dataclass
class Target:
    """A reflected table and how to migrate one of its columns.

    ``column`` receives ciphertext; ``source`` holds the legacy plaintext.
    In place they are the same TEXT column; expand/contract writes a new
    binary column and leaves the legacy one for the contract step to drop.
    """

    table: sa.Table
    column: str
    source: str
    pk: tuple[str, ...]
    tenant: TenantPath
    label: str
    metadata: sa.MetaData = field(repr=False)
    # What the legacy column holds: TEXT (sealed as its UTF-8), DATE (sealed
    # as its ISO text, as EncryptedDate seals a date), BYTES (a BLOB, sealed
    # as it is, as EncryptedBytes) or JSON (sealed as its canonical JSON, as
    # EncryptedJSON).
    plaintext: str = TEXT

    def plaintext_of(self, value: Any) -> bytes:
        """The plaintext sealed for a legacy value, as the column's carnet type seals it.

        The string's UTF-8; a date's ``YYYY-MM-DD``; a BLOB's bytes; a JSON
        value's canonical JSON (a str from the driver is parsed first).
        Raises :class:`~carnet.errors.InvalidPlaintext` for a JSON value
        ``EncryptedJSON`` does not store (a scalar) or a BLOB over its limit.
        """
        if self.plaintext == DATE:
            return str(value.isoformat()).encode("ascii")
        if self.plaintext == BYTES:
            from .types_binary import MAX_BYTES

            data = bytes(value)
            if len(data) > MAX_BYTES:
                raise InvalidPlaintext(f"a value over {MAX_BYTES} bytes")
            return data
        if self.plaintext == JSON:
            from .types_binary import canonical_json

            if isinstance(value, str | bytes):
                try:
                    value = json.loads(value)
                except ValueError:
                    value = None  # refused below, outside the except block
            return canonical_json(value).encode("utf-8")
        return str(value).encode("utf-8")

    @property
    def mode(self) -> str:
        return IN_PLACE if self.column == self.source else EXPAND

    @property
    def name(self) -> str:
        return f"{self.table.name}.{self.column}"

    @property
    def job(self) -> str:
        return f"migrate:{self.table.name}.{self.column}"

    def describe(self) -> dict[str, Any]:
        return {
            "table": self.table.name,
            "column": self.column,
            "source": self.source,
            "mode": self.mode,
            "primary_key": list(self.pk),
            "tenant": str(self.tenant),
            "label": self.label,
            "plaintext": self.plaintext,
        }

    # -- SQL pieces for the batch engine and the read-only scans --------------------

    @functools.cached_property
    def _aliases(self) -> list[tuple[JoinStep, sa.FromClause]]:
        # One alias object per step, shared by the tenant column and the joins:
        # two aliases of the same name would make SQLAlchemy add a cross join.
        out: list[tuple[JoinStep, sa.FromClause]] = []
        for i, step in enumerate(self.tenant.steps):
            out.append((step, self.metadata.tables[step.parent].alias(f"carnet_p{i}")))
        return out

    def tenant_column(self) -> sa.ColumnElement[Any]:
        if not self.tenant.steps:
            return self.table.c[self.tenant.column]
        _, last = self._aliases[-1]
        return last.c[self.tenant.column]

    def join(self, sel: sa.Select[Any]) -> sa.Select[Any]:
        """Add the tenant's join path to a SELECT over the migrated table."""
        prev: sa.FromClause = self.table
        for step, alias in self._aliases:
            sel = sel.join_from(
                prev, alias, prev.c[step.child_col] == alias.c[step.parent_col], isouter=True
            )
            prev = alias
        return sel

    def join_or_none(self) -> Callable[[sa.Select[Any]], sa.Select[Any]] | None:
        return self.join if self.tenant.steps else None


def _reflect(engine: sa.Engine, names: Sequence[str]) -> sa.MetaData:
    md = sa.MetaData()
    insp = sa.inspect(engine)
    missing = [n for n in names if not insp.has_table(n)]
    if missing:
        raise ConfigurationError(f"no table {missing[0]!r} in the database")
    # resolve_fks pulls in every table reachable by foreign keys, which the
    # path discovery needs.
    md.reflect(engine, only=list(dict.fromkeys(names)), resolve_fks=True)
    return md


def _parse_dotted(s: str, what: str) -> tuple[str, str]:
    parts = s.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigurationError(f"{what} must look like table.column, got {s!r}")
    return parts[0], parts[1]


def parse_via(spec: str) -> JoinStep:
    """``child.col=parent.col`` -> JoinStep."""
    left, sep, right = spec.partition("=")
    if not sep:
        raise ConfigurationError(f"--via must look like child.col=parent.col, got {spec!r}")
    c, cc = _parse_dotted(left, "--via")
    p, pc = _parse_dotted(right, "--via")
    return JoinStep(c, cc, p, pc)


def discover_path(md: sa.MetaData, start: str, goal: str) -> tuple[JoinStep, ...]:
    """Shortest foreign-key path from ``start`` up to ``goal``; refuse when ambiguous."""
    if start == goal:
        return ()
    # Breadth-first over child -> parent foreign keys, keeping every shortest path
    # so that an ambiguity is an error rather than a coin toss.
    best: list[tuple[JoinStep, ...]] = []
    queue: deque[tuple[str, tuple[JoinStep, ...]]] = deque([(start, ())])
    seen_depth: dict[str, int] = {start: 0}
    while queue:
        name, path = queue.popleft()
        if best and len(path) >= len(best[0]):
            break
        table = md.tables.get(name)
        if table is None:
            continue
        for fk in sorted(table.foreign_keys, key=lambda f: (f.parent.name, f.target_fullname)):
            parent = fk.column.table.name
            step = JoinStep(name, fk.parent.name, parent, fk.column.name)
            if any(s.parent == parent or s.child == parent for s in path):
                continue
            new = (*path, step)
            if parent == goal:
                best.append(new)
                continue
            if seen_depth.get(parent, len(new)) < len(new):
                continue
            seen_depth[parent] = len(new)
            queue.append((parent, new))
    if not best:
        raise ConfigurationError(
            f"no foreign-key path from {start!r} to {goal!r}: spell the joins with "
            f"--via {start}.<column>={goal}.<column> (one --via per step)"
        )
    if len(best) > 1:
        options = "; ".join(" ".join(f"--via {s}" for s in p) for p in best)
        raise ConfigurationError(
            f"several foreign-key paths from {start!r} to {goal!r}, choose one: {options}"
        )
    return best[0]


def resolve(
    engine: sa.Engine,
    table: str,
    column: str,
    *,
    tenant: str,
    via: Sequence[str] = (),
    pk: Sequence[str] = (),
    into: str | None = None,
    label: str | None = None,
) -> Target:
    """Reflect ``table`` and check every name given, before any row is touched.

    ``into``: the new binary column of an expand/contract migration (default:
    in place). ``label``: the field label bound into each value; by default
    ``table.column`` of the *legacy* column, so that after the contract step
    renames the new column to the old name the application's default label
    still matches.
    """
    steps = tuple(parse_via(v) for v in via)
    if "." in tenant:
        t_table, t_col = _parse_dotted(tenant, "--tenant")
    else:
        if steps:
            raise ConfigurationError("--via needs --tenant as table.column (the parent's column)")
        t_table, t_col = table, tenant
    names = [table, t_table, *[s.parent for s in steps], *[s.child for s in steps]]
    md = _reflect(engine, names)
    t = md.tables[table]
    for c in (column, into):
        if c is not None and c not in t.c:
            raise ConfigurationError(f"table {table!r} has no column {c!r}")
    if t_table != table and not steps:
        steps = discover_path(md, table, t_table)
    if steps:
        if steps[0].child != table or steps[-1].parent != t_table:
            raise ConfigurationError(
                f"--via must lead from {table!r} to {t_table!r} (got {' '.join(map(str, steps))})"
            )
        for a, b in zip(steps, steps[1:], strict=False):
            if a.parent != b.child:
                raise ConfigurationError(f"--via steps do not chain: {a} then {b}")
        for s in steps:
            for tn, cn in ((s.child, s.child_col), (s.parent, s.parent_col)):
                if cn not in md.tables[tn].c:
                    raise ConfigurationError(f"table {tn!r} has no column {cn!r}")
    if t_col not in md.tables[t_table].c:
        raise ConfigurationError(f"table {t_table!r} has no column {t_col!r}")
    plaintext = _plaintext_kind(t.c[column], into, _json_checked(engine, t, column))
    pk_cols = tuple(pk) or tuple(c.name for c in t.primary_key.columns)
    if not pk_cols:
        raise ConfigurationError(f"table {table!r} has no primary key: name one with --pk")
    for c in pk_cols:
        if c not in t.c:
            raise ConfigurationError(f"table {table!r} has no column {c!r}")
    return Target(
        table=t,
        column=into or column,
        source=column,
        pk=pk_cols,
        tenant=TenantPath(t_table, t_col, steps),
        label=label or f"{table}.{column}",
        metadata=md,
        plaintext=plaintext,
    )


def _json_checked(engine: sa.Engine, table: sa.Table, column: str) -> bool:
    """Whether MariaDB's JSON type made this column: a LONGTEXT with ``json_valid(col)``."""
    if engine.dialect.name not in ("mysql", "mariadb"):
        return False  # PostgreSQL and SQLite reflect JSON as JSON
    # A column-level CHECK, which SQLAlchemy's reflection does not report.
    sql = sa.text(
        "SELECT check_clause FROM information_schema.check_constraints "
        "WHERE constraint_schema = COALESCE(:schema, DATABASE()) AND table_name = :table"
    )
    try:
        with engine.connect() as conn:
            clauses = conn.execute(sql, {"schema": table.schema, "table": table.name}).scalars()
            want = f"json_valid(`{column}`)".lower()
            return any(want in str(c).lower() for c in clauses)
    except sa.exc.DBAPIError:
        return False  # MySQL before 8.0.16: no such view, no JSON check either


def _is_binary(typ: sa.types.TypeEngine[Any]) -> bool:
    """A column of bytes (BLOB, BYTEA, VARBINARY, MariaDB's LONGBLOB...), by its Python type."""
    try:
        return typ.python_type is bytes
    except NotImplementedError:
        return False


def _plaintext_kind(col: sa.Column[Any], into: str | None, json_checked: bool = False) -> str:
    """TEXT, DATE, BYTES or JSON for the legacy column; refuse what carnet cannot seal
    as its types do."""
    typ = col.type
    where = f"{col.table.name}.{col.name}"
    if into is not None and (isinstance(typ, sa.JSON) or json_checked):
        return JSON  # read by carnet.EncryptedJSON
    if into is not None and _is_binary(typ):
        # A BLOB of documents, read by carnet.EncryptedBytes. In place, a
        # binary column is one that holds ciphertext already (verify after a
        # contract step): TEXT below.
        return BYTES
    if isinstance(typ, sa.JSON):
        raise ConfigurationError(
            f"{where} is a JSON column, which cannot hold ciphertext: migrate it into a new "
            "column with --into (expand/contract), read by carnet.EncryptedJSON"
        )
    if isinstance(typ, sa.DateTime):
        raise ConfigurationError(
            f"{where} is a date and time: its calendar date depends on a time zone. Convert it to "
            "DATE (or to text in the form the application reads) before migrating it"
        )
    if isinstance(typ, sa.Date):
        if into is None:
            raise ConfigurationError(
                f"{where} is a DATE column, which cannot hold ciphertext: migrate it into a new "
                "column with --into (expand/contract), read by carnet.EncryptedDate"
            )
        return DATE
    # Text; or a binary column already holding ciphertext (verify after a contract).
    return TEXT


def resolve_table(engine: sa.Engine, table: str | sa.Table) -> sa.Table:
    """A Table as given, or reflected by name (``schema.name`` accepted)."""
    if isinstance(table, sa.Table):
        return table
    schema, _, name = table.rpartition(".")
    try:
        return sa.Table(name, sa.MetaData(), autoload_with=engine, schema=schema or None)
    except sa.exc.NoSuchTableError:
        raise ConfigurationError(f"unknown table {table!r}") from None


def raw_type(col: sa.ColumnElement[Any], dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
    """The storage type of a column, below any TypeDecorator such as EncryptedText."""
    t = col.type
    if isinstance(t, sa.types.TypeDecorator):
        return t.load_dialect_impl(dialect)
    return t


def is_text_column(col: sa.ColumnElement[Any]) -> bool:
    """True when a column stores text (carnet's prefixed form), not bytes."""
    try:
        return col.type.python_type is str
    except NotImplementedError:
        return False


def require_sealable_in_place(target: Target) -> None:
    """Refuse to seal a binary column in place: its plaintext is a document, not text.

    In place, carnet writes the text form of the sealed UTF-8 of each value;
    a BLOB of documents goes into a new column (``--into``), read by
    ``EncryptedBytes``. A binary column in place is one that holds
    ciphertext already: ``verify`` and ``finish`` read it.
    """
    col = target.table.c[target.column]
    if target.mode == IN_PLACE and _is_binary(col.type):
        raise ConfigurationError(
            f"{target.name} is a binary column: carnet migrate seals its documents into a new "
            "binary column with --into (expand/contract), read by carnet.EncryptedBytes; "
            "in place, a binary column can only be verified (migrate verify / finish)"
        )


def check_column(engine: sa.Engine, table: str, column: str, *, pk: Sequence[str] = ()) -> sa.Table:
    """The reflected table, after checking the column exists and can hold carnet values.

    ``pk``: the columns standing for the primary key of a table that declares none.
    """
    tbl = resolve_table(engine, table)
    for c in (column, *pk):
        if c not in tbl.c:
            raise ConfigurationError(f"table {table!r} has no column {c!r}")
    if not pk and not tbl.primary_key.columns:
        raise ConfigurationError(f"table {table!r} has no primary key")
    try:
        py = raw_type(tbl.c[column], engine.dialect).python_type
    except NotImplementedError:
        py = object
    if py not in (bytes, str):
        raise ConfigurationError(f"{table}.{column} is not a text or binary column")
    return tbl


def checks_spec(target: Target) -> dbchecks.ColumnSpec:
    """The database checks of a migrated column: its practice as the migration found it.

    A practice column of the row, or one parent reached by one foreign key;
    over a longer join path only the format is checked (the database checks
    follow one hop).
    """
    storage = "text" if is_text_column(target.table.c[target.column]) else "binary"
    spec = spec_for_path(
        target.table.name, target.table.schema, target.column, storage, target.tenant
    )
    # Values carry the tag of the migration's label, which may not be table.column.
    return dataclasses.replace(spec, label=target.label)


def spec_for_path(
    table: str, schema: str | None, column: str, storage: str, tenant: TenantPath
) -> dbchecks.ColumnSpec:
    practice: str | None = None
    parent: dbchecks.Parent | None = None
    steps = tenant.steps
    if not steps:
        practice = tenant.column
    elif len(steps) == 1:
        (step,) = steps
        parent = dbchecks.Parent(
            fk=step.child_col,
            table=step.parent,
            schema=schema,
            key=step.parent_col,
            practice=tenant.column,
        )
    return dbchecks.ColumnSpec(
        table=table,
        schema=schema,
        column=column,
        storage=storage,  # type: ignore[arg-type]
        practice=practice,
        parent=parent,
        mode="v2",
    )
