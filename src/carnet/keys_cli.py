"""``carnet init``, ``carnet master`` and ``carnet keys``: carnet's tables, master keys, data keys.

Each command is a call into :mod:`carnet.lifecycle`; this module prints it.
``carnet keys rotate --index`` (blind-index roots) is added by
:mod:`carnet.searchable_cli`.
"""

from __future__ import annotations

import click

from . import lifecycle
from ._cli import (
    Config,
    Progress,
    batch_size_option,
    column_options,
    column_pairs,
    confirm,
    echo,
    emit,
    json_option,
    pass_config,
    printable,
    yes_option,
)
from .errors import ConfigurationError, MasterKeyUnavailable


@click.command()
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


@click.group()
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


@click.group()
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
    pairs = column_pairs(tables, columns)
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
