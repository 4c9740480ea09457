"""``carnet status`` and ``carnet doctor``: what the deployment holds, and what to fix.

Both read only. ``status`` counts keys per practice and rows per key;
``doctor`` runs :mod:`carnet.doctor`'s checks in order.
"""

from __future__ import annotations

import click

from . import lifecycle
from ._cli import (
    Config,
    app_option,
    column_options,
    column_pairs,
    echo,
    emit,
    json_option,
    pass_config,
    plural,
)


@click.command()
@column_options
@click.option(
    "--no-master-check",
    is_flag=True,
    help="Do not open the master key (nor need it): no data key is unwrapped.",
)
@app_option
@click.option(
    "--jobs",
    "finished_jobs",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    metavar="N",
    help="Finished jobs listed, most recent first (every unfinished job is listed).",
)
@json_option
@pass_config
@click.pass_context
def status(
    ctx: click.Context,
    cfg: Config,
    tables: tuple[str, ...],
    columns: tuple[str, ...],
    no_master_check: bool,
    app: str | None,
    finished_jobs: int,
    as_json: bool,
) -> None:
    """Keys per practice and, per encrypted column, rows by key version."""
    from . import doctor

    pairs = column_pairs(tables, columns)
    declared = doctor.declared_columns(doctor.load_app(app)) if app else []
    rep = lifecycle.status(
        cfg.manager(open_master=not no_master_check),
        pairs,
        check_master=not no_master_check,
        declared=[(d.table, d.column) for d in declared],
        finished_jobs=finished_jobs,
    )

    def text() -> None:
        echo(f"database:   {rep.database}")
        checked = {
            True: "ok: its data keys unwrap",
            None: "not checked (--no-master-check)",
            False: "failed",
        }[rep.master_key_ok]
        echo(f"master key: {rep.master_key_uri} ({checked})")
        echo(f"practices:  {len(rep.tenants)}")
        for t in rep.tenants:
            states: dict[str, int] = {}
            for k in t.keys:
                states[k["state"]] = states.get(k["state"], 0) + 1
            act = f"v{t.active_version}" if t.active_version is not None else "none"
            echo(
                f"  {t.tenant}: active {act}; "
                + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
                + (f"; master {t.master_key_uri}" if t.master_key_uri else "")
            )
        for c in rep.columns:
            if c.found_by == "declared" and c.rows == 0:
                echo(f"{c.table}.{c.column}: no rows yet (declared by the application)")
                continue
            echo(
                f"{c.table}.{c.column}: {plural(c.rows, 'row')}, {c.nulls:,} NULL, "
                f"{c.plaintext:,} plaintext, {c.not_on_active:,} not on the active key"
                + (f", {c.v1:,} in format v1 (carnet reencrypt)" if c.v1 else "")
                + (f", {c.destroyed:,} under destroyed keys" if c.destroyed else "")
                + (f", {c.unknown_key:,} unknown key" if c.unknown_key else "")
                + (f", {c.unreadable_framing:,} not carnet" if c.unreadable_framing else "")
            )
            for kid, info in c.by_key.items():
                echo(
                    f"  {info['tenant']} v{info['version']} ({info['state']}, {kid}): "
                    f"{plural(info['rows'], 'row')}"
                )
        for j in rep.jobs:
            echo(
                f"job {j['job']} worker {j['worker']}: "
                f"{'done' if j['done'] else 'unfinished'}, {j['scanned']:,} scanned"
            )
        if rep.finished_jobs_hidden:
            echo(
                f"({plural(rep.finished_jobs_hidden, 'older finished job')} not listed; "
                "--jobs N lists more)"
            )

    emit(as_json, rep.as_dict(), text)


@click.command()
@click.option(
    "--all",
    "all_keys",
    is_flag=True,
    help="Unwrap every data key (default: a sample per master key; each unwrap is "
    "a KMS or HSM call).",
)
@app_option
@json_option
@pass_config
@click.pass_context
def doctor(ctx: click.Context, cfg: Config, all_keys: bool, app: str | None, as_json: bool) -> None:
    """Check the deployment in order and say what to fix; read-only.

    Database and driver, carnet's tables, the master keys (a sample of data
    keys unwrapped, or --all), encrypted columns and plaintext left in them,
    the SQLite journal; with --app, the declared encrypted columns and the
    application's engine settings. Exit code: the first failing check's.
    """
    from . import doctor as _doctor

    rep = _doctor.run(cfg.database_url, cfg.master_key, cfg.previous, all_keys=all_keys, app=app)

    def text() -> None:
        mark = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
        for c in rep.checks:
            echo(f"[{mark[c.status]}] {c.name}: {c.message}")
            if c.fix and c.status != "ok":
                echo(f"       fix: {c.fix}")
        if rep.stopped_after:
            echo(f"stopped after {rep.stopped_after}: the next checks need it")
        fails = sum(c.status == "fail" for c in rep.checks)
        warns = sum(c.status == "warn" for c in rep.checks)
        echo(f"{plural(fails, 'problem')}, {plural(warns, 'warning')}")

    data = rep.as_dict()
    first = next((c for c in rep.checks if c.status == "fail"), None)
    if first is not None:
        # The same error contract as every command: one line on stderr, and
        # under --json the report carries the error object.
        message = f"{first.name}: {first.message}"
        data["error"] = {"code": rep.exit_code, "kind": "CheckFailed", "message": message}
    emit(as_json, data, text)
    if first is not None:
        echo(f"carnet: error: {message}", err=True)
    ctx.exit(rep.exit_code)
