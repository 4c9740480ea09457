"""``run``, ``verify`` and ``finish``: the migration itself, on the shared batch engine.

The transform seals legacy plaintext with the row's tenant and the column's
label. A value that already opens for its row is left alone, so a rerun (or a
second worker over the same range) never encrypts anything twice. A value
that starts with carnet's prefix but does not open is left and reported,
unless the operator decided ``prefixed="encrypt"`` after looking at them.

Errors: a database error during the run is raised as
:class:`~carnet.errors.DatabaseError`, naming the table, column and primary
keys, never a value, and chaining no driver exception; the statements run on
the caller's engine with their parameters hidden from its log and errors,
since the compare-and-set binds each legacy note as the old value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from .. import dbchecks, envelope
from .. import verify as vf
from ..batch import BatchReport, BatchRow, run_batches
from ..errors import CarnetError, InvalidPlaintext
from ..manager import KeyManager
from ..reflect import checks_spec, is_text_column, require_sealable_in_place, spec_for_path
from . import scan as sc
from . import state
from .target import IN_PLACE, TEXT, Target, TenantPath

Prefixed = Literal["report", "encrypt"]

# A legacy value whose ciphertext would not fit its length-limited column
# (VARCHAR(n)), as `plan` counts them: left and reported, never sent to a
# database that would refuse (or, without strict mode, cut) it.
TOO_LONG = "too_long"
# A value the column's carnet type does not store (a JSON scalar, a BLOB over
# EncryptedBytes's limit): left in the legacy column and listed.
NOT_STORABLE = "not_storable"


class RowLeft(CarnetError):
    """A row the migration could not seal; the engine lists its primary key as failed."""


@dataclass
class RunResult:
    report: BatchReport
    problems: dict[str, list[list[Any]]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.report.failed

    def as_dict(self) -> dict[str, Any]:
        d = self.report.as_dict()
        d["problems"] = {k: v for k, v in self.problems.items()}
        d["complete"] = self.complete
        return d


def _transform(
    manager: KeyManager,
    target: Target,
    prefixed: Prefixed,
    problems: dict[str, dict[tuple[Any, ...], None]],
) -> Callable[[BatchRow], Any]:
    label = target.label
    in_place = target.mode == IN_PLACE
    # The stored width of the column receiving ciphertext: characters of the
    # text form in place, bytes in a new VARBINARY(n) column (EncryptedString
    # on MariaDB); None when unbounded.
    limit = getattr(target.table.c[target.column].type, "length", None)
    # Expand into a text column (EncryptedString(n, storage="text")): the
    # prefixed text form, as the application's type stores it.
    text_into = not in_place and is_text_column(target.table.c[target.column])

    def left(kind: str, pk: tuple[Any, ...]) -> RowLeft:
        problems.setdefault(kind, {})[pk] = None
        return RowLeft(f"row {pk!r} left: {kind}")

    def seal(text: str, tenant: str) -> bytes:
        return manager.encrypt(text.encode("utf-8"), tenant=tenant, label=label)

    typed = target.plaintext != TEXT

    def transform(row: BatchRow) -> Any:
        tenant = sc.tenant_str(row.extra.get("tenant"))
        if in_place:
            value = row.value
            if value is None:
                return None
            if tenant is None:
                raise left(sc.NO_TENANT, row.pk)
            kind = sc.classify_text(manager, value, tenant, label)
            if kind in (sc.SEALED, sc.SHREDDED):
                return None
            if kind == sc.PREFIXED_INVALID and prefixed != "encrypt":
                raise left(sc.PREFIXED_INVALID, row.pk)
            text = envelope.to_text(seal(value, tenant))
            if limit is not None and len(text) > limit:
                raise left(TOO_LONG, row.pk)
            return text
        # Expand/contract: row.value is the new binary column, the legacy text in extra.
        if row.value is not None:
            return None
        source = row.extra.get("source")
        if source is None:
            return None
        if tenant is None:
            raise left(sc.NO_TENANT, row.pk)
        stored: bytes | str
        if typed or not isinstance(source, str):
            # A DATE, a BLOB or a JSON value: sealed as EncryptedDate,
            # EncryptedBytes or EncryptedJSON seal it, so that they read it back.
            try:
                plain = target.plaintext_of(source)
            except InvalidPlaintext:
                plain = None  # a JSON scalar, an oversized BLOB: left, outside the except
            if plain is None:
                raise left(NOT_STORABLE, row.pk)
            stored = manager.encrypt(plain, tenant=tenant, label=label)
        else:
            kind = sc.classify_text(manager, source, tenant, label)
            if kind == sc.SEALED:
                blob = envelope.from_text(source)
                if envelope.is_current(blob):
                    return source if text_into else blob
                # Format v1, copied as it is written today (v2); it opened for this row.
                plain = manager.decrypt(blob, tenant=tenant, label=label)
                stored = manager.encrypt(plain, tenant=tenant, label=label)
            elif kind == sc.PREFIXED_INVALID and prefixed != "encrypt":
                raise left(sc.PREFIXED_INVALID, row.pk)
            else:
                stored = seal(source, tenant)
        if text_into:
            stored = envelope.to_text(stored)
        if limit is not None and len(stored) > limit:
            raise left(TOO_LONG, row.pk)
        return stored

    return transform


def run_migration(
    manager: KeyManager,
    engine: sa.Engine,
    target: Target,
    *,
    batch_size: int = 500,
    worker: tuple[int, int] = (0, 1),
    prefixed: Prefixed = "report",
    restart: bool = False,
    pause: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> RunResult:
    """Seal every legacy value of ``target``; resumable, online, concurrent writes win.

    ``pause`` seconds between batches leave the database room for the
    application on a busy server.
    """
    if prefixed not in ("report", "encrypt"):
        raise ValueError("prefixed must be 'report' or 'encrypt'")
    require_sealable_in_place(target)
    engine = _parameters_hidden(engine)
    state.record(engine, target.describe(), state.RUNNING)
    problems: dict[str, dict[tuple[Any, ...], None]] = {}
    extra: dict[str, sa.ColumnElement[Any]] = {"tenant": target.tenant_column()}
    if target.mode != IN_PLACE:
        extra["source"] = target.table.c[target.source]

    def on_batch(n: int) -> None:
        if progress is not None:
            progress(n)
        if pause > 0:
            time.sleep(pause)

    report = run_batches(
        engine,
        target.table,
        target.column,
        _transform(manager, target, prefixed, problems),
        job=target.job,
        extra_columns=extra,
        join=target.join_or_none(),
        batch_size=batch_size,
        worker=worker,
        progress=on_batch,
        restart=restart,
        pk=target.pk,
    )
    return RunResult(report, {k: [list(pk) for pk in v] for k, v in problems.items()})


def _parameters_hidden(engine: sa.Engine) -> sa.Engine:
    """The same engine (pool, dialect, events) whose log lines and errors omit parameters.

    The compare-and-set binds every legacy note as its old value: an
    application engine with ``echo=True`` would log them in clear.
    """
    quiet = engine.execution_options()
    quiet.hide_parameters = True
    return quiet


@dataclass
class Verification:
    totals: dict[str, int]
    samples: dict[str, list[list[Any]]]
    # the database checks ``finish`` installed
    checks: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Every non-NULL value opens (or was crypto-shredded): nothing else is stored."""
        return all(self.totals.get(k, 0) == 0 for k in sc.KINDS if k not in sc.CLEAN)

    def as_dict(self) -> dict[str, Any]:
        return {"totals": self.totals, "samples": self.samples, "clean": self.clean}


def verify(
    manager: KeyManager, engine: sa.Engine, target: Target, batch_size: int = 1000
) -> Verification:
    """Read every value back and open it with its row's tenant: authenticated, not by prefix.

    The walk of :func:`carnet.verify.walk`, the one behind ``carnet verify``,
    reported in the migration's words, with up to 20 primary keys of each
    kind a finished column may not hold.
    """

    def problem(out: vf.Outcome) -> str | None:
        kind = sc.kind_of(out)
        return None if kind in sc.CLEAN else kind

    found = vf.walk(
        manager,
        engine,
        target.table,
        target.column,
        label=target.label,
        tenant=target.tenant_column(),
        join=target.join_or_none(),
        pk=target.pk,
        source=None if target.mode == IN_PLACE else target.source,
        batch_size=batch_size,
        sample_as=problem,
        samples=20,
    )
    totals = dict.fromkeys(sc.KINDS, 0)
    for (kind, reason), n in found.counts.items():
        totals[sc.kind_of(vf.Outcome(kind, reason))] += n
    return Verification(totals, found.samples)


def recorded_checks_spec(
    bind: sa.Connection, table: str, column: str, rec: dict[str, Any], schema: str | None = None
) -> dbchecks.ColumnSpec:
    """:func:`checks_spec` of a column from its ``carnet_migrations`` record (its tenant path)."""
    from .target import parse_via

    head, *vias = str(rec["tenant"]).split(" via ")
    ptable, _, pcol = head.rpartition(".")
    path = TenantPath(ptable or table, pcol, tuple(parse_via(v) for v in vias))
    storage = dbchecks.storage_of(bind, table, column, schema)
    return spec_for_path(table, schema, column, storage, path)


def finish(
    manager: KeyManager, engine: sa.Engine, target: Target, batch_size: int = 1000
) -> Verification:
    """Verify, install the strict (v2) database checks, then record the column as strict.

    Records nothing unless every value opens; the checks are installed first,
    so a column recorded strict always has them (``v.checks`` names them).
    """
    v = verify(manager, engine, target, batch_size)
    if v.clean:
        with engine.begin() as conn:
            v.checks = dbchecks.install(conn, [checks_spec(target)])
        state.record(engine, target.describe(), state.STRICT, rows=v.totals[sc.SEALED])
    return v


# -- blind indexes of a migrated identifier column --------------------------------------


@dataclass
class IndexBackfill:
    """The re-index of one blind index, practice by practice, after the ciphertext backfill."""

    index: str
    reports: dict[str, BatchReport] = field(default_factory=dict)
    destroyed: list[str] = field(default_factory=list)
    missing: int = 0  # rows whose sources are set but whose index is still NULL

    @property
    def failed(self) -> int:
        return sum(len(r.failed) for r in self.reports.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "missing": self.missing,
            "destroyed": self.destroyed,
            "tenants": {t: r.as_dict() for t, r in self.reports.items()},
        }


def backfill_index(
    manager: KeyManager,
    engine: sa.Engine,
    attr: Any,
    *,
    name: str | None = None,
    batch_size: int = 500,
    restart: bool = False,
) -> IndexBackfill:
    """Fill the blind index ``attr`` (a mapped ``BlindIndex`` attribute) for every practice.

    One :func:`carnet.searchable.reindex` per practice with rows: the batch
    engine, compare-and-set, progress in ``carnet_jobs`` (a killed run
    resumes). Rows whose sources are still NULL (not migrated yet) are left
    for a later run; a crypto-shredded practice is skipped. The sealed
    sources are opened with ``manager``.
    """
    from ..batchops import reindex
    from ..errors import KeyDestroyed
    from ..lookup import index_tenants

    out = IndexBackfill(name or str(attr))
    for tenant in index_tenants(engine, attr):
        try:
            out.reports[tenant] = reindex(
                engine, attr, tenant=tenant, batch_size=batch_size, restart=restart, manager=manager
            )
        except KeyDestroyed:
            out.destroyed.append(tenant)
    out.missing = missing_index_values(engine, attr, skip=out.destroyed)
    return out


def missing_index_values(engine: sa.Engine, attr: Any, skip: Sequence[str] = ()) -> int:
    """Rows whose indexed fields are all set but whose index value is NULL.

    A lenient index leaves NULL for values its transform refuses: not counted.
    """
    from ..lookup import index_spec

    column, sources, tenant_column, lenient = index_spec(attr)
    if lenient:
        return 0
    cond = [column.is_(None), *(s.is_not(None) for s in sources)]
    if skip:
        cond.append(sa.cast(tenant_column, sa.String).not_in(list(skip)))
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).select_from(column.table).where(*cond)
            ).scalar_one()
        )
