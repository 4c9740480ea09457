"""The source code ``carnet migrate scaffold`` writes: the expand and contract
revisions and the migrating-phase and final models, rendered from a
:class:`~carnet.migrate.scaffold.Scaffold` (built there from the reflected table)."""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from .scaffold import ColumnMove, Scaffold


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


def render_expand(sc: Scaffold, t: sa.Table, revises: str | None, branch: str | None) -> str:
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


def render_contract(sc: Scaffold) -> str:
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


def render_model(sc: Scaffold, t: sa.Table, pk: list[str]) -> str:
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


def render_final(sc: Scaffold, t: sa.Table, pk: list[str]) -> str:
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
