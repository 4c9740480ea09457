"""The ``carnet`` command line: a thin shell over :mod:`carnet.lifecycle`.

Exit codes: the one table of :mod:`carnet.exitcodes` (docs/cli.md), applied
to every command, ``carnet migrate`` and ``carnet reindex`` included, by
:class:`carnet._cli.CarnetGroup`; errors, JSON, progress, engines and the
shared options come from :mod:`carnet._cli`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from . import lifecycle
from ._cli import (
    CarnetGroup,
    Config,
    Progress,
    batch_size_option,
    confirm,
    database_url_option,
    echo,
    emit,
    json_option,
    master_key_option,
    parse_worker,
    printable,
    worker_option,
    workers_option,
    yes_option,
)
from .errors import ConfigurationError, MasterKeyUnavailable

# The one exit-code table of every command (carnet.exitcodes), re-exported here.
from .exitcodes import (  # noqa: F401
    EXIT_ABORTED,
    EXIT_DATABASE,
    EXIT_DESTROYED,
    EXIT_FAILED_ROWS,
    EXIT_IN_USE,
    EXIT_INCOMPLETE,
    EXIT_INTERNAL,
    EXIT_MASTER_KEY,
    EXIT_UNKNOWN_TENANT,
    EXIT_USAGE,
)
from .manager import env_settings

F = TypeVar("F", bound=Callable[..., Any])


@click.group(cls=CarnetGroup, context_settings={"help_option_names": ["-h", "--help"]})
@database_url_option("SQLAlchemy URL of the database holding carnet_keys [CARNET_DATABASE_URL].")
@master_key_option()
@click.option(
    "--previous-master-key",
    "previous",
    multiple=True,
    metavar="URI",
    help="A former master key that still wraps some DEKs (repeatable) "
    "[CARNET_PREVIOUS_MASTER_KEYS, comma-separated].",
)
@click.option(
    "--cache-ttl",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds an unwrapped DEK stays cached.",
)
@click.version_option(package_name="carnet")
@click.pass_context
def cli(
    ctx: click.Context,
    database_url: str | None,
    master_key: str | None,
    previous: tuple[str, ...],
    cache_ttl: float,
) -> None:
    """Field-level encryption of medical notes: keys, rotation, re-encryption, verification."""
    # CARNET_PREVIOUS_MASTER_KEYS parsed where KeyManager.from_env parses it.
    prev = previous or env_settings().previous_master_keys
    ctx.obj = Config(database_url, master_key, prev, cache_ttl)

    ctx.call_on_close(ctx.obj.close)


pass_config = click.make_pass_decorator(Config)


def _pairs(
    ctx: click.Context, tables: tuple[str, ...], columns: tuple[str, ...]
) -> list[tuple[str, str]] | None:
    if not tables and not columns:
        return None
    if len(tables) != len(columns):
        raise click.UsageError("give --table and --column in pairs (one --column per --table)")
    return list(zip(tables, columns, strict=True))


def column_options(f: F) -> F:
    f = click.option(
        "--column",
        "columns",
        multiple=True,
        metavar="C",
        help="Encrypted column of the preceding --table (repeatable).",
    )(f)
    return click.option(
        "--table",
        "tables",
        multiple=True,
        metavar="T",
        help="Table holding an encrypted column (repeatable; default: discover).",
    )(f)


# -- init / master ------------------------------------------------------------------------


@cli.command()
@json_option
@pass_config
def init(cfg: Config, as_json: bool) -> None:
    """Create carnet's tables (carnet_keys, carnet_jobs); make practice ids exact."""
    res = lifecycle.init(cfg.manager())

    def text() -> None:
        echo(f"created {', '.join(res['tables'])} in {res['database']}")
        if res["converted_to_exact_practice_ids"]:
            echo(
                f"converted {res['tables'][0]} to exact practice ids "
                f"({', '.join(res['converted_to_exact_practice_ids'])})"
            )

    emit(as_json, res, text)


@cli.group()
def master() -> None:
    """Master keys: create one, rotate to a new one."""


@master.command("new")
@click.argument("uri")
@json_option
def master_new(uri: str, as_json: bool) -> None:
    """Create a master key at URI (file:///path, keyring://service/name)."""
    try:
        res = lifecycle.new_master(uri)
    except ConfigurationError as exc:
        raise MasterKeyUnavailable(str(exc)) from None
    except OSError as exc:
        # A missing directory, no write permission: the path is the operator's own.
        reason = exc.strerror or type(exc).__name__
        raise MasterKeyUnavailable(f"cannot create the master key {uri}: {reason}") from None
    emit(as_json, res, lambda: echo(f"created master key {res['master_key_uri']}"))


@master.command("rotate")
@click.option("--to", "to", required=True, metavar="URI", help="The new master key.")
@batch_size_option(200)
@json_option
@pass_config
def master_rotate(cfg: Config, to: str, batch_size: int, as_json: bool) -> None:
    """Rewrap every data key under a new master key; no data row is touched. Resumable."""
    manager = cfg.manager()
    before = lifecycle.master_keys_in_use(manager)
    bar = Progress("rewrap", lifecycle.count_keys(manager), quiet=as_json, unit="keys")
    try:
        rep = lifecycle.rotate_master(manager, to, batch_size=batch_size, progress=bar.update)
        bar.finish()
    except ConfigurationError as exc:
        raise MasterKeyUnavailable(str(exc)) from None
    finally:
        bar.close()
    erased = lifecycle.erased_keys(manager)
    old = sorted(u for u in before if u != rep.master_key_uri)
    data = {
        "rewrapped": rep.rewrapped,
        "already": rep.already,
        "retired": erased["retired"],
        "destroyed": erased["destroyed"],
        "skipped_destroyed": rep.skipped_destroyed,
        "master_key_uri": rep.master_key_uri,
        "previous_master_key_uris": old,
        "previous_master_keys": lifecycle.OLD_MASTER_RULE if old else None,
    }

    def text() -> None:
        echo(
            f"rewrapped {rep.rewrapped} data key(s) under {rep.master_key_uri} "
            f"({rep.already} already under it; {erased['retired']} retired and "
            f"{erased['destroyed']} destroyed key(s) hold no key material to rewrap)."
        )
        echo(f"Set CARNET_MASTER_KEY={rep.master_key_uri}.")
        for uri in old:
            echo(f"Previous master key {uri}: {lifecycle.OLD_MASTER_RULE}")

    emit(as_json, data, text)


# -- status ---------------------------------------------------------------------------------


def _n(count: int, what: str) -> str:
    """``1 row``, ``2 rows``: a count with its noun."""
    return f"{count:,} {what}" + ("" if count == 1 else "s")


def app_option(f: F) -> F:
    return click.option(
        "--app",
        "app",
        metavar="MODULE:ATTR",
        help="The application's SQLAlchemy MetaData or declarative Base (module:attribute): "
        "its encrypted columns are checked even when they have no rows yet.",
    )(f)


@cli.command()
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

    pairs = _pairs(ctx, tables, columns)
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
                f"{c.table}.{c.column}: {_n(c.rows, 'row')}, {c.nulls:,} NULL, "
                f"{c.plaintext:,} plaintext, {c.not_on_active:,} not on the active key"
                + (f", {c.v1:,} in format v1 (carnet reencrypt)" if c.v1 else "")
                + (f", {c.destroyed:,} under destroyed keys" if c.destroyed else "")
                + (f", {c.unknown_key:,} unknown key" if c.unknown_key else "")
                + (f", {c.unreadable_framing:,} not carnet" if c.unreadable_framing else "")
            )
            for kid, info in c.by_key.items():
                echo(
                    f"  {info['tenant']} v{info['version']} ({info['state']}, {kid}): "
                    f"{_n(info['rows'], 'row')}"
                )
        for j in rep.jobs:
            echo(
                f"job {j['job']} worker {j['worker']}: "
                f"{'done' if j['done'] else 'unfinished'}, {j['scanned']:,} scanned"
            )
        if rep.finished_jobs_hidden:
            echo(
                f"({_n(rep.finished_jobs_hidden, 'older finished job')} not listed; "
                "--jobs N lists more)"
            )

    emit(as_json, rep.as_dict(), text)


# -- keys ---------------------------------------------------------------------------------------


@cli.group()
def keys() -> None:
    """Data keys: list, rotate, retire, destroy, reenable."""


@keys.command("list")
@click.option("--tenant", metavar="T")
@json_option
@pass_config
def keys_list(cfg: Config, tenant: str | None, as_json: bool) -> None:
    """List data keys (never their material)."""
    rows = lifecycle.list_keys(cfg.manager(), tenant)

    def text() -> None:
        if not rows:
            echo("no data keys" + (f" for practice {tenant!r}" if tenant is not None else ""))
            return
        head = ("KEY ID", "PRACTICE", "KIND", "VERSION", "STATE", "MASTER KEY")
        table = [
            tuple(
                printable(str(x))  # escaped before the widths are measured
                for x in (
                    r["key_id"],
                    r["tenant"],
                    r["kind"],  # data (notes) or index (blind-index root)
                    f"v{r['version']}",
                    r["state"],
                    r["master_key_uri"],
                )
            )
            for r in rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *table, strict=True)]
        for line in (head, *table):
            echo("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip())

    emit(as_json, rows, text)


@keys.command("rotate")
@click.option("--tenant", "tenants", multiple=True, metavar="T", help="Practice (repeatable).")
@click.option("--all", "all_", is_flag=True, help="Every practice with an active key.")
@click.option(
    "--create", is_flag=True, help="Create the first key of a --tenant that has none (else exit 7)."
)
@json_option
@pass_config
def keys_rotate(
    cfg: Config, tenants: tuple[str, ...], all_: bool, create: bool, as_json: bool
) -> None:
    """Make a new active data key; older ones stay readable until retired."""
    if bool(tenants) == all_:
        raise click.UsageError("give --tenant T (repeatable) or --all")
    if create and all_:
        raise click.UsageError("--create needs --tenant T: --all only rotates existing practices")
    rows = lifecycle.rotate_keys(cfg.manager(), None if all_ else list(tenants), create=create)

    def text() -> None:
        for r in rows:
            echo(f"{r['tenant']}: now v{r['version']} ({r['key_id']})")

    emit(as_json, rows, text)


@keys.command("retire")
@click.argument("key_id", metavar="KEY")
@column_options
@click.option(
    "--force", is_flag=True, help="Retire even if rows still use the key (they become unreadable)."
)
@yes_option()
@json_option
@pass_config
@click.pass_context
def keys_retire(
    ctx: click.Context,
    cfg: Config,
    key_id: str,
    tables: tuple[str, ...],
    columns: tuple[str, ...],
    force: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Erase an inactive data key, refusing while any row still uses it.

    Without --table/--column it reads every row of every text or binary column
    of every table, and refuses (exit 5) if some table or column cannot be read.
    """
    kid = lifecycle.parse_key_id(key_id)
    pairs = _pairs(ctx, tables, columns)
    manager = cfg.manager()
    if force:
        confirm(yes, f"Retire key {kid.hex()} even if rows use it (they become unreadable)?")
    res = lifecycle.retire_key(manager, kid, pairs, force=force)
    emit(
        as_json,
        res,
        lambda: echo(
            f"retired key {res['key']['key_id']} of {res['key']['tenant']} "
            f"v{res['key']['version']} "
            f"after reading {res['rows_scanned']} row(s) in {res['columns_scanned']} column(s)"
            + (
                f"; {res['rows_made_unreadable']} row(s) made unreadable"
                if res["rows_made_unreadable"]
                else ""
            )
            + (f"; not read: {', '.join(sorted(res['unreadable']))}" if res["unreadable"] else "")
        ),
    )


@keys.command("destroy")
@click.option("--tenant", required=True, metavar="T", help="The practice to crypto-shred.")
@yes_option("Do not ask for the practice id to be typed back.")
@json_option
@pass_config
@click.pass_context
def keys_destroy(ctx: click.Context, cfg: Config, tenant: str, yes: bool, as_json: bool) -> None:
    """Crypto-shred a practice: every value under its keys becomes unreadable forever."""
    manager = cfg.manager()
    lifecycle.require_tenant(manager, tenant)  # a typo fails before the prompt, not after
    confirm(
        yes,
        f"This makes every note of practice {tenant!r} unreadable forever.\n"
        f"Type the practice id to confirm",
        expected=tenant,
    )
    res = lifecycle.destroy_tenant(manager, tenant)
    emit(
        as_json,
        res,
        lambda: echo(
            f"{tenant} was already destroyed: nothing left to erase"
            if res["already_destroyed"]
            else f"destroyed {res['keys_destroyed']} data key(s) of {tenant}; other processes stop "
            f"decrypting within their cache time-to-live ({res['cache_ttl_seconds']:g}s here)"
        ),
    )


@keys.command("reenable")
@click.option("--tenant", required=True, metavar="T", help="The destroyed practice.")
@yes_option("Do not ask for the practice id to be typed back.")
@json_option
@pass_config
@click.pass_context
def keys_reenable(ctx: click.Context, cfg: Config, tenant: str, yes: bool, as_json: bool) -> None:
    """Let a destroyed practice be written again, under a new data key.

    Its notes sealed before the destruction stay unreadable.
    """
    manager = cfg.manager()
    if any(r.state == "active" for r in lifecycle.require_tenant(manager, tenant)):
        raise ConfigurationError(f"practice {tenant!r} has an active key: it is not destroyed")
    confirm(
        yes,
        f"Practice {tenant!r} was destroyed; new notes will be written for it "
        f"under a new key (its old notes stay unreadable).\n"
        f"Type the practice id to confirm",
        expected=tenant,
    )
    res = lifecycle.reenable_tenant(manager, tenant)
    emit(
        as_json,
        res,
        lambda: echo(
            f"re-enabled {tenant}: new active key v{res['key']['version']} "
            f"({res['key']['key_id']}); "
            "values under its destroyed keys stay unreadable"
        ),
    )


# -- reencrypt / verify -------------------------------------------------------------------------


@cli.command()
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
            f"{_n(len(rep.columns), 'column')}: {t.scanned:,} scanned, {t.rewritten:,} "
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


@cli.command()
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
            f"{table}.{column}: {_n(rep.rows, 'row')}, {rep.ok:,} ok, "
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


# -- export -------------------------------------------------------------------------------


def _default_principal() -> str:
    import getpass

    try:
        return f"carnet-export:{getpass.getuser()}"
    except (OSError, KeyError):  # no user name in this environment
        return "carnet-export"


@cli.command()
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
            f"exported {_n(sum(rep.tables.values()), 'row')} of {tenant} to {out} (mode 0600)"
            + (f", resuming after {rep.resumed_after:,}" if rep.resumed_after else "")
        )
        for t, n in rep.tables.items():
            echo(f"  {t}: {_n(n, 'row')}")
        for e in data["audit"]:
            echo(f"audited: {e['count']:,} value(s) of {e['field']} read by {e['principal']}")

    emit(as_json, data, text)


# -- doctor -------------------------------------------------------------------------------


@cli.command()
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
        echo(f"{_n(fails, 'problem')}, {_n(warns, 'warning')}")

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


# -- demo / migrate -----------------------------------------------------------------------------


@cli.command()
@click.option(
    "--dir",
    "path",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep the demo database and key here (default: a temporary directory).",
)
def demo(path: str | None) -> None:
    """Run a self-contained demonstration on SQLite."""
    from .demo import run_demo

    run_demo(path, echo)


def _register_migrate() -> None:
    try:
        from .migrate.cli import migrate
    except ModuleNotFoundError as exc:
        # Absent until the migrate package lands; a broken one must still fail loudly.
        if exc.name in ("carnet.migrate", "carnet.migrate.cli"):
            return
        raise
    cli.add_command(migrate, "migrate")


_register_migrate()


def _register_searchable() -> None:
    # `carnet reindex` and `carnet keys rotate --index` (src/carnet/searchable_cli.py).
    from .searchable_cli import register

    register(cli)


_register_searchable()
cli.add_command(__import__("carnet.checks_cli", fromlist=["checks"]).checks)  # carnet checks
cli.add_command(__import__("carnet.audit_cli", fromlist=["audit"]).audit)  # carnet audit
cli.add_command(__import__("carnet.decoys_cli", fromlist=["decoys_group"]).decoys_group)


def main() -> None:
    cli.main(prog_name="carnet")
