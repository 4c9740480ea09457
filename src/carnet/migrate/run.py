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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from .. import envelope
from ..batch import BatchReport, BatchRow, run_batches
from ..errors import CarnetError
from ..manager import KeyManager
from . import scan as sc
from . import state
from .target import IN_PLACE, Target

Prefixed = Literal["report", "encrypt"]

# A legacy value whose ciphertext would not fit its length-limited column
# (VARCHAR(n)), as `plan` counts them: left and reported, never sent to a
# database that would refuse (or, without strict mode, cut) it.
TOO_LONG = "too_long"


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


def _transform(keys: KeyManager, target: Target, prefixed: Prefixed,
               problems: dict[str, dict[tuple[Any, ...], None]]) -> Callable[[BatchRow], Any]:
    label = target.label
    in_place = target.mode == IN_PLACE
    limit = getattr(target.table.c[target.source].type, "length", None) if in_place else None

    def left(kind: str, pk: tuple[Any, ...]) -> RowLeft:
        problems.setdefault(kind, {})[pk] = None
        return RowLeft(f"row {pk!r} left: {kind}")

    def seal(text: str, tenant: str) -> bytes:
        return keys.encrypt(text.encode("utf-8"), tenant=tenant, label=label)

    def transform(row: BatchRow) -> Any:
        tenant = sc.tenant_str(row.extra.get("tenant"))
        if in_place:
            value = row.value
            if value is None:
                return None
            if tenant is None:
                raise left(sc.NO_TENANT, row.pk)
            kind = sc.classify_text(keys, value, tenant, label)
            if kind in (sc.SEALED, sc.SHREDDED):
                return None
            if kind == sc.PREFIXED_INVALID and prefixed != "encrypt":
                raise left(sc.PREFIXED_INVALID, row.pk)
            sealed = envelope.to_text(seal(value, tenant))
            if limit is not None and len(sealed) > limit:
                raise left(TOO_LONG, row.pk)
            return sealed
        # Expand/contract: row.value is the new binary column, the legacy text in extra.
        if row.value is not None:
            return None
        source = row.extra.get("source")
        if source is None:
            return None
        if tenant is None:
            raise left(sc.NO_TENANT, row.pk)
        kind = sc.classify_text(keys, source, tenant, label)
        if kind == sc.SEALED:
            return envelope.from_text(source)
        if kind == sc.PREFIXED_INVALID and prefixed != "encrypt":
            raise left(sc.PREFIXED_INVALID, row.pk)
        return seal(source, tenant)

    return transform


def run_migration(
    keys: KeyManager,
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
        engine, target.table, target.column, _transform(keys, target, prefixed, problems),
        job=target.job, extra_columns=extra, join=target.join_or_none(),
        batch_size=batch_size, worker=worker, progress=on_batch, restart=restart,
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

    @property
    def clean(self) -> bool:
        """Every non-NULL value opens (or was crypto-shredded): nothing else is stored."""
        return all(self.totals.get(k, 0) == 0 for k in sc.KINDS
                   if k not in (sc.SEALED, sc.NULL, sc.SHREDDED))

    def as_dict(self) -> dict[str, Any]:
        return {"totals": self.totals, "samples": self.samples, "clean": self.clean}


def verify(keys: KeyManager, engine: sa.Engine, target: Target,
           batch_size: int = 1000) -> Verification:
    """Read every value back and open it with its row's tenant: authenticated, not by prefix."""
    counts: Counter[str] = Counter()
    samples: dict[str, list[list[Any]]] = {}
    for batch in sc.scan(engine, target, batch_size):
        for row in batch:
            kind = sc.classify(keys, target, row)
            counts[kind] += 1
            if kind not in (sc.SEALED, sc.NULL, sc.SHREDDED):
                s = samples.setdefault(kind, [])
                if len(s) < 20:
                    s.append(list(row.pk))
    return Verification({k: counts.get(k, 0) for k in sc.KINDS}, samples)


def finish(keys: KeyManager, engine: sa.Engine, target: Target,
           batch_size: int = 1000) -> Verification:
    """Verify, then record the column as strict. Records nothing unless every value opens."""
    v = verify(keys, engine, target, batch_size)
    if v.clean:
        state.record(engine, target.describe(), state.STRICT, rows=v.totals[sc.SEALED])
    return v
