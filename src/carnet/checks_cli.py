"""``carnet checks``: install, inspect and drop the database checks of encrypted columns.

For teams without Alembic (docs/operations.md): a table created by
``create_all`` gets its checks with it; a table that existed before (or whose
checks a schema tool dropped) gets them from ``carnet checks install``. The
work is in :mod:`carnet.dbchecks` (``choose_mode``, ``install_chosen``,
``status``); these commands only select the columns and print.

Columns are named by the application's models (``--app module:Base``: every
encrypted column, with its practice column or parent as declared) or one at a
time (``--table T --column C --tenant-column P``, with ``--parent-fk
FK=PARENT.KEY`` when the practice is on a parent row).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import click
import sqlalchemy as sa

from . import dbchecks
from ._cli import Config, confirm, echo, emit, json_option, yes_option
from .errors import ConfigurationError
from .exitcodes import EXIT_FAILED_ROWS

__all__ = ["checks"]


def _config() -> Config:
    cfg = click.get_current_context().find_object(Config)
    if cfg is None:  # pragma: no cover - registered under carnet's group only
        raise click.UsageError("run as `carnet checks`")
    return cfg


def _selection(f: Any) -> Any:
    for opt in reversed(
        [
            click.option(
                "--app",
                metavar="MODULE:ATTR",
                help="The application's MetaData or declarative Base: every encrypted column "
                "it declares.",
            ),
            click.option("--table", metavar="T", help="One table (with --column)."),
            click.option("--column", metavar="C", help="The encrypted column of --table."),
            click.option(
                "--tenant-column",
                metavar="P",
                help="The row's practice column (or the parent's, with --parent-fk).",
            ),
            click.option(
                "--parent-fk",
                metavar="FK=PARENT.KEY",
                help="The practice is on a parent row: e.g. patient_id=patients.id.",
            ),
            click.option(
                "--label",
                metavar="L",
                help="The field label the column's values are sealed for "
                "(default: TABLE.COLUMN, as EncryptedText's label=).",
            ),
            click.option(
                "--mixed-read",
                is_flag=True,
                help="The column is in a migration's mixed-read phase (legacy plaintext "
                "allowed); default: as recorded by `carnet migrate`.",
            ),
        ]
    ):
        f = opt(f)
    return f


def _specs(conn: sa.Connection, kw: dict[str, Any]) -> list[dbchecks.ColumnSpec]:
    app, table, column = kw["app"], kw["table"], kw["column"]
    if app and (table or column or kw["tenant_column"] or kw["parent_fk"] or kw["label"]):
        raise click.UsageError("give --app, or --table/--column, not both")
    if app:
        from .doctor import app_metadata, load_app

        md = app_metadata(load_app(app))
        specs = dbchecks.specs_for_metadata(md, conn.dialect.name)
        if kw["mixed_read"]:
            specs = [replace(s, mode="mixed") for s in specs]
        return specs
    if bool(table) != bool(column):
        raise click.UsageError("give --table and --column together")
    if not table:
        return []
    if not sa.inspect(conn).has_table(table):
        raise ConfigurationError(f"no table {table!r} in the database")
    mixed = kw["mixed_read"] or _migrating(conn, table, column)
    return [
        dbchecks.column_spec(
            conn,
            table,
            column,
            tenant_column=kw["tenant_column"],
            parent_fk=kw["parent_fk"],
            mode="mixed" if mixed else "v2",
            label=kw["label"],
        )
    ]


def _migrating(conn: sa.Connection, table: str, column: str) -> bool:
    """True while ``carnet migrate`` records the column as running (mixed-read), not strict."""
    from . import migrations as state

    rec = state.get(conn, table, column)
    return rec is not None and rec["state"] != state.STRICT and rec["mode"] == "in-place"


def _discovered(cfg: Config, conn: sa.Connection) -> list[dbchecks.ColumnSpec]:
    from . import lifecycle

    manager = cfg.manager(open_master=False)
    out = []
    for table, column in lifecycle.discover_columns(manager):
        mixed = _migrating(conn, table, column)
        out.append(dbchecks.column_spec(conn, table, column, mode="mixed" if mixed else "v2"))
    return out


@click.group("checks")
def checks() -> None:
    """The database's own checks of encrypted columns (format, practice, key)."""


@checks.command("install")
@_selection
@click.option(
    "--mode",
    type=click.Choice(dbchecks.MODES),
    default=None,
    help="v2 (strict), v1 (v1 values accepted too), mixed (legacy plaintext too); "
    "default: the strictest the data allows.",
)
@json_option
def install_cmd(mode: str | None, as_json: bool, **kw: Any) -> None:
    """Create (or replace) the checks; refuses when rows would break them."""
    cfg = _config()
    engine = cfg.engine()
    try:
        with engine.begin() as conn:
            specs = _specs(conn, kw)
            if not specs:
                raise click.UsageError("give --app MODULE:ATTR, or --table T --column C")
            done = dbchecks.install_chosen(conn, specs, mode)  # type: ignore[arg-type]
    finally:
        engine.dispose()
    rows = []
    lines = []
    for spec, census in done:
        rows.append(
            {
                "table": spec.table,
                "column": spec.column,
                "mode": spec.mode,
                "census": census.as_dict(),
            }
        )
        line = f"{spec.table}.{spec.column}: checks installed, mode {spec.mode}"
        if spec.mode == "v1" and census.v1:
            line += (
                f" ({census.v1:,} v1 value(s): `carnet reencrypt --table {spec.table} "
                f"--column {spec.column}` upgrades them and tightens the check to v2)"
            )
        elif spec.mode == "mixed" and census.plaintext:
            line += (
                f" ({census.plaintext:,} legacy plaintext value(s): `carnet migrate finish` "
                "makes the column strict)"
            )
        lines.append(line)
    emit(as_json, {"installed": rows}, lines)


@checks.command("status")
@_selection
@json_option
@click.pass_context
def status_cmd(ctx: click.Context, as_json: bool, **kw: Any) -> None:
    """Each encrypted column: its checks, missing ones, and whether the data allows stricter.

    Without --app or --table, the columns holding carnet values are found in
    the data, and only their format check is looked at (the practice check
    needs to know the practice column: give --app).
    """
    cfg = _config()
    engine = cfg.engine()
    try:
        with engine.connect() as conn:
            specs = _specs(conn, kw) or _discovered(cfg, conn)
            found = dbchecks.status(conn, specs)
    finally:
        engine.dispose()
    data = {"ok": all(c.ok for c in found), "columns": [c.as_dict() for c in found]}

    def text() -> None:
        if not found:
            echo("no encrypted column found")
        for c in found:
            where = f"{c.spec.table}.{c.spec.column}"
            if c.ok:
                echo(f"{where}: ok, mode {c.mode}")
                continue
            why = []
            if c.missing:
                why.append("missing " + ", ".join(c.missing))
            if c.weaker:
                why.append(f"mode {c.mode} while the data allows {c.allowed}")
            echo(f"{where}: FAIL: {'; '.join(why)}")
            echo(f"  fix: {c.fix}")

    emit(as_json, data, text)
    if not data["ok"]:
        ctx.exit(EXIT_FAILED_ROWS)


@checks.command("drop")
@_selection
@yes_option()
@json_option
def drop_cmd(yes: bool, as_json: bool, **kw: Any) -> None:
    """Remove carnet's checks (the database then accepts any value: confirm)."""
    cfg = _config()
    engine = cfg.engine()
    try:
        with engine.connect() as conn:
            specs = _specs(conn, kw)
        if not specs:
            raise click.UsageError("give --app MODULE:ATTR, or --table T --column C")
        names = ", ".join(f"{s.table}.{s.column}" for s in specs)
        confirm(
            yes,
            f"Drop the database checks of {names}? The database will then accept any value "
            "in them, from any client",
        )
        with engine.begin() as conn:
            dbchecks.drop(conn, specs)
    finally:
        engine.dispose()
    emit(
        as_json,
        {"dropped": [{"table": s.table, "column": s.column} for s in specs]},
        [f"{s.table}.{s.column}: checks dropped" for s in specs],
    )
