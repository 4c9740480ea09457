"""``carnet decoys``: plant, list and remove decoy notes (:mod:`carnet.decoys`)."""

from __future__ import annotations

import click

from . import decoys
from ._cli import Config, confirm, echo, emit, json_option, printable, yes_option

__all__ = ["decoys_group"]


def _config() -> Config:
    cfg = click.get_current_context().find_object(Config)
    if cfg is None:  # pragma: no cover - registered under carnet's group only
        raise click.UsageError("run as `carnet decoys`")
    return cfg


@click.group("decoys")
def decoys_group() -> None:
    """Decoy notes: values no screen opens, whose opening raises the alarm."""


@decoys_group.command("plant")
@click.option("--table", required=True, metavar="T", help="The application table.")
@click.option("--column", required=True, metavar="C", help="Its encrypted column.")
@click.option("--practice", required=True, metavar="P", help="The practice the decoys belong to.")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 10_000))
@click.option(
    "--tenant-column",
    default="practice_id",
    show_default=True,
    metavar="COL",
    help="Column of the row's practice.",
)
@click.option("--label", metavar="L", help="Field label (default table.column).")
@json_option
def plant(
    table: str,
    column: str,
    practice: str,
    count: int,
    tenant_column: str,
    label: str | None,
    as_json: bool,
) -> None:
    """Insert COUNT decoy rows (the table's other columns must be nullable or defaulted;
    otherwise plant from the application with carnet.decoys.plant(..., other=...))."""
    cfg = _config()
    keys = cfg.manager()
    rows = decoys.plant(
        keys,
        keys.engine,
        table,
        column,
        practice,
        count,
        tenant_column=tenant_column,
        label=label,
    )
    out = {"table": table, "column": column, "practice": practice, "planted": rows}
    emit(
        as_json,
        out,
        lambda: echo(f"planted {len(rows)} decoy note(s) in {table}.{column} for {practice!r}"),
    )


@decoys_group.command("list")
@click.option("--practice", metavar="P", help="Only this practice's decoys.")
@json_option
def list_(practice: str | None, as_json: bool) -> None:
    """Where the decoys are (table, column, practice, row)."""
    rows = decoys.list_decoys(_config().manager(open_master=False).engine, practice)

    def text() -> None:
        if not rows:
            echo("no decoys")
            return
        for d in rows:
            echo(
                printable(
                    f"{d['id']}  {d['table_name']}.{d['column_name']}  {d['practice']}  "
                    f"row {d['row_key']}  planted {d['planted_at']}"
                )
            )

    emit(as_json, rows, text)


@decoys_group.command("remove")
@click.option("--practice", metavar="P", help="Every decoy of this practice.")
@click.option("--id", "ids", multiple=True, type=int, help="A decoy by its id (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Every decoy.")
@yes_option()
@json_option
def remove(
    practice: str | None, ids: tuple[int, ...], all_: bool, yes: bool, as_json: bool
) -> None:
    """Delete decoy rows from the application tables, and their records."""
    if not (practice or ids or all_):
        raise click.UsageError("give --practice P, --id N or --all")
    confirm(yes, "Delete these decoy rows from the application tables?")
    n = decoys.remove(_config().manager(open_master=False).engine, practice=practice, ids=ids)
    emit(as_json, {"removed": n}, lambda: echo(f"removed {n} decoy row(s)"))
