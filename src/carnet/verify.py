"""The one read-back of an encrypted column: every stored value opened and classified.

``carnet verify`` (:func:`carnet.lifecycle.verify`) and ``carnet migrate
verify`` / ``finish`` (:func:`carnet.migrate.run.verify`) are two reports over
:func:`walk`; ``migrate plan`` and the migration's backfill judge a value with
the same :func:`classify`. So there is one answer to "what is this stored
value", whichever command asks.

Reading: the batch engine's keyset walk (:func:`carnet.batch.iter_rows`: flat
memory, one short read per batch), by the declared primary key or the
columns given as ``pk``, with the row's practice taken from a column of the
row or of a parent table through joins. A database error is raised as
:class:`~carnet.errors.DatabaseError` naming the table, the column and the
last primary key read, never a value, and chaining no driver exception.

Opening: exactly as the application reads a value, through
:meth:`KeyManager.decrypt` with the row's practice and the column's label
(authenticated decryption: the prefix only gets a value into it). A walk
without a practice column opens each value as its key's practice, which
proves it authentic but not that it sits in a row of that practice.

Outcomes, one per value: :data:`OK`, :data:`NULL`, :data:`PLAINTEXT` (legacy
text without carnet's prefix), :data:`DESTROYED` (under a destroyed key: a
crypto-shredded practice, unreadable by design), :data:`LEGACY_SEALED` (an
expand/contract migration's new column is still NULL while the legacy column
holds a value that opens for the row) and :data:`FAILED`, with a reason. A
value under a retired key fails (``retired_key``): its practice was not
erased, the value was left behind by a re-encryption.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa

from . import envelope, reflect
from .batch import iter_rows
from .errors import (
    CarnetError,
    DatabaseError,
    InvalidCiphertext,
    KeyDestroyed,
    KeyRetired,
    TenantMismatch,
    UnknownKey,
    db_error_code,
    describe_db_error,
)
from .manager import KeyManager
from .reflect import check_column, resolve, resolve_table
from .stored import _label

__all__ = [
    "DESTROYED",
    "FAILED",
    "LEGACY_SEALED",
    "NULL",
    "OK",
    "PLAINTEXT",
    "Findings",
    "KeyPractices",
    "Outcome",
    "Row",
    "classify",
    "classify_row",
    "rows",
    "walk",
]

# -- outcomes ---------------------------------------------------------------------------

OK = "ok"
NULL = "null"
PLAINTEXT = "plaintext"
DESTROYED = "destroyed"
LEGACY_SEALED = "legacy_sealed"
FAILED = "failed"

# Why a value failed.
NO_PRACTICE = "no_practice"  # the row has no practice (NULL, empty, or an orphan's parent)
RETIRED_KEY = "retired_key"
UNKNOWN_KEY = "unknown_key"
TAMPERED = "tampered_or_foreign"  # does not authenticate: altered, or of another column
OTHER_PRACTICE = "other_practice"  # authentic, but sealed for another practice
NOT_CIPHERTEXT = "not_ciphertext"  # text without the prefix where only ciphertext belongs
ERROR = "error"  # any other carnet error (a master key that is not available...)

# Most specific first: KeyRetired is a KeyDestroyed.
_REASONS: tuple[tuple[type[CarnetError], str], ...] = (
    (KeyRetired, RETIRED_KEY),
    (UnknownKey, UNKNOWN_KEY),
    (InvalidCiphertext, TAMPERED),
    (TenantMismatch, OTHER_PRACTICE),
)


@dataclass(frozen=True)
class Outcome:
    """What one stored value is. ``practice``: the practice it was judged under
    (the row's; without a practice column, its key's), None when unknown."""

    kind: str
    reason: str | None = None
    practice: str | None = None


def practice_str(v: Any) -> str | None:
    """A row's practice as the manager takes it; None for NULL or empty."""
    if v is None or v == "":
        return None
    return v if isinstance(v, str) else str(v)


class KeyPractices:
    """The practice of each key id, read once per key: a walk without a practice column."""

    def __init__(self, manager: KeyManager) -> None:
        self.manager = manager
        self._by_id: dict[bytes, str | None] = {}

    def of(self, blob: bytes) -> str:
        """The practice of ``blob``'s key; raises InvalidCiphertext or UnknownKey."""
        kid = envelope.key_id_of(blob)
        if kid not in self._by_id:
            rec = self.manager.get_key(kid)
            self._by_id[kid] = rec.tenant if rec is not None else None
        practice = self._by_id[kid]
        if practice is None:
            raise UnknownKey(kid)
        return practice


def classify(
    manager: KeyManager,
    value: Any,
    *,
    label: str,
    tenant: str | None,
    by_key: KeyPractices | None = None,
) -> Outcome:
    """Open one stored value (raw: bytes, or carnet's prefixed text form) as the application would.

    ``tenant`` is the row's practice; with ``by_key`` the value is opened as
    its key's practice instead (no practice column). Never trusts the prefix:
    a value is OK only when it opens under AES-GCM with the practice and label.
    """
    if value is None:
        return Outcome(NULL, practice=tenant)
    if by_key is None and tenant is None:
        return Outcome(FAILED, NO_PRACTICE)
    practice = tenant if by_key is None else None
    try:
        if isinstance(value, str):
            if not envelope.looks_like_text_ciphertext(value):
                return Outcome(PLAINTEXT, practice=practice)
            blob = envelope.from_text(value)
        else:
            blob = bytes(value)
        if by_key is not None:
            practice = by_key.of(blob)
        if practice is None:  # by row, returned above already
            return Outcome(FAILED, NO_PRACTICE)
        if manager.is_decoy(envelope.key_id_of(blob)):
            # A decoy (carnet.decoys): recognised by its key, never opened, so
            # verifying never raises the alarm. Its key and format were checked.
            return Outcome(OK, practice=practice)
        manager.decrypt(blob, tenant=practice, label=label)
    except KeyRetired:
        return Outcome(FAILED, RETIRED_KEY, practice)
    except KeyDestroyed:
        return Outcome(DESTROYED, practice=practice)
    except CarnetError as exc:
        reason = next((name for cls, name in _REASONS if isinstance(exc, cls)), ERROR)
        return Outcome(FAILED, reason, practice)
    return Outcome(OK, practice=practice)


def classify_row(
    manager: KeyManager,
    row: Row,
    *,
    label: str,
    expand: bool = False,
    by_key: KeyPractices | None = None,
) -> Outcome:
    """One row's outcome. ``expand``: ``row.value`` is the new column of an
    expand/contract migration and ``row.source`` the legacy one."""
    if not expand:
        return classify(manager, row.value, label=label, tenant=row.tenant, by_key=by_key)
    if row.value is not None:
        if row.tenant is None and by_key is None:
            return Outcome(FAILED, NO_PRACTICE)
        if isinstance(row.value, str) and not envelope.looks_like_text_ciphertext(row.value):
            # Nothing but ciphertext is ever written to the new column.
            return Outcome(FAILED, NOT_CIPHERTEXT, row.tenant)
        return classify(manager, row.value, label=label, tenant=row.tenant, by_key=by_key)
    if row.source is None:
        return Outcome(NULL, practice=row.tenant)
    if row.tenant is None and by_key is None:
        return Outcome(FAILED, NO_PRACTICE)
    if not isinstance(row.source, str):
        return Outcome(PLAINTEXT, practice=row.tenant)  # a DATE column: never ciphertext
    out = classify(manager, row.source, label=label, tenant=row.tenant, by_key=by_key)
    if out.kind == OK:
        return Outcome(LEGACY_SEALED, practice=out.practice)
    return out


# -- reading ----------------------------------------------------------------------------


@dataclass
class Row:
    """One row read: primary key, practice, the stored value, and the legacy
    value (``source``: the same value unless an expand/contract migration)."""

    pk: tuple[Any, ...]
    tenant: str | None
    value: Any
    source: Any

    def __repr__(self) -> str:
        # Values may be legacy plaintext: never shown.
        return f"Row(pk={self.pk!r}, tenant={self.tenant!r})"


def rows(
    engine: sa.Engine,
    table: sa.Table,
    column: str,
    *,
    tenant: sa.ColumnElement[Any] | None = None,
    join: Callable[[sa.Select[Any]], sa.Select[Any]] | None = None,
    pk: Sequence[str] = (),
    source: str | None = None,
    batch_size: int = 1000,
) -> Iterator[list[Row]]:
    """Every row of ``table``, a batch at a time, read-only, in primary-key order."""
    extra: dict[str, sa.ColumnElement[Any]] = {}
    if tenant is not None:
        extra["tenant"] = tenant
    if source is not None:
        extra["source"] = table.c[source]
    it = iter_rows(
        engine,
        table,
        column,
        extra_columns=extra,
        join=join,
        batch_size=batch_size,
        pk=pk,
    )
    last: tuple[Any, ...] | None = None
    while True:
        batch: list[Row] = []
        failure: DatabaseError | None = None
        try:
            for r in it:
                batch.append(
                    Row(
                        r.pk,
                        practice_str(r.extra.get("tenant")),
                        r.value,
                        r.extra["source"] if source is not None else r.value,
                    )
                )
                if len(batch) >= batch_size:
                    break
        except sa.exc.DBAPIError as exc:
            after = f"after primary key {list(last)}" if last is not None else "from the start"
            failure = DatabaseError(
                f"{table.name}.{column}: database error while reading the rows {after}: "
                f"{describe_db_error(exc)}",
                table=table.name,
                column=source or column,
                pks=(last,) if last is not None else (),
                code=db_error_code(exc),
            )
        if failure is not None:
            # Outside the except block: the driver's message may quote a
            # stored value (SQLite's undecodable text), and must not ride
            # along as __context__.
            raise failure
        if not batch:
            return
        last = batch[-1].pk
        yield batch
        if len(batch) < batch_size:
            return


# -- the walk ---------------------------------------------------------------------------


@dataclass
class Findings:
    """What a walk found: counts by (kind, reason) in order of first sight, the
    non-NULL values of each practice ("" when unknown) by kind, and sample
    primary keys by the name the caller gave."""

    rows: int = 0
    counts: Counter[tuple[str, str | None]] = field(default_factory=Counter)
    practices: dict[str, Counter[str]] = field(default_factory=dict)
    samples: dict[str, list[list[Any]]] = field(default_factory=dict)

    def total(self, kind: str) -> int:
        return sum(n for (k, _), n in self.counts.items() if k == kind)


def walk(
    manager: KeyManager,
    engine: sa.Engine,
    table: sa.Table,
    column: str,
    *,
    label: str,
    tenant: sa.ColumnElement[Any] | None = None,
    join: Callable[[sa.Select[Any]], sa.Select[Any]] | None = None,
    pk: Sequence[str] = (),
    source: str | None = None,
    batch_size: int = 1000,
    sample_as: Callable[[Outcome], str | None] | None = None,
    samples: int | None = 20,
    progress: Callable[[int], None] | None = None,
) -> Findings:
    """Read every value of ``table.column`` and classify it (see the module's docstring).

    ``tenant``: the row's practice column (on ``table``, or on a parent table
    that ``join`` adds); None opens each value as its key's practice.
    ``pk``: the columns to page by when the table declares no primary key.
    ``source``: the legacy column of an expand/contract migration, ``column``
    being the new one. ``sample_as`` names the outcomes whose primary keys are
    kept (None: not kept), at most ``samples`` per name (None: all).
    ``progress`` is told the number of rows of each batch.
    """
    by_key = KeyPractices(manager) if tenant is None else None
    found = Findings()
    for batch in rows(
        engine,
        table,
        column,
        tenant=tenant,
        join=join,
        pk=pk,
        source=source,
        batch_size=batch_size,
    ):
        for row in batch:
            out = classify_row(manager, row, label=label, expand=source is not None, by_key=by_key)
            found.rows += 1
            found.counts[out.kind, out.reason] += 1
            if out.kind != NULL:
                found.practices.setdefault(out.practice or "", Counter())[out.kind] += 1
            name = sample_as(out) if sample_as is not None else None
            if name is not None:
                kept = found.samples.setdefault(name, [])
                if samples is None or len(kept) < samples:
                    kept.append(list(row.pk))
        if progress is not None:
            progress(len(batch))
    return found


# -- the database's own checks of the column ----------------------------------------------


def checks_spec(
    engine: sa.Engine,
    table: str,
    column: str,
    tenant_column: str | None = None,
    pk: Sequence[str] = (),
) -> Any:
    """The :class:`carnet.dbchecks.ColumnSpec` of a column named as ``carnet verify`` names it.

    ``tenant_column``: ``practice_id`` (a column of the row) or
    ``patients.practice_id`` (a parent reached by a foreign key); without it
    only the format check is known. A column that ``carnet migrate`` records
    as running in place is in its mixed-read phase.
    """
    from . import dbchecks, migrations

    rec = migrations.get(engine, table, column)
    mixed = rec is not None and rec["state"] != migrations.STRICT and rec["mode"] == "in-place"
    mode: dbchecks.Mode = "mixed" if mixed else "v2"
    if tenant_column is not None and "." in tenant_column:
        # The practice of a parent table: resolved and checked as a migration's.
        spec = reflect.checks_spec(resolve(engine, table, column, tenant=tenant_column, pk=pk))
        return replace(spec, mode=mode)
    with engine.connect() as conn:
        return dbchecks.column_spec(conn, table, column, tenant_column=tenant_column, mode=mode)


def database_checks(
    engine: sa.Engine,
    table: str,
    column: str,
    tenant_column: str | None = None,
    pk: Sequence[str] = (),
) -> dict[str, Any]:
    """Whether the database holds the column's checks, in the mode its data allows.

    ``ok`` False (a failure) when a check is missing, disabled or NOT VALID
    (PostgreSQL), or weaker than the data allows; ``fix`` is the ``carnet
    checks install`` command that restores them.
    """
    from . import dbchecks

    spec = checks_spec(engine, table, column, tenant_column, pk)
    with engine.connect() as conn:
        found = dbchecks.column_checks(conn, spec)
        out = found.as_dict()
        out["disabled"] = sorted(dbchecks.disabled(conn, table) & set(found.missing))
    return out


Progress = Callable[[int], None]


# -- verify -----------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """What ``verify`` found. Rows under a destroyed key (a crypto-shredded
    practice) are the erasure working, counted as ``destroyed``, not as failures."""

    table: str
    column: str
    rows: int = 0
    ok: int = 0
    nulls: int = 0
    plaintext: int = 0
    destroyed: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    # practice -> {"ok", "destroyed", "failed"}; "" when the practice is unknown
    # (a value under a key carnet does not have, with no practice column)
    practices: dict[str, dict[str, int]] = field(default_factory=dict)
    failed_pks: list[list[Any]] = field(default_factory=list)
    tenant_column: str | None = None
    # the database's checks of the column (carnet.verify.database_checks)
    checks: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _tenant_source(
    manager: KeyManager,
    table: str,
    column: str,
    tenant_column: str,
    pk: Sequence[str] = (),
) -> tuple[sa.Table, sa.ColumnElement[Any], Callable[[sa.Select[Any]], sa.Select[Any]] | None]:
    """The table, the row's practice column and the join reaching it.

    ``practice_id`` is a column of the table itself; ``patients.practice_id``
    a column of a parent table reached through foreign keys, resolved exactly
    as ``carnet migrate --tenant`` resolves it.
    """
    if "." not in tenant_column:
        check_column(manager.engine, table, tenant_column, pk=pk)
        tbl = resolve_table(manager.engine, table)
        return tbl, tbl.c[tenant_column], None
    target = resolve(manager.engine, table, column, tenant=tenant_column, pk=pk)
    return target.table, target.tenant_column(), target.join_or_none()


def verify(
    manager: KeyManager,
    table: str,
    column: str,
    *,
    label: str | None = None,
    allow_plaintext: bool = False,
    batch_size: int = 1000,
    tenant_column: str | None = None,
    progress: Progress | None = None,
    pk: Sequence[str] = (),
) -> VerifyReport:
    """Decrypt every value; count failures by reason and list their primary keys.

    Without ``tenant_column`` each value is opened as its key's practice, which
    proves it authentic but not that it sits in a row of that practice; with it,
    each value must open as its own row's practice, as the application reads it,
    and a row without a practice fails (``no_practice``). ``tenant_column`` is a
    column of the table, or ``parent.column`` of a table reached through foreign
    keys (``patients.practice_id``). ``pk`` names the columns to page by in a
    table without a declared primary key.

    The walk is :func:`carnet.verify.walk`, the one ``carnet migrate verify``
    reports too.
    """
    check_column(manager.engine, table, column, pk=pk)
    lab = _label(table, column, label)

    def fails(out: Outcome) -> bool:
        return out.kind == FAILED or (out.kind == PLAINTEXT and not allow_plaintext)

    # One Table for the walk, the join and the practice column, so the SELECT
    # names a single FROM.
    join = None
    tcol = None
    if tenant_column is not None:
        tbl, tcol, join = _tenant_source(manager, table, column, tenant_column, pk)
    else:
        tbl = resolve_table(manager.engine, table)
    found = walk(
        manager,
        manager.engine,
        tbl,
        column,
        label=lab,
        tenant=tcol,
        join=join,
        pk=pk,
        batch_size=batch_size,
        sample_as=lambda out: "failed" if fails(out) else None,
        samples=None,
        progress=progress,
    )
    rep = VerifyReport(table=table, column=column, tenant_column=tenant_column)
    rep.rows = found.rows
    rep.ok = found.total(OK)
    rep.nulls = found.total(NULL)
    rep.plaintext = found.total(PLAINTEXT)
    rep.destroyed = found.total(DESTROYED)
    for (kind, reason), n in found.counts.items():
        if kind == FAILED or (kind == PLAINTEXT and not allow_plaintext):
            rep.failed += n
            name = reason or PLAINTEXT
            rep.reasons[name] = rep.reasons.get(name, 0) + n
    for practice, c in found.practices.items():
        counts = {
            "ok": c[OK],
            "destroyed": c[DESTROYED],
            "failed": c[FAILED] + (0 if allow_plaintext else c[PLAINTEXT]),
        }
        if any(counts.values()):
            rep.practices[practice] = counts
    rep.failed_pks = found.samples.get("failed", [])
    rep.checks = database_checks(manager.engine, table, column, tenant_column, pk)
    return rep
