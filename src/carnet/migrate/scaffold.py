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

import keyword
import re
import shlex
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .. import transforms
from ..errors import ConfigurationError
from ..planner import plan_bits
from ..reflect import DATE, _plaintext_kind, resolve, resolve_table
from .scaffold_render import (
    _annotation,
    _camel,
    _q,
    _type_source,
    render_contract,
    render_expand,
    render_final,
    render_model,
)

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
    sc.expand = render_expand(sc, t, revises, branch_label)
    sc.contract = render_contract(sc)
    sc.model = render_model(sc, t, pk)
    sc.final_class = cls.removeprefix("Migrating") or _camel(t.name)
    sc.final = render_final(sc, t, pk)
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
