"""``carnet migrate scaffold``: the expand and contract migrations, and the models of each phase.

Moving identifiers (names, phones, birth dates) to sealed columns with blind
indexes takes two Alembic revisions and a model for the phase in between
(docs/migration.md, "Identifiers"), then a model for the final phase. This
module writes them from the reflected table, so that the names, types, labels
and checks agree with what ``carnet migrate run --into ... --index ...`` and
``contract`` expect:

- the expand revision: one sealed column per identifier moved ``--into`` a
  new column (sized for the carnet type that reads it), carnet's database
  checks on it from the start (``op.carnet_install_checks``), one BIGINT per
  blind index with its index on (practice, index), and the legacy columns
  made nullable; for a column migrated in place, the checks of the mixed
  phase instead;
- the contract revision: ``contract(...)`` per new column (refuses until
  ``finish`` recorded it strict), ``require_strict`` per in-place column;
- a Python module with the migrating-phase declarative class: the legacy
  columns, the sealed ones with the legacy labels, the blind indexes with
  explicit labels, and the legacy columns each index falls back on;
- a module with the final phase's class: the sealed columns under the legacy
  names, strict, the blind indexes over them.

Nothing here touches the database beyond reading its schema and counting rows
per practice (to propose the bits of each blind index).
"""

from __future__ import annotations

import datetime
import keyword
import re
import shlex
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .. import transforms
from ..errors import ConfigurationError
from ..planner import plan_bits
from ..reflect import DATE, _plaintext_kind, resolve, resolve_table

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TRANSFORMS = {
    name: getattr(transforms, name) for name in transforms.__all__ if name != "Transform"
}
# Different normalised values a birth date can take (a century of days): with
# fewer distinct values than rows, more bits would not narrow a lookup further.
_DATE_VALUES = 36_500


@dataclass(frozen=True)
class ColumnMove:
    """One identifier: its legacy column, where it is sealed, and the carnet type that reads it."""

    legacy: str
    new: str  # == legacy: in place
    kind: str  # reflect.TEXT or reflect.DATE
    length: int | None  # the legacy VARCHAR's length, if any
    legacy_type: str  # the legacy column's type as Python source
    nullable: bool

    @property
    def in_place(self) -> bool:
        return self.new == self.legacy

    def carnet_type(self, **kw: str) -> str:
        """The carnet type as Python source, with ``kw`` as keyword arguments (already quoted)."""
        head, args = self.carnet_call(**kw)
        return f"{head}({', '.join(args)})"

    def carnet_call(self, **kw: str) -> tuple[str, list[str]]:
        """The carnet type as (callable, arguments), for :func:`_call` to lay out."""
        args = [f"{k}={v}" for k, v in kw.items()]
        if self.in_place:
            return "carnet.EncryptedText", args
        if self.kind == DATE:
            return "carnet.EncryptedDate", args
        if self.length is not None:
            return "carnet.EncryptedString", [str(self.length), *args]
        return "carnet.EncryptedText", args

    @property
    def python_type(self) -> str:
        return "datetime.date" if self.kind == DATE else "str"


@dataclass(frozen=True)
class IndexSpec:
    """A blind index to declare: over the (legacy names of the) columns it indexes."""

    name: str
    columns: tuple[str, ...]
    transform: str
    bits: int
    bits_reason: str


@dataclass(frozen=True)
class ParentPractice:
    """The practice on a parent row, one foreign key up: ``table.fk -> parent.key``."""

    fk: str
    table: str
    key: str
    practice: str
    relationship: str  # the attribute the model reaches the parent through
    cls: str  # the parent's minimal class in the generated modules
    key_source: str  # the parent key's type, as Python source
    key_annotation: str
    practice_source: str
    practice_annotation: str


@dataclass
class Scaffold:
    """The files, as text, and what the operator runs next."""

    table: str
    tenant: str
    columns: list[ColumnMove]
    indexes: list[IndexSpec]
    model_class: str
    module: str
    expand_revision: str
    contract_revision: str
    expand: str = ""
    contract: str = ""
    model: str = ""
    final: str = ""
    parent: ParentPractice | None = None
    final_class: str = ""
    files: dict[str, str] = field(default_factory=dict)
    # Where the model module was written: the printed commands import it from there.
    app_dir: str = "."
    warnings: list[str] = field(default_factory=list)

    @property
    def file_names(self) -> dict[str, str]:
        return {
            "expand": f"{self.expand_revision}_expand_{self.table}.py",
            "contract": f"{self.contract_revision}_contract_{self.table}.py",
            "model": f"{self.module}.py",
            "final": f"{self.module}_final.py",
        }

    def commands(self) -> list[str]:
        """``carnet migrate run`` then ``finish``, per column, each index with its last column."""
        last_of = {ix.name: max(self._position(c) for c in ix.columns) for ix in self.indexes}
        run: list[str] = []
        fin: list[str] = []
        for i, c in enumerate(self.columns):
            base = f"--table {self.table} --column {c.legacy}"
            if not c.in_place:
                base += f" --into {c.new}"
            base += f" --tenant {self.tenant_option}"
            idx = "".join(
                f" --index {self.module}:{self.model_class}.{ix.name}"
                for ix in self.indexes
                if last_of[ix.name] == i
            )
            if idx:
                idx = f" --app-dir {shlex.quote(self.app_dir)}" + idx
            run.append(f"carnet migrate run {base}{idx}")
            fin.append(f"carnet migrate finish {base}{idx}")
        return run + fin

    @property
    def tenant_option(self) -> str:
        """``--tenant`` as ``carnet migrate run`` takes it."""
        p = self.parent
        return self.tenant if p is None else f"{p.table}.{p.practice}"

    @property
    def tenant_attr(self) -> str:
        """The carnet types' ``tenant=``: a column of the row, or through the relationship."""
        p = self.parent
        return self.tenant if p is None else f"{p.relationship}.{p.practice}"

    def practice_args(self) -> list[str]:
        """``practice=`` or ``parent=`` of the checks op."""
        p = self.parent
        if p is None:
            return [f"practice={_q(self.tenant)}"]
        return [f"parent=({_q(p.fk)}, {_q(p.table)}, {_q(p.key)}, {_q(p.practice)})"]

    def _position(self, legacy: str) -> int:
        return [c.legacy for c in self.columns].index(legacy)

    def as_dict(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "tenant": self.tenant_option,
            "columns": [
                {"column": c.legacy, "into": None if c.in_place else c.new, "type": c.kind}
                for c in self.columns
            ],
            "indexes": [
                {
                    "name": ix.name,
                    "columns": list(ix.columns),
                    "transform": ix.transform,
                    "bits": ix.bits,
                    "bits_reason": ix.bits_reason,
                }
                for ix in self.indexes
            ],
            "revisions": {"expand": self.expand_revision, "contract": self.contract_revision},
            "files": dict(self.files),
            "next": self.commands(),
            "warnings": list(self.warnings),
        }


def _ident(name: str, what: str) -> str:
    if not _IDENT.match(name) or keyword.iskeyword(name):
        raise ConfigurationError(f"{what} must be a Python identifier, got {name!r}")
    return name


def _type_source(col: sa.Column[Any]) -> str:
    """A reflected column's type as portable SQLAlchemy source (``sa.String(length=20)``)."""
    try:
        generic = col.type.as_generic()
    except NotImplementedError:
        raise ConfigurationError(
            f"{col.table.name}.{col.name}: its type has no portable SQLAlchemy equivalent"
        ) from None
    return f"sa.{generic!r}"


_ANNOTATIONS: dict[Any, str] = {
    int: "int",
    str: "str",
    bytes: "bytes",
    bool: "bool",
    float: "float",
    datetime.date: "datetime.date",
    datetime.datetime: "datetime.datetime",
}


def _annotation(col: sa.Column[Any]) -> str:
    """The ``Mapped[...]`` of a reflected key column (``Any`` when its Python type is unusual)."""
    try:
        py = col.type.as_generic().python_type
    except NotImplementedError:
        return "Any"
    base = _ANNOTATIONS.get(py, "Any")
    return base if base == "Any" or not col.nullable else f"{base} | None"


def parse_into(values: tuple[str, ...], columns: tuple[str, ...]) -> dict[str, str]:
    """``--into NEW`` (one ``--column``) or ``--into LEGACY=NEW`` (any number)."""
    out: dict[str, str] = {}
    for v in values:
        legacy, sep, new = v.partition("=")
        if not sep:
            if len(columns) != 1:
                raise ConfigurationError(
                    "with several --column, give --into as LEGACY=NEW (e.g. --into phone=phone_enc)"
                )
            legacy, new = columns[0], v
        if legacy not in columns:
            raise ConfigurationError(f"--into {v!r}: {legacy!r} is not one of the --column")
        if legacy in out:
            raise ConfigurationError(f"--into given twice for {legacy!r}")
        out[legacy] = _ident(new, "--into")
    return out


def parse_index(value: str) -> tuple[str, tuple[str, ...], str | None, int | None]:
    """``NAME=COL[,COL...][:TRANSFORM[:BITS]]`` -> (name, columns, transform, bits)."""
    name, sep, rest = value.partition("=")
    if not sep or not rest:
        raise ConfigurationError(
            f"--index must look like NAME=COLUMN[,COLUMN][:TRANSFORM[:BITS]], got {value!r}"
        )
    parts = rest.split(":")
    if len(parts) > 3:
        raise ConfigurationError(f"--index {value!r}: at most COLUMNS:TRANSFORM:BITS")
    cols = tuple(c.strip() for c in parts[0].split(","))
    transform = parts[1] if len(parts) > 1 and parts[1] else None
    bits: int | None = None
    if len(parts) > 2:
        try:
            bits = int(parts[2])
        except ValueError:
            raise ConfigurationError(f"--index {value!r}: BITS must be a whole number") from None
        if not 1 <= bits <= 63:
            raise ConfigurationError(f"--index {value!r}: BITS must be between 1 and 63")
    if transform is not None and transform not in _TRANSFORMS:
        raise ConfigurationError(
            f"--index {value!r}: unknown transform {transform!r} "
            f"(one of {', '.join(sorted(_TRANSFORMS))})"
        )
    return _ident(name.strip(), "--index NAME"), cols, transform, bits


def _default_transform(moves: list[ColumnMove]) -> str:
    if len(moves) == 2:
        return "initial_lastname"
    if len(moves) == 1:
        return "date_iso" if moves[0].kind == DATE else "folded"
    raise ConfigurationError(
        "an index over more than two columns needs a transform that takes them"
    )


def _rows_per_practice(engine: sa.Engine, table: sa.Table, tenant: str) -> int:
    col = table.c[tenant]
    counts = sa.select(sa.func.count().label("n")).select_from(table).group_by(col).subquery()
    with engine.connect() as conn:
        most = conn.execute(sa.select(sa.func.max(counts.c.n))).scalar()
    return int(most or 0)


def build(
    engine: sa.Engine,
    table: str,
    columns: tuple[str, ...],
    *,
    tenant: str,
    into: tuple[str, ...] = (),
    indexes: tuple[str, ...] = (),
    revises: str | None = None,
    branch_label: str | None = None,
    model_class: str | None = None,
    module: str | None = None,
) -> Scaffold:
    """Reflect ``table`` and render the expand and contract revisions and the model module."""
    if not columns:
        raise ConfigurationError("name at least one --column")
    if len(set(columns)) != len(columns):
        raise ConfigurationError("a --column is given twice")
    t = resolve_table(engine, table)
    if t.schema is not None:
        # add_encrypted_column, contract and the checks op would need it on every call.
        raise ConfigurationError("scaffold writes migrations for tables of the default schema only")
    pk = [c.name for c in t.primary_key.columns]
    if not pk:
        raise ConfigurationError(f"table {t.name!r} has no primary key")
    parent: ParentPractice | None = None
    t_table, _, t_col = tenant.rpartition(".")
    if t_table and t_table != t.name:
        parent = _parent(engine, t, pk[0], tenant)
        if indexes:
            # carnet.search filters the index on the row's practice column.
            raise ConfigurationError(
                "a blind index needs the practice as a column of its row; with the practice "
                f"on {parent.table}, migrate without --index (or copy the practice onto "
                f"{t.name} first)"
            )
        tenant = parent.fk
    else:
        tenant = t_col
    if tenant not in t.c:
        raise ConfigurationError(f"table {t.name!r} has no column {tenant!r}")
    targets = parse_into(into, columns)
    moves: list[ColumnMove] = []
    for name in columns:
        if name not in t.c:
            raise ConfigurationError(f"table {t.name!r} has no column {name!r}")
        if name in pk or name == tenant:
            raise ConfigurationError(f"{t.name}.{name} is a key or the practice: not migrated")
        new = targets.get(name, name)
        if new != name and new in t.c:
            raise ConfigurationError(
                f"table {t.name!r} already has a column {new!r}: has the expand migration run?"
            )
        col = t.c[name]
        kind = _plaintext_kind(col, None if new == name else new)
        length = getattr(col.type, "length", None)
        moves.append(
            ColumnMove(
                legacy=name,
                new=new,
                kind=kind,
                length=length if isinstance(length, int) else None,
                legacy_type=_type_source(col),
                nullable=bool(col.nullable),
            )
        )
    news = [m.new for m in moves]
    if len(set(news)) != len(news):
        raise ConfigurationError("two columns are moved into the same --into column")
    by_legacy = {m.legacy: m for m in moves}
    rows = None
    specs: list[IndexSpec] = []
    for value in indexes:
        name, cols, transform, bits = parse_index(value)
        if name in t.c or name in news or any(s.name == name for s in specs):
            raise ConfigurationError(f"--index {name!r}: the name of an existing column")
        for c in cols:
            if c not in by_legacy:
                raise ConfigurationError(
                    f"--index {name!r}: {c!r} is not one of the --column (an index is "
                    "computed from sealed columns)"
                )
        transform = transform or _default_transform([by_legacy[c] for c in cols])
        arity = _TRANSFORMS[transform].arity
        if arity != len(cols):
            raise ConfigurationError(
                f"--index {name!r}: transform {transform} takes {arity} column(s), "
                f"{len(cols)} given"
            )
        if bits is None:
            if rows is None:
                rows = _rows_per_practice(engine, t, tenant)
            date = transform == "date_iso"
            plan = plan_bits(max(rows, 1), distinct_values=_DATE_VALUES if date else None)
            bits = plan.bits
            reason = f"carnet.plan_bits: {rows} rows in the largest practice today" + (
                f", {_DATE_VALUES} possible dates" if date else ""
            )
        else:
            reason = "given"
        specs.append(IndexSpec(name, cols, transform, bits, reason))
    cls = _ident(model_class or "Migrating" + _camel(t.name), "--model-class")
    mod = _ident(module or f"{t.name}_migrating", "--module")
    sc = Scaffold(
        table=t.name,
        tenant=tenant,
        columns=moves,
        indexes=specs,
        model_class=cls,
        module=mod,
        parent=parent,
        expand_revision=uuid.uuid4().hex[-12:],
        contract_revision=uuid.uuid4().hex[-12:],
    )
    for m in moves:
        if m.in_place and m.length is not None:
            sc.warnings.append(
                f"{t.name}.{m.legacy} is a VARCHAR({m.length}) sealed in place: its "
                "ciphertext is much longer than the value; `carnet migrate plan` counts the "
                "values that would not fit (or move it --into a new column)"
            )
    sc.expand = _render_expand(sc, t, revises, branch_label)
    sc.contract = _render_contract(sc)
    sc.model = _render_model(sc, t, pk)
    sc.final_class = cls.removeprefix("Migrating") or _camel(t.name)
    sc.final = _render_final(sc, t, pk)
    return sc


def _parent(engine: sa.Engine, t: sa.Table, any_column: str, tenant: str) -> ParentPractice:
    """The practice one foreign key up, found as ``carnet migrate run`` finds it."""
    # reflect.resolve walks the foreign keys (the shortest path, refused when
    # ambiguous) exactly as the migration commands will.
    path = resolve(engine, t.name, any_column, tenant=tenant).tenant
    if len(path.steps) != 1:
        raise ConfigurationError(
            f"the practice is {len(path.steps)} foreign keys away from {t.name}: scaffold "
            "writes models for a practice on the row or on its direct parent"
        )
    (step,) = path.steps
    pt = resolve_table(engine, step.parent)
    rel = step.child_col.removesuffix("_id")
    if rel == step.child_col or rel in t.c or not _IDENT.match(rel) or keyword.iskeyword(rel):
        rel = f"{step.parent}_row"
    return ParentPractice(
        fk=step.child_col,
        table=step.parent,
        key=step.parent_col,
        practice=path.column,
        relationship=rel,
        cls=_camel(step.parent) + "Row",
        key_source=_type_source(pt.c[step.parent_col]),
        key_annotation=_annotation(pt.c[step.parent_col]),
        practice_source=_type_source(pt.c[path.column]),
        practice_annotation=_annotation(pt.c[path.column]),
    )


def write(sc: Scaffold, out: Path) -> dict[str, str]:
    """Write the files into ``out`` (created); refuse to overwrite any file."""
    out.mkdir(parents=True, exist_ok=True)
    names = sc.file_names
    for name in names.values():
        if (out / name).exists():
            raise ConfigurationError(f"{out / name} exists: not overwritten")
    texts = {"expand": sc.expand, "contract": sc.contract, "model": sc.model, "final": sc.final}
    for key, name in names.items():
        (out / name).write_text(texts[key], encoding="utf-8")
        sc.files[key] = str(out / name)
    sc.app_dir = str(out)
    return dict(sc.files)


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", name) if p)


def _q(s: str) -> str:
    """A string literal in the double quotes the formatter writes."""
    r = repr(s)
    if r.startswith("'") and '"' not in s:
        r = '"' + r[1:-1] + '"'
    return r


def _tuple(items: tuple[str, ...]) -> str:
    inner = ", ".join(_q(i) for i in items)
    return f"({inner},)" if len(items) == 1 else f"({inner})"


WIDTH = 100  # the line length of carnet's own formatter settings


Arg = str | tuple[str, list[str]]  # source, or a call (callable, arguments) to lay out


def _flat(arg: Arg) -> str:
    return arg if isinstance(arg, str) else f"{arg[0]}({', '.join(_flat(a) for a in arg[1])})"


def _call(indent: str, head: str, args: Sequence[Arg], tail: str = "") -> list[str]:
    """``head(args)tail`` on one line if it fits, else one argument per line (a call
    argument that does not fit laid out the same way), with the formatter's trailing commas."""
    one = f"{indent}{head}({', '.join(_flat(a) for a in args)}){tail}"
    if len(one) <= WIDTH:
        return [one]
    inner = indent + "    "
    lines = [f"{indent}{head}("]
    for a in args:
        if isinstance(a, str) or len(f"{inner}{_flat(a)},") <= WIDTH:
            lines.append(f"{inner}{_flat(a)},")
        else:
            lines += _call(inner, a[0], a[1], ",")
    return [*lines, f"{indent}){tail}"]


def _checks_call(sc: Scaffold, m: ColumnMove) -> list[str]:
    storage = "text" if m.in_place else "binary"
    mode = "mixed" if m.in_place else "v2"
    args = [
        _q(sc.table),
        _q(m.new),
        *sc.practice_args(),
        f"storage={_q(storage)}",
        f"mode={_q(mode)}",
        f"label={_q(f'{sc.table}.{m.legacy}')}",
    ]
    return _call("    ", "op.carnet_install_checks", args)


def _render_expand(sc: Scaffold, t: sa.Table, revises: str | None, branch: str | None) -> str:
    moved = [m for m in sc.columns if not m.in_place]
    in_place = [m for m in sc.columns if m.in_place]
    not_null = [m for m in moved if not m.nullable]
    branch_labels = None
    if revises is None:
        branch_labels = (branch or f"carnet_{sc.table}",)
    lines = [
        f'"""Expand: sealed columns and blind indexes for the identifiers of {sc.table}.',
        "",
        "Written by `carnet migrate scaffold`; review it, then commit it with your migrations.",
        "EDIT: if this table already has revisions, set down_revision to your current head",
        "(`alembic heads`) and branch_labels to None, or keep it a branch of its own.",
        "",
        "Then deploy the application's migrating phase (the model module written beside",
        "this file) and fill the new columns with `carnet migrate run` (docs/migration.md,",
        '"Identifiers: names, phones, birth dates").',
        "",
        f"Revision ID: {sc.expand_revision}",
        f"Revises: {revises or '(none: a branch of its own)'}",
        '"""',
        "",
        "import sqlalchemy as sa",
        "from alembic import op",
        "",
        "import carnet",
        "from carnet.migrate.alembic import add_encrypted_column",
        "",
        f"revision = {_q(sc.expand_revision)}",
        f"down_revision = {_q(revises) if revises else None}",
        f"branch_labels = {_tuple(branch_labels) if branch_labels else None}",
        "depends_on = None",
        "",
        "",
        "def upgrade() -> None:",
    ]
    body: list[str] = []
    if not_null:
        body += [
            "    # The legacy columns become nullable: the application clears them as it",
            "    # writes the sealed ones. First, because on SQLite this copies the table,",
            "    # which would drop the checks' triggers created below.",
            f"    with op.batch_alter_table({_q(sc.table)}) as b:",
        ]
        for m in not_null:
            body += _call(
                "        ",
                "b.alter_column",
                [_q(m.legacy), f"existing_type={m.legacy_type}", "nullable=True"],
            )
    for m in moved:
        body += [
            f"    # {m.legacy} -> {m.new}: sized for the carnet type the application declares.",
            *_call("    ", "add_encrypted_column", [_q(sc.table), _q(m.new), m.carnet_type()]),
            "    # carnet's checks from the start: only well-framed values sealed for the",
            "    # row's own practice, with the legacy column's label (it survives the rename).",
            *_checks_call(sc, m),
        ]
    for m in in_place:
        body += [
            f"    # {m.legacy} is sealed in place: the checks of the mixed phase accept the",
            "    # legacy plaintext but refuse a malformed value or another practice's.",
            "    # `carnet migrate finish` replaces them by the strict ones.",
            *_checks_call(sc, m),
        ]
    for ix in sc.indexes:
        body += [
            f"    # Blind index {ix.name} over {', '.join(ix.columns)}: a BIGINT and the index",
            "    # carnet.BlindIndex declares (lookups filter on the practice and the value).",
            *_call(
                "    ",
                "op.add_column",
                [_q(sc.table), f"sa.Column({_q(ix.name)}, sa.BigInteger(), nullable=True)"],
            ),
            *_call(
                "    ",
                "op.create_index",
                [
                    _q(f"ix_{sc.table}_{ix.name}"),
                    _q(sc.table),
                    f"[{_q(sc.tenant)}, {_q(ix.name)}]",
                ],
            ),
        ]
    lines += body or ["    pass"]
    lines += ["", "", "def downgrade() -> None:"]
    down: list[str] = []
    for m in sc.columns:
        storage = _q("text" if m.in_place else "binary")
        down += _call(
            "    ",
            "op.carnet_drop_checks",
            [_q(sc.table), _q(m.new), *sc.practice_args(), f"storage={storage}"],
        )
    for ix in sc.indexes:
        down += _call("    ", "op.drop_index", [_q(f"ix_{sc.table}_{ix.name}"), _q(sc.table)])
    drops = [ix.name for ix in sc.indexes] + [m.new for m in moved]
    if drops:
        down.append(f"    with op.batch_alter_table({_q(sc.table)}) as b:")
        down += [f"        b.drop_column({_q(c)})" for c in drops]
    if not_null:
        down.append(
            "    # The legacy columns stay nullable: rows written meanwhile may have NULL there."
        )
    lines += down or ["    pass"]
    return _prune_imports("\n".join(lines) + "\n")


def _render_contract(sc: Scaffold) -> str:
    moved = [m for m in sc.columns if not m.in_place]
    in_place = [m for m in sc.columns if m.in_place]
    lines = [
        f'"""Contract: the clear identifiers of {sc.table} dropped, the sealed columns renamed.',
        "",
        "Written by `carnet migrate scaffold`. Refuses to run until `carnet migrate finish`",
        "recorded each column as strict (with --index, finish also checks that every row",
        "has its blind-index values). The blind-index columns stay: their values are bound",
        "to their own labels, not to the names of the columns they index.",
        "",
        "Then deploy the application's final phase: the sealed attributes under the legacy",
        "names, no legacy columns, no mixed_read, the BlindIndex sources renamed, no",
        f"legacy= in carnet.search. Afterwards run `carnet migrate compact --table {sc.table}`",
        "(--vacuum-full on PostgreSQL: a dropped column's bytes stay until the table is",
        "rewritten) and follow its residue report.",
        "",
        f"Revision ID: {sc.contract_revision}",
        f"Revises: {sc.expand_revision}",
        '"""',
        "",
    ]
    if moved:
        lines.append("import carnet")
    names = sorted({"contract"} if moved else set()) + (["require_strict"] if in_place else [])
    lines += [
        f"from carnet.migrate.alembic import {', '.join(names)}",
        "",
        f"revision = {_q(sc.contract_revision)}",
        f"down_revision = {_q(sc.expand_revision)}",
        "branch_labels = None",
        "depends_on = None",
        "",
        "",
        "def upgrade() -> None:",
    ]
    for m in moved:
        lines += _call(
            "    ",
            "contract",
            [
                _q(sc.table),
                f"legacy={_q(m.legacy)}",
                f"new={_q(m.new)}",
                f"type_={m.carnet_type()}",
            ],
        )
    for m in in_place:
        lines += [
            f"    # {m.legacy} was sealed in place: nothing to drop; this guards the deploy of",
            "    # the final model (without mixed_read) behind `carnet migrate finish`.",
            f"    require_strict({_q(sc.table)}, {_q(m.legacy)})",
        ]
    lines += [
        "",
        "",
        "def downgrade() -> None:",
        '    raise RuntimeError("the clear identifiers are gone by design; restore from a backup")',
    ]
    return "\n".join(lines) + "\n"


def _render_model(sc: Scaffold, t: sa.Table, pk: list[str]) -> str:
    moved = [m for m in sc.columns if not m.in_place]
    by_legacy = {m.legacy: m for m in sc.columns}
    cls = sc.model_class
    lines = [
        f'"""The {sc.table} table in its migrating phase, written by `carnet migrate scaffold`.',
        "",
        "Deploy this (merged into your model) after the expand revision and before",
        "`carnet migrate run`. While the migration runs the application",
        "",
        "- writes the sealed column and sets the legacy one to NULL (see `write_*`);",
        "- reads the sealed value first, then the legacy one (see `read_*`);",
        "- finds rows through the blind indexes, falling back on the legacy columns for",
        "  rows not indexed yet (`find`, carnet.search(..., legacy=[...])).",
        "",
        "EDIT: merge the class into your application's model (your declarative base,",
        "your other columns and relationships; the ones here are those the migration",
        "touches), keep the labels as they are, and review the bits of each index",
        "(docs/searchable.md: carnet.plan_bits for the rows you expect, not today's).",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import datetime",
        "from typing import Any",
        "",
        "import sqlalchemy as sa",
        f"from sqlalchemy.orm import {_orm_names(sc)}",
        "",
        "import carnet",
        "from carnet import transforms",
        "",
        f"TENANT = {_q(sc.tenant_attr)}",
        "",
        "",
        "class Base(DeclarativeBase):  # EDIT: your application's declarative base",
        "    pass",
        "",
        "",
        *_parent_class(sc),
        f"class {cls}(Base):",
        f"    __tablename__ = {_q(sc.table)}",
        "",
        "    # EDIT: your other columns and relationships go here too.",
    ]
    lines += _key_columns(sc, t, pk)
    if moved:
        lines += [
            "",
            "    # The legacy clear columns: still read for rows not sealed yet; set to None",
            "    # whenever the sealed column is written. Gone after the contract revision.",
        ]
        for m in moved:
            ann = f"{m.python_type} | None"
            lines += _call("    ", f"{m.legacy}: Mapped[{ann}] = mapped_column", [m.legacy_type])
    lines += [
        "",
        "    # The sealed columns, with the legacy columns' labels: the contract renames",
        "    # them to the legacy names and the stored values stay valid.",
    ]
    for m in sc.columns:
        kw = {"tenant": "TENANT", "label": _q(f"{sc.table}.{m.legacy}")}
        if m.in_place:
            kw.update(storage=_q("text"), mixed_read="True")
            lines.append(
                "    # Sealed in place: mixed_read returns legacy plaintext as it is; remove it"
            )
            lines.append("    # once `carnet migrate finish` recorded the column strict.")
        lines += _call(
            "    ",
            f"{m.new}: Mapped[{m.python_type} | None] = mapped_column",
            [m.carnet_call(**kw)],
        )
    if sc.indexes:
        lines += [
            "",
            "    # Blind indexes over the sealed columns, with explicit labels: their values",
            "    # stay valid when the contract renames the columns they are computed from.",
        ]
    for ix in sc.indexes:
        lines += [
            f"    {ix.name} = carnet.BlindIndex(",
            *(f"        {_q(by_legacy[c].new)}," for c in ix.columns),
            f"        transform=transforms.{ix.transform},",
            f"        bits={ix.bits},  # {ix.bits_reason}",
            f"        label={_q(f'{sc.table}.{ix.name}')},",
            "    )",
        ]
    if moved:
        lines += [
            "",
            "    # Reading and writing an identifier during the migration.",
        ]
        for m in moved:
            lines += [
                "",
                f"    def read_{m.legacy}(self) -> {m.python_type} | None:",
                f"        return self.{m.new} if self.{m.new} is not None else self.{m.legacy}",
                "",
                f"    def write_{m.legacy}(self, value: {m.python_type} | None) -> None:",
                f"        self.{m.new}, self.{m.legacy} = value, None",
            ]
    if not sc.indexes:
        return _prune_imports("\n".join(lines) + "\n")
    lines += [
        "",
        "",
        "# Each blind index: the column(s) holding the legacy values a lookup compares",
        "# for rows not indexed yet (a column sealed in place is its own: mixed_read).",
        "LEGACY_SOURCES: dict[str, tuple[str, ...]] = {",
    ]
    for ix in sc.indexes:
        lines.append(f"    {_q(ix.name)}: {_tuple(ix.columns)},")
    lines += [
        "}",
        "",
        "",
        f"def find(session: Any, index: str, value: Any, practice: str) -> list[{cls}]:",
        f'    """The {sc.table} of ``practice`` whose ``index`` matches ``value``, exact, during',
        '    the migration (carnet.search decrypts and compares every candidate)."""',
        f"    legacy = [getattr({cls}, c) for c in LEGACY_SOURCES[index]]",
        f"    attr = getattr({cls}, index)",
        "    return carnet.search(session, attr, value, tenant=practice, legacy=legacy)",
    ]
    return _prune_imports("\n".join(lines) + "\n")


def _key_columns(sc: Scaffold, t: sa.Table, pk: list[str]) -> list[str]:
    lines: list[str] = []
    p = sc.parent
    for name in dict.fromkeys([*pk, sc.tenant]):
        col = t.c[name]
        args = [_type_source(col), *(["primary_key=True"] if name in pk else [])]
        if p is not None and name == p.fk:
            args.insert(1, f"sa.ForeignKey({_q(f'{p.table}.{p.key}')})")
        lines += _call("    ", f"{name}: Mapped[{_annotation(col)}] = mapped_column", args)
    if p is not None:
        lines.append("    # The practice is the parent's: the carnet types read it through this.")
        lines += _call("    ", f"{p.relationship}: Mapped[{p.cls}] = relationship", [p.cls])
    return lines


def _orm_names(sc: Scaffold) -> str:
    names = ["DeclarativeBase", "Mapped", "mapped_column"]
    return ", ".join([*names, "relationship"] if sc.parent is not None else names)


def _parent_class(sc: Scaffold) -> list[str]:
    """The parent's minimal class: its key and its practice (EDIT: the application's own)."""
    p = sc.parent
    if p is None:
        return []
    return [
        f"class {p.cls}(Base):  # EDIT: your application's class of {p.table}",
        f"    __tablename__ = {_q(p.table)}",
        "",
        *_call(
            "    ",
            f"{p.key}: Mapped[{p.key_annotation}] = mapped_column",
            [p.key_source, "primary_key=True"],
        ),
        *(
            []
            if p.practice == p.key
            else _call(
                "    ",
                f"{p.practice}: Mapped[{p.practice_annotation}] = mapped_column",
                [p.practice_source],
            )
        ),
        "",
        "",
    ]


def _render_final(sc: Scaffold, t: sa.Table, pk: list[str]) -> str:
    """The model after the contract: the sealed columns under the legacy names, strict."""
    cls = sc.final_class
    lines = [
        f'"""The {sc.table} table after the contract, written by `carnet migrate scaffold`.',
        "",
        "Deploy this (merged into your model) once the contract revision has run: the",
        "sealed columns carry the legacy names, nothing is read in clear any more, and",
        "lookups go through the blind indexes alone (carnet.search without legacy=).",
        "EDIT: merge it into your application's model, as the migrating phase's.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import datetime",
        "from typing import Any",
        "",
        "import sqlalchemy as sa",
        f"from sqlalchemy.orm import {_orm_names(sc)}",
        "",
        "import carnet",
        "from carnet import transforms",
        "",
        f"TENANT = {_q(sc.tenant_attr)}",
        "",
        "",
        "class Base(DeclarativeBase):  # EDIT: your application's declarative base",
        "    pass",
        "",
        "",
        *_parent_class(sc),
        f"class {cls}(Base):",
        f"    __tablename__ = {_q(sc.table)}",
        "",
        "    # EDIT: your other columns and relationships go here too.",
        *_key_columns(sc, t, pk),
        "",
        "    # Sealed, strict: a value that is not valid ciphertext raises, never returned.",
    ]
    for m in sc.columns:
        kw = {"tenant": "TENANT", "label": _q(f"{sc.table}.{m.legacy}")}
        if m.in_place:
            kw["storage"] = _q("text")
        lines += _call(
            "    ",
            f"{m.legacy}: Mapped[{m.python_type} | None] = mapped_column",
            [m.carnet_call(**kw)],
        )
    if sc.indexes:
        lines.append("")
    for ix in sc.indexes:
        lines += [
            f"    {ix.name} = carnet.BlindIndex(",
            *(f"        {_q(c)}," for c in ix.columns),
            f"        transform=transforms.{ix.transform},",
            f"        bits={ix.bits},",
            f"        label={_q(f'{sc.table}.{ix.name}')},",
            "    )",
        ]
    return _prune_imports("\n".join(lines) + "\n")


def _prune_imports(text: str) -> str:
    """Drop the imports a generated module ends up not using (no date, no blind index)."""
    for line, use in (
        ("import datetime\n", "datetime."),
        ("from carnet import transforms\n", "transforms."),
        ("from typing import Any\n", "Any"),
        ("import sqlalchemy as sa\n", "sa."),
    ):
        head, sep, rest = text.partition(line)
        if sep and not re.search(rf"\b{re.escape(use)}", rest):
            text = head + rest
    # A group of imports emptied leaves two blank lines where one separates groups.
    return re.sub(r"(?m)^(from __future__ import annotations\n)\n\n+", r"\1\n", text)
