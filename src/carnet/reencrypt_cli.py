"""``carnet reencrypt`` and ``carnet verify``: a pass over a column's values.

``reencrypt`` rewrites each value under its practice's active key
(:mod:`carnet.lifecycle`, resumable through ``carnet_jobs``); ``verify`` reads
each back as the application would (:mod:`carnet.verify`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from . import lifecycle
from ._cli import (
    Config,
    Progress,
    batch_size_option,
    echo,
    emit,
    json_option,
    parse_worker,
    pass_config,
    plural,
    worker_option,
    workers_option,
)
from .errors import ConfigurationError
from .exitcodes import EXIT_FAILED_ROWS


@click.command()
@click.option("--table", metavar="T", help="The table (with --column).")
@click.option("--column", metavar="C", help="The encrypted column of --table.")
@click.option(
    "--app",
    metavar="MODULE:ATTR",
    help="Every encrypted column the application's MetaData or declarative Base declares, "
    "with its label, in one run.",
)
@click.option(
    "--all",
    "all_",
    is_flag=True,
    help="Every column whose stored values are carnet values (found by reading them).",
)
@click.option("--tenant", metavar="T", help="Only values of this practice.")
@batch_size_option(500)
@workers_option
@worker_option()
@click.option("--label", metavar="NEW", help="Field label to seal under (default table.column).")
@click.option(
    "--old-label", metavar="OLD", help="Label some values were sealed under before a rename."
)
@click.option(
    "--job", metavar="NAME", help="Progress record name (default reencrypt:T.C[:tenant])."
)
@click.option("--restart", is_flag=True, help="Ignore recorded progress and start over.")
@json_option
@pass_config
@click.pass_context
def reencrypt(
    ctx: click.Context,
    cfg: Config,
    table: str | None,
    column: str | None,
    app: str | None,
    all_: bool,
    tenant: str | None,
    batch_size: int,
    workers: int,
    worker_spec: str | None,
    label: str | None,
    old_label: str | None,
    job: str | None,
    restart: bool,
    as_json: bool,
) -> None:
    """Move every value to its practice's active data key (and current label). Resumable.

    One column (--table and --column), or every encrypted column in one run:
    those the application declares (--app module:Base) or those found holding
    carnet values (--all). A killed run, started again the same way, resumes.
    """
    chosen = (table is not None or column is not None) + (app is not None) + all_
    if chosen != 1:
        raise click.UsageError("give --table T --column C, or --app MODULE:ATTR, or --all")
    if app is not None or all_:
        if workers != 1 or worker_spec or label or old_label:
            raise click.UsageError(
                "--workers, --worker, --label and --old-label apply to one --table/--column"
            )
        _reencrypt_many(ctx, cfg, app, tenant, batch_size, job, restart, as_json)
        return
    if table is None or column is None:
        raise click.UsageError("give --table and --column together")
    worker = parse_worker(worker_spec)
    if worker is not None and workers != 1:
        raise click.UsageError("--workers and --worker exclude each other")
    manager = cfg.manager()
    lifecycle.require_encrypted(manager, table, column)
    job_name = job or lifecycle.reencrypt_job_name(table, column, tenant)
    total = lifecycle.estimate_rows(manager.engine, table)
    bar = Progress("reencrypt", total if worker is None else None, quiet=as_json)
    try:
        if workers > 1:
            spec = lifecycle.WorkerSpec(
                database_url=cfg.need_url(),
                master_key=cfg.need_master(),
                previous_master_keys=cfg.previous,
                table=table,
                column=column,
                tenant=tenant,
                label=label,
                old_label=old_label,
                batch_size=batch_size,
                job=job_name,
                restart=restart,
            )
            # Position summed over every worker's row in carnet_jobs.
            rep = lifecycle.reencrypt_parallel(spec, workers, poll=lambda p: bar.set(p["scanned"]))
        else:
            rep = lifecycle.reencrypt(
                manager,
                table,
                column,
                tenant=tenant,
                label=label,
                old_label=old_label,
                batch_size=batch_size,
                worker=worker or (0, 1),
                job=job_name,
                restart=restart,
                progress=bar.update,
            )
        bar.finish()
    finally:
        bar.close()
    data = rep.as_dict()

    def text() -> None:
        left = [
            (rep.destroyed, "under destroyed or retired keys (unreadable, left)"),
            (rep.nulls, "NULL"),
            (rep.plaintext, "plaintext (carnet migrate's work)"),
            (rep.other_practice, "of other practices"),
        ]
        echo(
            f"{table}.{column}: {rep.scanned:,} scanned, {rep.rewritten:,} re-encrypted, "
            f"{rep.already_current:,} already current"
            + (f" ({rep.from_v1:,} re-encrypted from format v1)" if rep.from_v1 else "")
            + "".join(f", {n:,} {what}" for n, what in left if n)
            + f", {rep.conflicts:,} written concurrently by the application, "
            f"{len(rep.failed):,} failed in {rep.elapsed:.1f}s"
        )
        if rep.failed:
            echo(_pk_lines(rep.failed, "failed"))

    emit(as_json, data, text)
    if rep.failed:
        ctx.exit(EXIT_FAILED_ROWS)


_OUTCOME_TEXT = {
    "done": "finished before the interruption",
    "not encrypted": "no carnet value yet (carnet migrate's work): left",
    "no table": "declared, not in the database: left",
}


def _reencrypt_many(
    ctx: click.Context,
    cfg: Config,
    app: str | None,
    tenant: str | None,
    batch_size: int,
    job: str | None,
    restart: bool,
    as_json: bool,
) -> None:
    manager = cfg.manager()
    if app is not None:
        from . import doctor

        columns = [
            lifecycle.EncryptedColumn(d.table, d.column, d.label)
            for d in doctor.declared_columns(doctor.load_app(app))
        ]
        if not columns:
            raise ConfigurationError(f"{app} declares no encrypted column")
    else:
        columns = [lifecycle.EncryptedColumn(t, c) for t, c in lifecycle.discover_columns(manager)]
    run = job or lifecycle.run_name("app" if app is not None else "all", tenant)
    bar = Progress("reencrypt", lifecycle.rows_to_scan(manager, columns), quiet=as_json)
    try:
        rep = lifecycle.reencrypt_columns(
            manager,
            columns,
            run=run,
            tenant=tenant,
            batch_size=batch_size,
            restart=restart,
            progress=bar.update,
        )
        bar.finish()
    finally:
        bar.close()

    def text() -> None:
        if rep.resumed:
            echo(f"resumed run {run}")
        for c in rep.columns:
            r = c.report
            if r is None:
                echo(f"{c.table}.{c.column}: {_OUTCOME_TEXT[c.outcome]}")
                continue
            echo(
                f"{c.table}.{c.column}: {r['scanned']:,} scanned, {r['rewritten']:,} "
                f"re-encrypted, {r['already_current']:,} already current"
                + (
                    f", {r['destroyed']:,} under destroyed or retired keys"
                    if r["destroyed"]
                    else ""
                )
                + (f", {r['plaintext']:,} plaintext" if r["plaintext"] else "")
                + (f", {len(r['failed']):,} failed" if r["failed"] else "")
            )
        t = rep.total
        echo(
            f"{plural(len(rep.columns), 'column')}: {t.scanned:,} scanned, {t.rewritten:,} "
            f"re-encrypted, {t.conflicts:,} written concurrently by the application, "
            f"{len(t.failed):,} failed in {rep.elapsed:.1f}s"
        )
        if t.failed:
            echo(_pk_lines(t.failed, "failed"))

    emit(as_json, rep.as_dict(), text)
    if rep.failed:
        ctx.exit(EXIT_FAILED_ROWS)


PK_SHOWN = 20  # primary keys printed; --json lists them all


def _pk_lines(pks: Sequence[Sequence[Any]], what: str) -> str:
    shown = ", ".join(str(list(p)) for p in pks[:PK_SHOWN])
    more = (
        f" (first {PK_SHOWN} of {len(pks):,}; every one with --json)" if len(pks) > PK_SHOWN else ""
    )
    return f"  {what} primary keys{more}: {shown}"


PRACTICES_SHOWN = 50


@click.command()
@click.option("--table", required=True, metavar="T")
@click.option("--column", required=True, metavar="C")
@click.option("--label", metavar="L", help="Field label (default table.column).")
@click.option("--allow-plaintext", is_flag=True, help="Do not count legacy plaintext as failures.")
@click.option(
    "--tenant-column",
    metavar="COL",
    help="Column of the row's practice (practice_id, or parent.practice_id on a "
    "table reached through foreign keys, as for carnet migrate --tenant): also "
    "catch values copied between practices.",
)
@batch_size_option(1000)
@json_option
@pass_config
@click.pass_context
def verify(
    ctx: click.Context,
    cfg: Config,
    table: str,
    column: str,
    label: str | None,
    allow_plaintext: bool,
    tenant_column: str | None,
    batch_size: int,
    as_json: bool,
) -> None:
    """Decrypt every value; report failing rows by primary key, never their content.

    Rows of a crypto-shredded practice are reported as destroyed, not as
    failures: the exit code is 1 only for rows that should open and do not.
    """
    manager = cfg.manager()
    lifecycle.require_encrypted(manager, table, column)
    bar = Progress("verify", lifecycle.estimate_rows(manager.engine, table), quiet=as_json)
    try:
        rep = lifecycle.verify(
            manager,
            table,
            column,
            label=label,
            allow_plaintext=allow_plaintext,
            batch_size=batch_size,
            tenant_column=tenant_column,
            progress=bar.update,
        )
        bar.finish()
    finally:
        bar.close()

    def text() -> None:
        echo(
            f"{table}.{column}: {plural(rep.rows, 'row')}, {rep.ok:,} ok, "
            f"{rep.nulls:,} NULL, {rep.plaintext:,} plaintext, "
            f"{rep.destroyed:,} destroyed (crypto-shredded practices), "
            f"{rep.failed:,} failed"
        )
        for reason, n in sorted(rep.reasons.items()):
            echo(f"  {reason}: {n:,}")
        # Practices with destroyed or failing rows first: those are what to read.
        notable = sorted(
            rep.practices.items(), key=lambda kv: (-(kv[1]["failed"] + kv[1]["destroyed"]), kv[0])
        )
        if notable:
            echo("by practice (ok / destroyed / failed):")
        for practice, c in notable[:PRACTICES_SHOWN]:
            echo(
                f"  {practice or '(unknown key)'}: {c['ok']:,} / {c['destroyed']:,} / "
                f"{c['failed']:,}"
            )
        if len(notable) > PRACTICES_SHOWN:
            echo(f"  … {len(notable) - PRACTICES_SHOWN:,} more practices with --json")
        if rep.failed_pks:
            echo(_pk_lines(rep.failed_pks, "failed"))
        chk = rep.checks
        if chk is not None and not chk["ok"]:
            echo(f"FAIL database checks: {_checks_problem(chk)}")
            echo(f"  fix: {chk['fix']}")

    emit(as_json, rep.as_dict(), text)
    if rep.failed or (rep.checks is not None and not rep.checks["ok"]):
        ctx.exit(EXIT_FAILED_ROWS)


def _checks_problem(chk: dict[str, Any]) -> str:
    why = []
    if chk["disabled"]:
        why.append("disabled or NOT VALID: " + ", ".join(chk["disabled"]))
    if chk["missing"]:
        why.append("missing: " + ", ".join(chk["missing"]))
    if chk["weaker"]:
        why.append(f"mode {chk['mode']} while the data allows {chk['allowed']}")
    return "; ".join(why)
