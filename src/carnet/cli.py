"""The ``carnet`` command line: the root group, and where every command group is registered.

Each command group lives in its own module and is a thin shell over the
library (:mod:`carnet.lifecycle` and the modules it names):
:mod:`carnet.keys_cli` (``init``, ``master``, ``keys``),
:mod:`carnet.status_cli` (``status``, ``doctor``),
:mod:`carnet.reencrypt_cli` (``reencrypt``, ``verify``),
:mod:`carnet.export_cli` (``export``), :mod:`carnet.checks_cli` (``checks``),
:mod:`carnet.searchable_cli` (``reindex``, ``keys rotate --index``) and
:mod:`carnet.migrate.cli` (``migrate``); ``demo`` is here.

Exit codes: the one table of :mod:`carnet.exitcodes` (docs/cli.md), applied
to every command by :class:`carnet._cli.CarnetGroup`; errors, JSON, progress,
engines and the shared options come from :mod:`carnet._cli`.
"""

from __future__ import annotations

import click

from ._cli import CarnetGroup, Config, database_url_option, echo, master_key_option
from .audit_cli import audit
from .checks_cli import checks
from .decoys_cli import decoys_group

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
from .export_cli import export
from .keys_cli import init, keys, master
from .manager import env_settings
from .migrate.cli import migrate
from .reencrypt_cli import reencrypt, verify
from .searchable_cli import register as register_searchable
from .status_cli import doctor, status


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


# -- commands of this module ---------------------------------------------------------------


@click.command()
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


# -- every command group, registered in one place -------------------------------------------
#
# Each group lives in its own module (docs/development.md); a new one is
# imported above and added here.

for _command in (
    init,
    master,
    keys,
    status,
    doctor,
    reencrypt,
    verify,
    export,
    demo,
    checks,
    audit,
    decoys_group,
    migrate,
):
    cli.add_command(_command)
# `carnet reindex`, and `--index` on `carnet keys rotate` (so after `keys`).
register_searchable(cli)


def main() -> None:
    cli.main(prog_name="carnet")
