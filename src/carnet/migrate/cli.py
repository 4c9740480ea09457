"""``carnet migrate``: encrypt a plaintext column of an existing database, online.

Thin: every subcommand is one library call of :mod:`carnet.migrate`. Exit
codes: the table of every ``carnet`` command (:mod:`carnet.exitcodes`,
docs/cli.md); 9 is "not complete yet": rows left (see the report), a
decision needed, or ``finish`` refused because some value does not open.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import sqlalchemy as sa

from .._cli import (
    NO_DATABASE,
    NO_MASTER_KEY,
    CarnetGroup,
    Progress,
    batch_size_option,
    confirm,
    database_url_option,
    emit,
    json_option,
    lock_notice,
    master_key_option,
    open_manager,
    parse_worker,
    worker_option,
    yes_option,
)
from .._engines import make_engine
from ..errors import ConfigurationError
from ..exitcodes import EXIT_INCOMPLETE
from ..manager import KeyManager
from . import plan as plan_mod
from . import residue as residue_mod
from . import run as run_mod
from .target import BYTES, DATE, EXPAND, JSON, Target, resolve

F = TypeVar("F", bound=Callable[..., Any])


def _db_options(f: F) -> F:
    return database_url_option(
        "SQLAlchemy URL of the application's database [CARNET_DATABASE_URL]."
    )(f)


def _target_options(f: F) -> F:
    opts = [
        master_key_option(),
        click.option("--table", required=True, help="Table holding the plaintext column."),
        click.option("--column", required=True, help="The plaintext (legacy) column."),
        click.option(
            "--tenant",
            required=True,
            help="Tenant column: COLUMN of the row, or PARENT_TABLE.COLUMN reached "
            "through foreign keys (discovered, or given with --via).",
        ),
        click.option(
            "--via",
            multiple=True,
            metavar="CHILD.COL=PARENT.COL",
            help="One join step from the table towards the tenant's table; repeat "
            "per step, in order.",
        ),
        click.option("--pk", multiple=True, help="Primary-key column(s), if not reflected."),
        click.option(
            "--into",
            default=None,
            help="Expand/contract: the new column to fill, binary or text (default: "
            "in place). Needed for a DATE, BLOB or JSON column.",
        ),
        click.option(
            "--label",
            default=None,
            help="Field label bound into each value (default: TABLE.COLUMN of the legacy column).",
        ),
        json_option,
    ]
    for o in reversed(opts):
        f = o(f)
    return _db_options(f)


def _index_options(f: F) -> F:
    f = click.option(
        "--app-dir",
        default=".",
        show_default=True,
        type=click.Path(file_okay=False),
        help="Directory put first on the import path to find --index modules.",
    )(f)
    return click.option(
        "--index",
        "indexes",
        multiple=True,
        metavar="MODULE:CLASS.ATTR",
        help="A blind index over the new column, from the application's model (e.g. "
        "myapp.models:Patient.phone_bidx; repeatable): run fills it after the ciphertext, "
        "verify and finish check that no row lacks it.",
    )(f)


def _load_indexes(indexes: tuple[str, ...], app_dir: str) -> list[tuple[str, Any]]:
    if not indexes:
        return []
    from ..searchable_cli import import_index

    sys.path.insert(0, os.path.abspath(app_dir))
    return [(spec, import_index(spec)) for spec in indexes]


def _inherited(name: str, value: str | None, needed: bool = True) -> str | None:
    """This command's option, else the same option given to ``carnet`` itself."""
    if value:
        return value
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    got = root.params.get(name) if root is not None and root is not ctx else None
    if not got and needed:
        raise ConfigurationError(NO_DATABASE if name == "database_url" else NO_MASTER_KEY)
    return got if isinstance(got, str) else None


@contextmanager
def _open(
    database_url: str | None, master_key: str | None, needs_key: bool = True
) -> Iterator[tuple[sa.Engine, KeyManager | None]]:
    database_url = _inherited("database_url", database_url)
    master_key = _inherited("master_key", master_key, needs_key)
    if not database_url:
        raise ConfigurationError(NO_DATABASE)
    # carnet's one engine factory: hide_parameters (a failed UPDATE must not
    # print the legacy note it compared against), a bad URL or a missing
    # driver as a configuration error.
    engine = make_engine(database_url, lock_notice=lock_notice)
    manager: KeyManager | None = None
    try:
        manager = open_manager(engine, master_key) if master_key else None
        if manager is not None:
            manager.create_schema()
        yield engine, manager
    finally:
        if manager is not None:
            manager.close()
        engine.dispose()


def _target(engine: sa.Engine, kw: dict[str, Any]) -> Target:
    return resolve(
        engine,
        kw["table"],
        kw["column"],
        tenant=kw["tenant"],
        via=kw["via"],
        pk=kw["pk"],
        into=kw["into"],
        label=kw["label"],
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@click.group("migrate", cls=CarnetGroup)
def migrate() -> None:
    """Encrypt an existing plaintext column: plan, run, verify, finish, compact; scaffold."""


@migrate.command("plan")
@_target_options
@click.option(
    "--rate",
    type=float,
    default=None,
    help="Rows per second to base the estimate on (default: measured here, on a "
    "sample written and rolled back).",
)
def plan_cmd(
    database_url: str, master_key: str, as_json: bool, rate: float | None, **kw: Any
) -> None:
    """Count what a run would do, per tenant; write nothing."""
    with _open(database_url, master_key) as (engine, manager):
        assert manager is not None  # noqa: S101 - master_key is required
        target = _target(engine, kw)
        measured = plan_mod.measure_rate(engine, target) if rate is None else None
        p = plan_mod.build_plan(
            manager, engine, target, rate=rate if measured is None else measured[0]
        )
        if measured is not None:
            p.rate_source = (
                f"measured on this database: {measured[1]} rows sealed, written, rolled back"
            )
    tot = p.totals
    rows = [
        ("to encrypt", p.to_encrypt),
        ("already encrypted", tot["sealed"]),
        ("NULL", tot["null"]),
        ("look encrypted, do not open", tot["prefixed_invalid"]),
        ("no tenant", tot["no_tenant"]),
    ]
    if tot.get("shredded"):
        rows.append(("crypto-shredded", tot["shredded"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{target.name}: {target.mode}, tenant {target.tenant}, label {target.label!r}"]
    lines += [f"  {name:<{width}}  {n:>9,}" for name, n in rows]
    lines.append(
        f"  {'estimate':<{width}}  {_duration(p.estimate_seconds):>9} "
        f"(at {p.rate:,.0f} rows/s, {p.rate_source})"
    )
    heads = ("to encrypt", "encrypted", "NULL", "look encrypted", "no tenant")
    table = [
        (
            t,
            c["plaintext"] + c["legacy_sealed"],
            c["sealed"],
            c["null"],
            c["prefixed_invalid"],
            c["no_tenant"],
        )
        for t, c in p.per_tenant.items()
    ]
    tw = max([len("tenant")] + [len(str(r[0])) for r in table])
    cw = [
        max(len(h), *(len(f"{r[i + 1]:,}") for r in table)) if table else len(h)
        for i, h in enumerate(heads)
    ]
    lines.append("per tenant:")
    lines.append(
        f"  {'tenant':<{tw}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, cw, strict=True))
    )
    for r in table:
        lines.append(
            f"  {str(r[0]):<{tw}}  "
            + "  ".join(f"{v:>{w},}" for v, w in zip(r[1:], cw, strict=True))
        )
    for kind, pks in p.samples.items():
        lines.append(f"{kind}: primary keys {', '.join(json.dumps(k) for k in pks)}")
    lines += [f"warning: {w}" for w in p.warnings]
    emit(as_json, p.as_dict(), lines)
    if p.blocking:
        click.get_current_context().exit(EXIT_INCOMPLETE)


def _worker(value: str) -> tuple[int, int]:
    parsed = parse_worker(value)
    assert parsed is not None  # noqa: S101 - the option has a default
    return parsed


@migrate.command("run")
@_target_options
@batch_size_option(500)
@worker_option("0/1")
@click.option(
    "--prefixed",
    type=click.Choice(["report", "encrypt"]),
    default="report",
    show_default=True,
    help="Values that start with 'carnet:' but do not open: leave and report them, "
    "or encrypt them as the plaintext they are (after inspecting them).",
)
@click.option("--pause", type=float, default=0.0, help="Seconds to sleep between batches.")
@click.option("--restart", is_flag=True, help="Forget saved progress and scan from the start.")
@_index_options
def run_cmd(
    database_url: str,
    master_key: str,
    as_json: bool,
    batch_size: int,
    worker_spec: str,
    prefixed: str,
    pause: float,
    restart: bool,
    indexes: tuple[str, ...],
    app_dir: str,
    **kw: Any,
) -> None:
    """Seal every plaintext value, in batches; resumes after a crash."""
    w = _worker(worker_spec)
    attrs = _load_indexes(indexes, app_dir)
    if attrs and w != (0, 1):
        raise click.UsageError(
            "--index runs with a single worker (0/1): the index backfill "
            "walks each practice; rerun without --index on the others"
        )
    backfills: list[run_mod.IndexBackfill] = []
    with _open(database_url, master_key) as (engine, manager):
        assert manager is not None  # noqa: S101
        target = _target(engine, kw)
        # The one progress reporter of every command (carnet._cli.Progress).
        with engine.connect() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(target.table)).scalar()
        bar = Progress(f"encrypting {target.name}", int(total or 0) // w[1] or 1, quiet=as_json)
        try:
            result = run_mod.run_migration(
                manager,
                engine,
                target,
                batch_size=batch_size,
                worker=w,
                prefixed=prefixed,  # type: ignore[arg-type]
                restart=restart,
                pause=pause,
                progress=bar.update,
            )
            bar.finish()
        finally:
            bar.close()
        if result.complete:
            # The index is computed from the sealed column: only once it is full.
            backfills = [
                run_mod.backfill_index(
                    manager, engine, attr, name=spec, batch_size=batch_size, restart=restart
                )
                for spec, attr in attrs
            ]
    r = result.report
    lines = [
        f"{target.name}: scanned {r.scanned}, encrypted {r.rewritten}, left as they were "
        f"{r.skipped}, concurrent writes kept {r.conflicts}, not done {len(r.failed)} "
        f"({r.elapsed:.1f} s"
        + (f", resumed after {list(r.resumed_from)}" if r.resumed_from else "")
        + ")",
    ]
    for kind, pks in result.problems.items():
        lines.append(
            f"{kind}: {len(pks)} row(s), primary keys {', '.join(json.dumps(k) for k in pks[:20])}"
        )
    if result.problems.get("prefixed_invalid"):
        lines.append(
            "decide: these values start with 'carnet:' but do not open; inspect them, "
            "then rerun with --prefixed=encrypt"
        )
    lines += _backfill_lines(backfills)
    indexed = all(b.failed == 0 and b.missing == 0 for b in backfills)
    if result.complete and indexed:
        lines.append(f"next: carnet migrate verify / finish --table {target.table.name} ...")
    elif result.complete and attrs:
        lines.append(
            "blind indexes not complete: rerun `carnet migrate run` with the same "
            "options (it resumes)"
        )
    data = result.as_dict()
    if attrs:
        data["indexes"] = [b.as_dict() for b in backfills]
    emit(as_json, data, lines)
    if not result.complete or not indexed:
        click.get_current_context().exit(EXIT_INCOMPLETE)


def _backfill_lines(backfills: list[run_mod.IndexBackfill]) -> list[str]:
    lines = []
    for b in backfills:
        done = sum(r.rewritten for r in b.reports.values())
        lines.append(
            f"{b.index}: {done} index value(s) written in {len(b.reports)} practice(s), "
            f"{b.failed} row(s) failed, {b.missing} row(s) still without an index value"
            + (f"; destroyed practices skipped: {', '.join(b.destroyed)}" if b.destroyed else "")
        )
    return lines


def _index_check(engine: sa.Engine, attrs: list[tuple[str, Any]]) -> dict[str, int]:
    """Rows lacking each index value (0 everywhere: the indexes are complete)."""
    return {spec: run_mod.missing_index_values(engine, attr) for spec, attr in attrs}


def _verification_lines(target: Target, v: run_mod.Verification) -> list[str]:
    t = v.totals
    lines = [
        f"{target.name}: {t['sealed']} open, {t['null']} NULL, {t['plaintext']} plaintext, "
        f"{t['prefixed_invalid']} do not open, {t['no_tenant']} no tenant"
        + (f", {t['shredded']} crypto-shredded" if t["shredded"] else "")
        + (f", {t['legacy_sealed']} not copied yet" if t["legacy_sealed"] else "")
    ]
    for kind, pks in v.samples.items():
        lines.append(f"{kind}: primary keys {', '.join(json.dumps(k) for k in pks)}")
    return lines


@migrate.command("verify")
@_target_options
@_index_options
def verify_cmd(
    database_url: str,
    master_key: str,
    as_json: bool,
    indexes: tuple[str, ...],
    app_dir: str,
    **kw: Any,
) -> None:
    """Read back and open every value (authenticated decryption, not a prefix check)."""
    attrs = _load_indexes(indexes, app_dir)
    with _open(database_url, master_key) as (engine, manager):
        assert manager is not None  # noqa: S101
        target = _target(engine, kw)
        v = run_mod.verify(manager, engine, target)
        missing = _index_check(engine, attrs)
    data = v.as_dict()
    lines = _verification_lines(target, v)
    if attrs:
        data["indexes_missing"] = missing
        lines += [f"{spec}: {n} row(s) without an index value" for spec, n in missing.items()]
    emit(as_json, data, lines)
    if not v.clean or any(missing.values()):
        click.get_current_context().exit(EXIT_INCOMPLETE)


@migrate.command("finish")
@_target_options
@_index_options
def finish_cmd(
    database_url: str,
    master_key: str,
    as_json: bool,
    indexes: tuple[str, ...],
    app_dir: str,
    **kw: Any,
) -> None:
    """Verify that no plaintext remains, then record the column as strict."""
    attrs = _load_indexes(indexes, app_dir)
    with _open(database_url, master_key) as (engine, manager):
        assert manager is not None  # noqa: S101
        target = _target(engine, kw)
        missing = _index_check(engine, attrs)
        if any(missing.values()):
            # Not strict while lookups would miss rows: the contract step would
            # then drop the clear column the search fallback still reads.
            v = run_mod.verify(manager, engine, target)
        else:
            v = run_mod.finish(manager, engine, target)
    lines = _verification_lines(target, v)
    data = v.as_dict()
    if attrs:
        data["indexes_missing"] = missing
        lines += [f"{spec}: {n} row(s) without an index value" for spec, n in missing.items()]
    if any(missing.values()):
        lines.append(
            "not finished: some rows lack their blind index value; run `carnet migrate "
            "run ... --index ...` again"
        )
        emit(as_json, data, lines)
        click.get_current_context().exit(EXIT_INCOMPLETE)
    if v.clean:
        col = target.column
        if target.mode == EXPAND:
            typ = {
                DATE: "EncryptedDate",
                BYTES: "EncryptedBytes",
                JSON: "EncryptedJSON",
            }.get(target.plaintext, "EncryptedText (or EncryptedString(n))")
            advice = (
                f"{target.name} is strict. Point the application at {col} only "
                f"({typ} with label={target.label!r}), then run the "
                f"contract migration that drops {target.source}."
            )
        else:
            advice = (
                f"{target.name} is strict. Remove mixed_read=True from its "
                f"EncryptedText(storage='text') and redeploy: from then on a value that "
                "is not valid ciphertext raises InvalidCiphertext and is never returned."
            )
        lines += [
            f"database checks installed, mode v2 (strict): {', '.join(v.checks)}",
            advice,
            "next: carnet migrate compact, then follow its residue report",
        ]
        data["advice"] = advice
        data["checks"] = v.checks
    else:
        lines.append(
            "not finished: some values do not open; run `carnet migrate run` again "
            "and see `plan` for rows that need a decision"
        )
    emit(as_json, data, lines)
    if not v.clean:
        click.get_current_context().exit(EXIT_INCOMPLETE)


@migrate.command("scaffold")
@_db_options
@click.option("--table", required=True, help="Table holding the identifiers.")
@click.option(
    "--column",
    "columns",
    multiple=True,
    required=True,
    help="A legacy column to seal (repeatable; in place unless --into names a new one).",
)
@click.option(
    "--into",
    multiple=True,
    metavar="[LEGACY=]NEW",
    help="Expand/contract: the new column a legacy one moves into (repeatable; NEW alone "
    "with a single --column). Needed for a DATE column or one too short for ciphertext.",
)
@click.option(
    "--tenant",
    required=True,
    help="The practice column: COLUMN of the row, or PARENT_TABLE.COLUMN one foreign key up "
    "(no --index then).",
)
@click.option(
    "--index",
    "indexes",
    multiple=True,
    metavar="NAME=COL[,COL][:TRANSFORM[:BITS]]",
    help="A blind index over migrated column(s), by their legacy names (repeatable). "
    "TRANSFORM: one of carnet.transforms (default: date_iso for a date, folded for text, "
    "initial_lastname for two columns); BITS: default from carnet.plan_bits on the rows "
    "of the largest practice.",
)
@click.option(
    "--revises",
    default=None,
    metavar="REV",
    help="The revision the expand step follows (your head; default: a branch of its own).",
)
@click.option(
    "--branch-label",
    default=None,
    help="The branch label when --revises is not given (default: carnet_TABLE).",
)
@click.option(
    "--model-class", default=None, help="The model class's name (default: MigratingTABLE)."
)
@click.option("--module", default=None, help="The model module's name (default: TABLE_migrating).")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory to write the three files into (created; existing files are not overwritten).",
)
@json_option
def scaffold_cmd(
    database_url: str | None,
    table: str,
    columns: tuple[str, ...],
    into: tuple[str, ...],
    tenant: str,
    indexes: tuple[str, ...],
    revises: str | None,
    branch_label: str | None,
    model_class: str | None,
    module: str | None,
    out: str,
    as_json: bool,
) -> None:
    """Write the expand and contract migrations and the models of both phases."""
    from pathlib import Path

    from . import scaffold as scaffold_mod

    with _open(database_url, None, needs_key=False) as (engine, _):
        sc = scaffold_mod.build(
            engine,
            table,
            columns,
            tenant=tenant,
            into=into,
            indexes=indexes,
            revises=revises,
            branch_label=branch_label,
            model_class=model_class,
            module=module,
        )
    scaffold_mod.write(sc, Path(out))
    lines = [
        f"expand migration:   {sc.files['expand']} (revision {sc.expand_revision})",
        f"contract migration: {sc.files['contract']} (revision {sc.contract_revision})",
        f"migrating model:    {sc.files['model']} (class {sc.model_class})",
        f"final model:        {sc.files['final']} (class {sc.final_class}, after the contract)",
    ]
    lines += [
        f"index {ix.name}: {ix.transform} over {', '.join(ix.columns)}, {ix.bits} bits "
        f"({ix.bits_reason})"
        for ix in sc.indexes
    ]
    lines += [f"warning: {w}" for w in sc.warnings]
    lines += [
        "next: review the files (EDIT comments), move the revisions into your Alembic "
        "versions, merge the model; alembic upgrade; deploy; then:",
        *(f"  {c}" for c in sc.commands()),
        "  alembic upgrade (the contract revision), then carnet migrate compact "
        f"--table {sc.table}",
    ]
    emit(as_json, sc.as_dict(), lines)


@migrate.command("compact")
@_db_options
@click.option("--table", required=True)
@click.option("--column", multiple=True, help="Migrated column(s), to check for indexes.")
@click.option(
    "--vacuum-full",
    is_flag=True,
    help="PostgreSQL: rewrite the table (ACCESS EXCLUSIVE lock for the whole run).",
)
@yes_option("Do not ask before VACUUM FULL.")
@json_option
def compact_cmd(
    database_url: str | None,
    table: str,
    column: tuple[str, ...],
    vacuum_full: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Compact the table after a migration and report where plaintext may remain."""
    with _open(database_url, None, needs_key=False) as (engine, _):
        if vacuum_full and engine.dialect.name == "postgresql":
            confirm(
                yes,
                f"VACUUM FULL locks {table} against all reads and writes until it ends. Go on?",
            )
        rep = residue_mod.compact(engine, table, full=vacuum_full, columns=column)
    lines = [f"{rep.backend}: {'; '.join(rep.actions)}", "cleaned:"]
    lines += [f"  {i.where}: {i.detail}" for i in rep.cleaned]
    lines.append("remaining (steps to take):")
    for i in rep.remaining:
        lines.append(f"  [{i.status}] {i.where}: {i.detail}")
        if i.steps:
            lines.append(f"      -> {i.steps}")
    lines += [f"warning: {w}" for w in rep.warnings]
    emit(as_json, rep.as_dict(), lines)


if __name__ == "__main__":
    migrate()
