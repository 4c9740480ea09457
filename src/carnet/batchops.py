"""carnet's batch operations over stored values, each resumable through the batch engine.

- re-encryption under each practice's active key, one column
  (:func:`reencrypt`), every encrypted column of an application
  (:func:`reencrypt_columns`), or by parallel local workers
  (:func:`reencrypt_parallel`);
- re-indexing after an index root rotation (:func:`reindex`).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from . import envelope
from . import jobs as _jobs
from .batch import BatchReport, BatchRow, run_batches
from .errors import (
    ConfigurationError,
    InvalidCiphertext,
    UnknownKey,
)
from .indexing import _manager_for, _normalise, _value
from .keystore import DECOY, DESTROYED, RETIRED
from .lookup import _resolve, _tenant_eq
from .manager import KeyManager
from .reflect import check_column, raw_type, resolve_table
from .stored import _Keys, _label, blob_of, is_encrypted_column, require_encrypted
from .types import encrypted_type

Progress = Callable[[int], None]


# -- reencrypt --------------------------------------------------------------------------


def reencrypt_transform(
    manager: KeyManager,
    table: str,
    column: str,
    *,
    tenant: str | None = None,
    label: str | None = None,
    old_label: str | None = None,
    counts: Counter[str] | None = None,
) -> Callable[[BatchRow], Any | None]:
    """The transform moving one value to its tenant's active DEK, current label and
    the current format (a v1 value is re-sealed as v2, whatever its key).

    ``counts`` receives why each row was left alone (``nulls``, ``plaintext``,
    ``destroyed``, ``other_practice``), so a report does not call a shredded
    row or a NULL "already current", and ``from_v1``, the values re-sealed
    from format v1.
    """
    left: Counter[str] = counts if counts is not None else Counter()
    new_label = _label(table, column, label)
    labels = [old_label, new_label] if old_label else [new_label]
    keys = _Keys(manager)

    def transform(row: BatchRow) -> Any | None:
        blob = blob_of(row.value)
        if blob is None:
            left["nulls"] += 1
            return None
        if isinstance(blob, str):
            left["plaintext"] += 1  # legacy plaintext: that is migrate's work
            return None
        kid = envelope.key_id_of(blob)
        rec = keys.get(kid)
        if rec is None:
            raise UnknownKey(kid)
        if rec.kind == DECOY:
            return None  # a decoy stays under its decoy key, unopened (carnet.decoys)
        if tenant is not None and rec.tenant != tenant:
            left["other_practice"] += 1
            return None
        if rec.state in (DESTROYED, RETIRED):
            left["destroyed"] += 1  # can never be read again: nothing to move
            return None
        # A v1 value is re-sealed (as v2) even under the active key and label.
        on_active = kid == keys.active(rec.tenant) and envelope.is_current(blob)
        if on_active and old_label is None:
            return None
        for lab in labels:
            try:
                plain = manager.decrypt(blob, tenant=rec.tenant, label=lab)
                break
            except InvalidCiphertext:
                continue
        else:
            raise InvalidCiphertext(label=new_label, tenant=rec.tenant)
        if on_active and lab == new_label:
            return None
        sealed = manager.encrypt(plain, tenant=rec.tenant, label=new_label)
        if not envelope.is_current(blob):
            left["from_v1"] += 1
        return envelope.to_text(sealed) if isinstance(row.value, str) else sealed

    return transform


def reencrypt_job_name(table: str, column: str, tenant: str | None = None) -> str:
    return f"reencrypt:{table}.{column}" + (f":{tenant}" if tenant else "")


_LEFT = ("nulls", "plaintext", "destroyed", "other_practice")


@dataclass
class ReencryptReport(BatchReport):
    """A batch report that tells apart the rows ``reencrypt`` leaves alone.

    ``skipped`` (the batch engine's count) is every row not rewritten;
    ``already_current`` is the part of it already on the active key and label
    in format v2. ``from_v1``: values of format v1 re-sealed as v2 (counted
    when sealed, so a row the application wrote meanwhile, a conflict, counts
    too). A batch retried after a lock wait is counted again.
    """

    nulls: int = 0
    plaintext: int = 0
    destroyed: int = 0
    other_practice: int = 0
    from_v1: int = 0

    @property
    def already_current(self) -> int:
        return max(self.skipped - sum(int(getattr(self, k)) for k in _LEFT), 0)

    def add(self, other: dict[str, Any]) -> None:
        self.scanned += other["scanned"]
        self.rewritten += other["rewritten"]
        self.skipped += other["skipped"]
        self.conflicts += other["conflicts"]
        self.failed.extend(tuple(pk) for pk in other["failed"])
        for k in (*_LEFT, "from_v1"):
            setattr(self, k, getattr(self, k) + other.get(k, 0))

    def as_dict(self) -> dict[str, Any]:
        d = super().as_dict()
        d.update({k: getattr(self, k) for k in (*_LEFT, "from_v1")})
        d["already_current"] = self.already_current
        return d


def fresh_pass_if_finished(
    engine: sa.Engine, job: str, workers: int, *, any_count: bool = False
) -> bool:
    """Forget a finished job run with another worker count, so a new pass starts.

    A finished job has nothing to resume, so its worker count binds nothing;
    only an unfinished one must be resumed the way it was started. With
    ``any_count`` (one coordinating process, ``--workers N``) a finished job is
    forgotten whatever its count, so progress starts from zero and the new
    pass cuts ranges over today's rows.
    """
    if not sa.inspect(engine).has_table(_jobs.JOBS_TABLE):
        return False
    t = _jobs.JOBS
    with engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.workers, t.c.done).where(t.c.job == job)).all()
    if (
        rows
        and all(r.done for r in rows)
        and (any_count or any(r.workers != workers for r in rows))
    ):
        _jobs.reset_job(engine, job)
        return True
    return False


def reencrypt(
    manager: KeyManager,
    table: str,
    column: str,
    *,
    tenant: str | None = None,
    label: str | None = None,
    old_label: str | None = None,
    batch_size: int = 500,
    worker: tuple[int, int] = (0, 1),
    job: str | None = None,
    restart: bool = False,
    progress: Progress | None = None,
) -> ReencryptReport:
    """Move every value of ``table.column`` to its practice's active DEK (and label)."""
    require_encrypted(manager, table, column)
    job = job or reencrypt_job_name(table, column, tenant)
    new_label = label or f"{table}.{column}"
    if old_label is not None and old_label != new_label:
        from .dbchecks import accept_labels  # the database's check takes both labels meanwhile

        accept_labels(manager.engine, table, column, new_label, old_label)
    if not restart:
        fresh_pass_if_finished(manager.engine, job, worker[1])
    counts: Counter[str] = Counter()
    rep = run_batches(
        manager.engine,
        table,
        column,
        reencrypt_transform(
            manager, table, column, tenant=tenant, label=label, old_label=old_label, counts=counts
        ),
        job=job,
        batch_size=batch_size,
        worker=worker,
        progress=progress,
        restart=restart,
    )
    out = ReencryptReport(job=rep.job)
    out.add({**rep.as_dict(), **counts})
    out.resumed_from = rep.resumed_from
    out.elapsed = rep.elapsed
    if not out.failed and tenant is None:
        # The new label alone, and no v1 value left: f1 becomes f2.
        from .dbchecks import tighten_after_reencrypt

        relabel = old_label is not None and old_label != new_label
        tighten_after_reencrypt(manager.engine, table, column, new_label, relabel)
    return out


# -- reencrypt every encrypted column (--app / --all) ---------------------------------------


@dataclass(frozen=True)
class EncryptedColumn:
    """A column to re-encrypt: ``table`` (``schema.table`` allowed), ``column``, and its
    field label when the application sets one (else ``table.column``)."""

    table: str
    column: str
    label: str | None = None


@dataclass
class ColumnOutcome:
    table: str
    column: str
    # "reencrypted"; "done" (finished before an interruption of this run);
    # "not encrypted" (no carnet value yet: carnet migrate's work); "no table"
    outcome: str
    report: dict[str, Any] | None = None


@dataclass
class ReencryptAllReport:
    run: str
    resumed: bool
    columns: list[ColumnOutcome]
    total: ReencryptReport
    elapsed: float = 0.0

    @property
    def failed(self) -> list[tuple[Any, ...]]:
        return self.total.failed

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "run": self.run,
            "resumed": self.resumed,
            "columns": [asdict(c) for c in self.columns],
            "total": self.total.as_dict(),
            "elapsed": self.elapsed,
        }


def run_name(what: str, tenant: str | None = None) -> str:
    """The progress record of a run over several columns (``reencrypt:app``, ``reencrypt:all``)."""
    return f"reencrypt:{what}" + (f":{tenant}" if tenant else "")


def _has_table(engine: sa.Engine, table: str) -> bool:
    schema, _, name = table.rpartition(".")
    return sa.inspect(engine).has_table(name, schema=schema or None)


def rows_to_scan(manager: KeyManager, columns: Sequence[EncryptedColumn]) -> int:
    """Rows a pass over ``columns`` reads (a table once per column), for one progress bar."""
    return sum(
        estimate_rows(manager.engine, c.table)
        for c in columns
        if _has_table(manager.engine, c.table)
    )


def reencrypt_columns(
    manager: KeyManager,
    columns: Sequence[EncryptedColumn],
    *,
    run: str,
    tenant: str | None = None,
    batch_size: int = 500,
    restart: bool = False,
    progress: Progress | None = None,
) -> ReencryptAllReport:
    """:func:`reencrypt` every column in turn, as one resumable run.

    Each column is the job :func:`reencrypt` would run for it alone
    (``reencrypt:T.C``); the run has its own row in ``carnet_jobs``. A run
    killed midway resumes, when started again, inside the column it was in
    and skips the columns it had finished; a finished run (or ``restart``)
    starts a fresh pass over every column. A declared table missing from the
    database, and a column with no carnet value yet, are reported and left.
    """
    started = time.monotonic()
    engine = manager.engine
    resuming = not restart and _jobs.run_state(engine, run) is False
    if not resuming:
        # A fresh pass: what a column job recorded before belongs to an older one.
        for c in columns:
            _jobs.reset_job(engine, reencrypt_job_name(c.table, c.column, tenant))
        _jobs.start_run(engine, run)
    total = ReencryptReport(job=run)
    outcomes: list[ColumnOutcome] = []
    for c in columns:
        job = reencrypt_job_name(c.table, c.column, tenant)
        if not _has_table(engine, c.table):
            outcomes.append(ColumnOutcome(c.table, c.column, "no table"))
            continue
        if resuming and _jobs.job_finished(engine, job):
            outcomes.append(ColumnOutcome(c.table, c.column, "done"))
            if progress is not None:
                progress(estimate_rows(engine, c.table))
            continue
        tbl = check_column(engine, c.table, c.column)
        if not is_encrypted_column(manager, tbl, c.column):
            outcomes.append(ColumnOutcome(c.table, c.column, "not encrypted"))
            if progress is not None:
                progress(estimate_rows(engine, c.table))
            continue
        rep = reencrypt(
            manager,
            c.table,
            c.column,
            tenant=tenant,
            label=c.label,
            batch_size=batch_size,
            job=job,
            progress=progress,
        )
        d = rep.as_dict()
        outcomes.append(ColumnOutcome(c.table, c.column, "reencrypted", d))
        total.add(d)
    total.elapsed = time.monotonic() - started
    # Finished, failed rows included: a rerun is a fresh pass that retries them.
    _jobs.finish_run(
        engine,
        run,
        {
            "scanned": total.scanned,
            "rewritten": total.rewritten,
            "skipped": total.skipped,
            "conflicts": total.conflicts,
            "failed": len(total.failed),
        },
    )
    return ReencryptAllReport(
        run=run, resumed=resuming, columns=outcomes, total=total, elapsed=total.elapsed
    )


@dataclass
class WorkerSpec:
    database_url: str
    master_key: str
    previous_master_keys: tuple[str, ...]
    table: str
    column: str
    tenant: str | None
    label: str | None
    old_label: str | None
    batch_size: int
    job: str
    restart: bool


def _reencrypt_worker(spec: WorkerSpec, index: int, count: int) -> dict[str, Any]:
    def notice(message: str) -> None:
        # A worker process has no terminal of its own: stderr is the parent's.
        print(f"carnet: worker {index}/{count}: {message}", file=sys.stderr, flush=True)

    from .lifecycle import open_manager  # the worker process opens its own

    manager = open_manager(
        spec.database_url, spec.master_key, spec.previous_master_keys, lock_notice=notice
    )
    try:
        rep = reencrypt(
            manager,
            spec.table,
            spec.column,
            tenant=spec.tenant,
            label=spec.label,
            old_label=spec.old_label,
            batch_size=spec.batch_size,
            worker=(index, count),
            job=spec.job,
            restart=spec.restart,
        )
        return rep.as_dict()
    finally:
        manager.close()
        manager.engine.dispose()


def reencrypt_parallel(
    spec: WorkerSpec, workers: int, poll: Callable[[dict[str, Any]], None] | None = None
) -> ReencryptReport:
    """Run ``workers`` local processes on disjoint key ranges of one job; sum their reports.

    ``poll`` is called about twice a second with the job's summed progress
    from ``carnet_jobs`` (the same numbers workers on other machines add to).
    """
    from .lifecycle import make_engine

    started = time.monotonic()
    engine = make_engine(spec.database_url)
    try:
        if spec.restart:
            _jobs.reset_job(engine, spec.job)
        else:
            fresh_pass_if_finished(engine, spec.job, workers, any_count=True)
        # Create the job's ranges once, before the workers race to.
        _jobs.ensure_jobs_table(engine)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futs = [
                pool.submit(_reencrypt_worker, _no_restart(spec), i, workers)
                for i in range(workers)
            ]
            while not all(f.done() for f in futs):
                if poll is not None:
                    poll(_jobs.job_progress(engine, spec.job))
                time.sleep(0.5)
            results = [f.result() for f in futs]
            if poll is not None:
                poll(_jobs.job_progress(engine, spec.job))
    finally:
        engine.dispose()
    total = ReencryptReport(job=spec.job)
    for r in results:
        total.add(r)
    total.elapsed = time.monotonic() - started
    return total


def _no_restart(spec: WorkerSpec) -> WorkerSpec:
    from dataclasses import replace

    return replace(spec, restart=False)


def estimate_rows(engine: sa.Engine, table: str) -> int:
    tbl = resolve_table(engine, table)
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(tbl)).scalar_one())


# -- re-indexing after an index root rotation -----------------------------------------


def _job_name(label: str, tenant: str) -> str:
    name = f"bidx:{label}:{tenant}"
    if len(name) <= 255:
        return name
    # carnet_jobs.job holds 255 characters: a long practice id is hashed (ids are metadata).
    return f"bidx:{label[:100]}:{hashlib.sha256(name.encode()).hexdigest()}"


def _open_stored(typ: Any, raw: Any, tenant: str, manager: KeyManager) -> Any:
    """A source column's plaintext from its stored value (authenticated; no value in errors)."""
    enc = encrypted_type(typ)
    if raw is None or enc is None:
        return raw  # NULL, or a source kept in clear
    typ = enc
    if isinstance(raw, str):
        if not envelope.looks_like_text_ciphertext(raw):
            if typ.mixed_read:
                return raw  # legacy plaintext of a column still being migrated in place
            raise InvalidCiphertext("stored value is not carnet ciphertext", label=typ.field_label)
        blob = envelope.from_text(raw)
    else:
        blob = bytes(raw)
    if manager.is_decoy(envelope.key_id_of(blob)):
        return _DECOY  # recognised by its key, never opened (carnet.decoys)
    return typ.decrypt(blob, tenant, manager)


# What _open_stored returns for a decoy note: the row is skipped.
_DECOY = object()


def reindex(
    engine: sa.Engine,
    attr: Any,
    *,
    tenant: str,
    batch_size: int = 500,
    worker: tuple[int, int] = (0, 1),
    restart: bool = False,
    manager: KeyManager | None = None,
) -> BatchReport:
    """Recompute one practice's values of one blind index under its active root.

    Run after :meth:`KeyManager.rotate_index_root` (and once the other
    processes' key caches have expired, so none still writes under the old
    root), then retire the old root. Lookups search under every root that is
    not retired, so rows stay findable while this runs. Resumable: a rerun
    continues after the last committed batch (job ``bidx:<label>:<tenant>``);
    a concurrent application write wins over the batch (compare-and-set).
    """
    mapper, r = _resolve(attr)
    if r.tenant_column is None:
        raise ConfigurationError(f"{r.key}: re-indexing needs the row's tenant column")
    table = r.column.table
    if not isinstance(table, sa.Table):
        raise ConfigurationError(f"{r.key}: not a table column")
    if manager is None:
        manager = _manager_for(r.spec, r.source_types)
    cols = [mapper.column_attrs[s].columns[0] for s in r.sources]
    # Read as stored and opened here with ``manager``: the run depends on no
    # process-wide manager or scope (a CLI or a migration passes its own).
    sources = {
        f"src{i}": sa.type_coerce(c, raw_type(c, engine.dialect)) for i, c in enumerate(cols)
    }
    root = manager.index_roots(tenant)[0]
    spec = r.spec

    def transform(row: BatchRow) -> Any | None:
        values = [
            _open_stored(c.type, row.extra[f"src{i}"], tenant, manager) for i, c in enumerate(cols)
        ]
        if any(v is _DECOY for v in values):
            return None  # a decoy's index stays as planted; it is never opened
        normalised = _normalise(spec, values)
        if normalised is None:
            return None
        return _value(spec, root, normalised, tenant)

    return run_batches(
        engine,
        table,
        str(r.column.key),
        transform,
        job=_job_name(spec.field_label, tenant),
        extra_columns=sources,
        where=_tenant_eq(r.tenant_column, tenant),
        batch_size=batch_size,
        worker=worker,
        restart=restart,
    )
