"""``carnet export``: a practice's rows decrypted to JSON Lines (:mod:`carnet.export`)."""

from __future__ import annotations

from typing import Any

import click

from . import lifecycle
from ._cli import (
    Config,
    Progress,
    app_option,
    batch_size_option,
    echo,
    emit,
    json_option,
    pass_config,
    plural,
)
from .errors import ConfigurationError


def _default_principal() -> str:
    import getpass

    try:
        return f"carnet-export:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in this environment
        return "carnet-export"


@click.command()
@click.option("--tenant", required=True, metavar="P", help="The practice to export.")
@click.option(
    "--table",
    "tables",
    multiple=True,
    metavar="T",
    help="A table to export (repeatable); with --app, only these of the application's.",
)
@click.option(
    "--tenant-column",
    default="practice_id",
    show_default=True,
    metavar="COL",
    help="Column of the row's practice, for --table without --app.",
)
@app_option
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="JSON Lines file, created with mode 0600; an unfinished one is resumed.",
)
@click.option(
    "--principal",
    metavar="ID",
    help="Who the reads are audited as (default carnet-export:<user name>).",
)
@batch_size_option(500)
@click.option("--restart", is_flag=True, help="Replace FILE instead of resuming it.")
@json_option
@pass_config
def export(
    cfg: Config,
    tenant: str,
    tables: tuple[str, ...],
    tenant_column: str,
    app: str | None,
    out: str,
    principal: str | None,
    batch_size: int,
    restart: bool,
    as_json: bool,
) -> None:
    """Write a practice's rows, decrypted, to a JSON Lines file (mode 0600). Resumable.

    The tables are those the application declares with encrypted columns
    (--app module:Base), or the --table names given (their practice in
    --tenant-column). Every value opened is audited as a read.
    """
    from . import export as ex
    from .audit import Auditor, principal_scope

    if app is None and not tables:
        raise click.UsageError("give --app MODULE:ATTR or --table T (repeatable)")
    manager = cfg.manager()
    lifecycle.require_tenant(manager, tenant)  # a typo fails before any file is made
    if app is not None:
        from . import doctor

        specs = ex.tables_from_metadata(doctor.app_metadata(doctor.load_app(app)))
        if tables:
            unknown = sorted(set(tables) - {s.table for s in specs})
            if unknown:
                raise ConfigurationError(
                    f"{app} declares no encrypted column in {', '.join(unknown)}"
                )
            specs = [s for s in specs if s.table in tables]
    else:
        specs = ex.tables_by_name(manager, list(tables), tenant_column)
    events: list[Any] = []
    auditor = None
    if manager.decrypt_hook is None:
        auditor = Auditor(sink=events.append).install(manager)
    who = principal or _default_principal()
    bar = Progress("export", ex.count_rows(manager, specs, tenant), quiet=as_json)
    try:
        with principal_scope(who):
            rep = ex.export_tenant(
                manager,
                tenant,
                specs,
                out,
                batch_size=batch_size,
                restart=restart,
                progress=bar.update,
            )
        bar.finish()
    finally:
        bar.close()
        if auditor is not None:
            auditor.flush()
    data = rep.as_dict()
    data["principal"] = who
    data["audit"] = [
        {"principal": e.principal, "tenant": e.tenant, "field": e.field, "count": e.count}
        for e in events
    ]

    def text() -> None:
        if rep.already_complete:
            echo(f"{out} is already a finished export of {tenant}: nothing written")
            return
        echo(
            f"exported {plural(sum(rep.tables.values()), 'row')} of {tenant} to {out} (mode 0600)"
            + (f", resuming after {rep.resumed_after:,}" if rep.resumed_after else "")
        )
        for t, n in rep.tables.items():
            echo(f"  {t}: {plural(n, 'row')}")
        for e in data["audit"]:
            echo(f"audited: {e['count']:,} value(s) of {e['field']} read by {e['principal']}")

    emit(as_json, data, text)
