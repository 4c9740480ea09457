"""``carnet audit``: report on, verify and prune the audit trail (``carnet_audit``).

The queries live in :mod:`carnet.audit_report` and the chain in
:mod:`carnet.audit_store`; these commands parse, call and print, under the
one CLI contract of :mod:`carnet._cli` (exit codes, ``--json``, escaping).
"""

from __future__ import annotations

import click

from . import audit_report
from ._cli import Config, Progress, confirm, echo, emit, json_option, yes_option
from .audit_store import AuditStore, Head
from .exitcodes import EXIT_FAILED_ROWS

__all__ = ["audit"]


def _config() -> Config:
    cfg = click.get_current_context().find_object(Config)
    if cfg is None:  # pragma: no cover - registered under carnet's group only
        raise click.UsageError("run as `carnet audit`")
    return cfg


def _store(url: str | None, *, open_master: bool) -> AuditStore:
    store = AuditStore(_config().manager(open_master=open_master), url)
    store.require_table()
    return store


_store_option = click.option(
    "--store-url",
    envvar="CARNET_AUDIT_URL",
    metavar="URL",
    help="Database of the trail, if not the key table's [CARNET_AUDIT_URL].",
)


@click.group()
def audit() -> None:
    """The audit trail: who read which practice's notes; verify and prune it."""


@audit.command()
@click.option("--since", default="24h", show_default=True, help="Start: 24h, 7d, 90m or a date.")
@click.option("--until", default=None, help="End (default: now): a duration ago or a date.")
@click.option("--practice", default=None, metavar="P", help="Only this practice.")
@click.option("--principal", default=None, metavar="U", help="Only this principal.")
@click.option("--row", default=None, metavar="K", help="Who opened row K (rows=True, searches).")
@click.option(
    "--top", default=10, show_default=True, type=click.IntRange(1), help="Heaviest readers."
)
@_store_option
@json_option
def report(
    since: str,
    until: str | None,
    practice: str | None,
    principal: str | None,
    row: str | None,
    top: int,
    store_url: str | None,
    as_json: bool,
) -> None:
    """Reads per principal, practice, field and hour; heaviest readers; unusual readers."""
    store = _store(store_url, open_master=False)
    start = audit_report.parse_when(since, "--since")
    end = audit_report.parse_when(until, "--until") if until else None
    if row is not None:
        hits = audit_report.row_readers(store, row, start, end, practice=practice)
        emit(as_json, {"row": row, "readers": hits}, lambda: _print_row(row, hits))
        return
    rep = audit_report.report(store, start, end, practice=practice, principal=principal, top=top)
    emit(as_json, rep, lambda: _print_report(rep))


def _print_row(row: str, hits: list[dict[str, object]]) -> None:
    if not hits:
        echo(f"no recorded read of row {row}")
        return
    echo(f"row {row} was disclosed {len(hits)} time(s):")
    for h in hits:
        ctx = "".join(f" {k}={h[k]}" for k in ("request_id", "route") if h.get(k) is not None)
        echo(
            f"  {h['at']}  {h['principal']}  practice {h['practice']}  {h['field']}  "
            f"({h['how']}, process {h['process']} on {h['host']}){ctx}"
        )


def _print_report(rep: dict[str, object]) -> None:
    bound = rep["total_at_most"]
    more = f" (at most {bound}, counting reservations)" if bound != rep["total"] else ""
    echo(f"reads from {rep['since']} to {rep['until']}: {rep['total']} note(s){more}")
    for r in rep["hours"]:  # type: ignore[attr-defined]
        legacy = f" ({r['legacy']} legacy)" if r["legacy"] else ""
        echo(
            f"  {r['hour']}  {r['principal']}  practice {r['practice']}  {r['field']}: "
            f"{r['count']}{legacy}"
        )
    echo("heaviest readers:")
    for r in rep["heaviest"]:  # type: ignore[attr-defined]
        echo(f"  {r['principal']}: {r['count']} note(s) of {r['practices']} practice(s)")
    flagged = rep["unusual"]
    echo(f"unusual readers ({rep['rule']}):" if flagged else "unusual readers: none")
    for r in flagged:  # type: ignore[attr-defined]
        echo(f"  {r['principal']}: {r['why']}")
    for r in rep["searches"]:  # type: ignore[attr-defined]
        echo(
            f"  search {r['index']} by {r['principal']} in practice {r['practice']}: "
            f"{r['searches']} search(es), {r['candidates']} candidate(s), {r['matches']} match(es)"
        )


@audit.command()
@click.option(
    "--head",
    default=None,
    metavar="SEQ:MAC",
    help="A head of the chain recorded elsewhere (the log): finds removed newest records.",
)
@_store_option
@json_option
def verify(head: str | None, store_url: str | None, as_json: bool) -> None:
    """Check the chain: the first deleted, altered, moved or inserted record."""
    seen = _parse_head(head) if head else None
    store = _store(store_url, open_master=True)
    progress = Progress("verifying the audit trail", None, quiet=as_json, unit="records")
    try:
        rep = store.verify(head=seen, progress=progress.update)
    finally:
        progress.close()
    data = rep.as_dict()

    def text() -> None:
        if rep.ok:
            echo(
                f"audit trail verified: {rep.records} record(s), head {rep.head_seq}:{rep.head_mac}"
            )
        else:
            echo(f"audit trail broken at record {rep.first_bad}: {rep.problem}")

    emit(as_json, data, text)
    if not rep.ok:
        click.get_current_context().exit(EXIT_FAILED_ROWS)


def _parse_head(value: str) -> Head:
    seq, _, mac = value.partition(":")
    try:
        n = int(seq)
        bytes.fromhex(mac)
    except ValueError:
        raise click.BadParameter("expected SEQ:MAC as logged", param_hint="--head") from None
    if n < 1 or len(mac) != 64:
        raise click.BadParameter("expected SEQ:MAC as logged", param_hint="--head")
    return Head(n, mac.lower())


@audit.command()
@click.option("--before", required=True, metavar="DATE", help="Remove records older than this.")
@_store_option
@yes_option()
@json_option
def prune(before: str, store_url: str | None, yes: bool, as_json: bool) -> None:
    """Remove old records; a checkpoint record keeps the rest verifiable."""
    when = audit_report.parse_when(before, "--before")
    store = _store(store_url, open_master=True)
    confirm(yes, f"Remove the audit records that ended before {when.isoformat()}?")
    progress = Progress("pruning the audit trail", None, quiet=as_json, unit="records")
    try:
        res = store.prune(when, progress=progress.update)
    finally:
        progress.close()
    if "refused" in res:
        bad = res["refused"]["first_bad"]
        emit(as_json, res, lambda: echo(f"audit trail broken at record {bad}: nothing pruned"))
        click.get_current_context().exit(EXIT_FAILED_ROWS)
    emit(
        as_json,
        res,
        lambda: echo(
            f"removed {res['removed']} record(s)"
            + (
                f" up to {res['pruned_through']}; checkpoint {res['checkpoint']}"
                if res["removed"]
                else ""
            )
        ),
    )
