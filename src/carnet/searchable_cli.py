"""Command-line side of blind indexes: ``carnet keys rotate --index`` and ``carnet reindex``.

A command group of its own, registered where :mod:`carnet.cli` registers
every group (:func:`register`: ``reindex``, and ``--index`` on the ``keys
rotate`` of :mod:`carnet.keys_cli`). Both commands run under the ``carnet``
group and share its configuration (``--database-url``,
``--master-key``) and its exit-code table (:mod:`carnet.exitcodes`,
docs/cli.md).

``carnet reindex`` needs the index's declaration (sources, transform, bits,
label), which lives in the application's model, not in the database: it is
named as ``module:Class.attribute`` and imported (:mod:`carnet._loader`), as
uvicorn imports an application.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import click

from . import lifecycle
from ._cli import (
    batch_size_option,
    echo,
    emit,
    emit_json,
    json_option,
    parse_worker,
    worker_option,
)
from ._loader import load
from .errors import KeyDestroyed
from .keystore import ACTIVE, INDEX

__all__ = ["import_index", "register"]


def import_index(spec: str) -> Any:
    """``package.module:Class.attribute`` -> the mapped blind-index attribute."""
    return load(spec, what="--index", example="myapp.models:Patient.phone_bidx")


def _config() -> Any:
    from ._cli import Config

    cfg = click.get_current_context().find_object(Config)
    if cfg is None:  # pragma: no cover - registered under carnet's group only
        raise click.UsageError("run as `carnet reindex`")
    return cfg


# -- carnet keys rotate --index ---------------------------------------------------------


def _active_root(manager: Any, tenant: str) -> str | None:
    for r in manager.list_keys(tenant):
        if r.kind == INDEX and r.state == ACTIVE:
            return str(r.key_id.hex())
    return None


def rotate_index_roots(
    manager: Any, tenants: list[str] | None, *, create: bool = False
) -> list[dict[str, Any]]:
    """A new active index root per practice (every practice with one when ``tenants`` is None).

    A named practice with no key of any kind is refused (a mistyped id) unless
    ``create``; a destroyed one raises :class:`~carnet.errors.KeyDestroyed`.
    """
    if tenants is None:
        tenants = [t for t in manager.tenants() if _active_root(manager, t) is not None]
    elif not create:
        for t in tenants:
            lifecycle.require_tenant(manager, t)
    out = []
    for t in tenants:
        previous = _active_root(manager, t)
        rec = manager.rotate_index_root(t).as_dict()
        rec["previous_key_id"] = previous
        out.append(rec)
    return out


def _with_index_flag(rotate: click.Command) -> None:
    """Give ``carnet keys rotate`` an ``--index`` flag: the same practices, their index roots."""
    if any(p.name == "index" for p in rotate.params):
        return  # registered already
    original = rotate.callback
    assert original is not None  # noqa: S101 - a command always has one
    rotate.params.append(
        click.Option(
            ["--index"],
            is_flag=True,
            help="Rotate the practices' blind-index root keys instead of their data keys "
            "(then run `carnet reindex`, then retire the old root).",
        )
    )

    @functools.wraps(original)
    def callback(*args: Any, index: bool = False, **kwargs: Any) -> Any:
        if not index:
            return original(*args, **kwargs)
        tenants, all_, create = kwargs["tenants"], kwargs["all_"], kwargs["create"]
        if bool(tenants) == all_:
            raise click.UsageError("give --tenant T (repeatable) or --all")
        if create and all_:
            raise click.UsageError("--create needs --tenant T: --all only rotates existing roots")
        rows = rotate_index_roots(
            _config().manager(), None if all_ else list(tenants), create=create
        )
        if kwargs["as_json"]:
            emit_json(rows)
            return None
        for r in rows:
            prev = r["previous_key_id"]
            echo(
                f"{r['tenant']}: index root now v{r['version']} ({r['key_id']})"
                + (f"; the previous root {prev} still serves lookups" if prev else "")
            )
        if rows:
            echo(
                "next: once the key cache time-to-live has passed, run `carnet reindex --index "
                "MODULE:CLASS.ATTR --tenant T` for each blind index of these practices, then "
                "`carnet keys retire <previous root>`"
            )
        return None

    rotate.callback = callback
    if rotate.help:
        rotate.help += "\n\nWith --index: the blind-index root keys (docs/searchable.md)."


# -- carnet reindex ----------------------------------------------------------------------


def _worker(value: str | None) -> tuple[int, int]:
    return parse_worker(value) or (0, 1)


@click.command("reindex")
@click.option(
    "--index",
    "indexes",
    multiple=True,
    required=True,
    metavar="MODULE:CLASS.ATTR",
    help="A blind index of the application's model, e.g. myapp.models:Patient.phone_bidx "
    "(repeatable).",
)
@click.option("--tenant", "tenants", multiple=True, metavar="T", help="Practice (repeatable).")
@click.option("--all-tenants", is_flag=True, help="Every practice with rows in the index's table.")
@click.option(
    "--app-dir",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Directory put first on the import path to find MODULE.",
)
@batch_size_option(500)
@worker_option()
@click.option("--restart", is_flag=True, help="Ignore recorded progress and start over.")
@json_option
@click.pass_context
def reindex_cmd(
    ctx: click.Context,
    indexes: tuple[str, ...],
    tenants: tuple[str, ...],
    all_tenants: bool,
    app_dir: str,
    batch_size: int,
    worker_spec: str | None,
    restart: bool,
    as_json: bool,
) -> None:
    """Recompute blind-index values under each practice's active root; fill missing ones.

    Run after `carnet keys rotate --index` (and the key cache time-to-live),
    or after `carnet migrate` filled an encrypted identifier column. Through
    the batch engine: compare-and-set writes, progress in carnet_jobs (job
    bidx:LABEL:PRACTICE), a killed run resumes where it stopped.
    """
    from .batchops import reindex
    from .exitcodes import EXIT_FAILED_ROWS
    from .lookup import index_tenants

    if bool(tenants) == all_tenants:
        raise click.UsageError("give --tenant T (repeatable) or --all-tenants")
    worker = _worker(worker_spec)
    manager = _config().manager()  # the configuration first: no application code runs without it
    sys.path.insert(0, os.path.abspath(app_dir))
    attrs = [(spec, import_index(spec)) for spec in indexes]
    results: list[dict[str, Any]] = []
    for spec, attr in attrs:
        names = list(tenants) if tenants else index_tenants(manager.engine, attr)
        for tenant in names:
            if tenants:
                lifecycle.require_tenant(manager, tenant)
            try:
                rep = reindex(
                    manager.engine, attr, tenant=tenant, batch_size=batch_size, worker=worker,
                    restart=restart, manager=manager,
                )  # fmt: skip
            except KeyDestroyed:
                if tenants:
                    raise
                # --all-tenants: a crypto-shredded practice has nothing left to index.
                results.append({"index": spec, "tenant": tenant, "destroyed": True})
                continue
            results.append({"index": spec, "tenant": tenant, **rep.as_dict()})
    failed = sum(len(r.get("failed", [])) for r in results)

    def text() -> None:
        for r in results:
            if r.get("destroyed"):
                echo(f"{r['index']} {r['tenant']}: destroyed, nothing to index")
                continue
            echo(
                f"{r['index']} {r['tenant']}: {r['scanned']} scanned, {r['rewritten']} indexed, "
                f"{r['skipped']} already current, {r['conflicts']} written concurrently by the "
                f"application, {len(r['failed'])} failed"
                + (f" (primary keys: {r['failed'][:20]})" if r["failed"] else "")
                + (f", resumed after {r['resumed_from']}" if r["resumed_from"] else "")
            )

    emit(as_json, results, text)
    if failed:
        ctx.exit(EXIT_FAILED_ROWS)


def register(cli: click.Group) -> None:
    """Add ``reindex`` to ``cli`` and ``--index`` to its ``keys rotate``."""
    cli.add_command(reindex_cmd, "reindex")
    keys = cli.commands.get("keys")
    rotate = keys.commands.get("rotate") if isinstance(keys, click.Group) else None
    if rotate is not None:
        _with_index_flag(rotate)
