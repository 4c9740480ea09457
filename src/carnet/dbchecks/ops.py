"""Which mode a column's data allows, and the operations the commands call.

The library side of ``carnet checks``, ``carnet doctor``, ``carnet verify``,
``carnet migrate finish`` and ``carnet reencrypt``: small functions, so the
commands stay thin. The database counts values by format (:func:`census`)
with the very expressions its checks use; nothing is decoded.
"""

# The census is SQL built from identifiers quoted by the dialect and from
# constants of carnet's format: no value is ever interpolated.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa

from ..errors import ConfigurationError
from .columns import ColumnSpec, Mode, install_command, storage_of
from .ddl import Sql, quote
from .installing import install, missing, mode_installed, set_format_mode


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


def census(conn: sa.Connection, spec: ColumnSpec) -> Census:
    """Count ``spec``'s column values by format, with the same expressions the checks use."""
    s = Sql(conn.dialect.name)
    d = conn.dialect
    tbl = quote(d, spec.table, spec.schema)
    col = "t." + quote(d, spec.column)
    st = spec.storage
    label = (spec.field_label, *spec.also_labels)
    f2, f1 = s.format(col, st, "v2", label), s.format(col, st, "v1", label)
    # Legacy plaintext (mixed-read) lives in text columns only.
    fm = s.format(col, st, "mixed", label) if st == "text" else f1

    def n(cond: str) -> str:
        return f"SUM(CASE WHEN {col} IS NOT NULL AND {cond} THEN 1 ELSE 0 END)"

    if spec.practice is not None:
        practice = f"t.{quote(d, spec.practice)}"
    elif spec.parent is not None:
        p = spec.parent
        practice = (
            f"(SELECT pt.{quote(d, p.practice)} FROM {quote(d, p.table, p.schema)} pt "
            f"WHERE pt.{quote(d, p.key)} = t.{quote(d, p.fk)})"
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
