"""``plan``: what a migration would do, without writing anything.

Counts per tenant (per practice) of values to encrypt, values already sealed,
NULLs, values that start with carnet's prefix but do not open (reported, never
skipped: see docs/migration.md, "Values that only look encrypted"), rows with
no tenant, and, for a length-limited column migrated in place, values whose
ciphertext would not fit. Plus a duration estimate.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .. import envelope
from .._engines import make_engine
from ..batch import WritePlan
from ..errors import CarnetError, InvalidPlaintext
from ..manager import KeyManager
from ..reflect import is_text_column, require_sealable_in_place
from . import scan as sc
from .target import EXPAND, IN_PLACE, Target

# Rows per second of `migrate run`, one worker. PostgreSQL: bench/bench_migrate.py
# measured 5,084 rows/s on 200,000 notes (2 cores, local server, busy machine).
# SQLite and MariaDB were not benchmarked: rough guesses; pass --rate to
# override. A busy server, a remote master key or long notes are slower.
DEFAULT_RATES = {"sqlite": 5000.0, "postgresql": 5000.0, "mariadb": 3000.0}

# Up to this many primary keys of each problem kind are listed; the counts are exact.
SAMPLE = 20


def _stored_length(target: Target, row: sc.ScannedRow, in_place: bool) -> int:
    """Characters (text form) or bytes (binary) of the value sealed for ``row``."""
    try:
        size = len(target.plaintext_of(row.source))
    except InvalidPlaintext:
        return 0  # not storable at all: the run leaves the row and lists it
    tenant = sc.tenant_str(row.tenant) or ""
    text = in_place or is_text_column(target.table.c[target.column])
    return envelope.width(size, len(tenant.encode("utf-8")), text=text)


def backend_of(engine: sa.Engine) -> str:
    name = engine.dialect.name
    return "mariadb" if name in ("mysql", "mariadb") else name


@dataclass
class Plan:
    target: dict[str, Any]
    per_tenant: dict[str, dict[str, int]]
    totals: dict[str, int]
    samples: dict[str, list[list[Any]]]
    too_long: int
    column_length: int | None
    indexes: list[str]
    rate: float
    rate_source: str
    scan_seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def to_encrypt(self) -> int:
        return sum(self.totals.get(k, 0) for k in sc.TO_DO)

    @property
    def estimate_seconds(self) -> float:
        return self.to_encrypt / self.rate if self.rate > 0 else 0.0

    @property
    def needs_decision(self) -> bool:
        return self.totals.get(sc.PREFIXED_INVALID, 0) > 0

    @property
    def blocking(self) -> bool:
        """True when `run` cannot complete as things stand (a decision or a fix is needed)."""
        return self.needs_decision or self.totals.get(sc.NO_TENANT, 0) > 0 or self.too_long > 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "totals": self.totals,
            "per_tenant": self.per_tenant,
            "to_encrypt": self.to_encrypt,
            "samples": self.samples,
            "ciphertext_too_long": self.too_long,
            "column_length": self.column_length,
            "indexes_on_column": self.indexes,
            "estimate_seconds": round(self.estimate_seconds, 1),
            "rate_rows_per_second": self.rate,
            "rate_source": self.rate_source,
            "scan_seconds": round(self.scan_seconds, 3),
            "needs_decision": self.needs_decision,
            "warnings": self.warnings,
        }


def column_indexes(engine: sa.Engine, target: Target) -> list[str]:
    """Indexes covering the legacy column: they hold plaintext of their own."""
    out = []
    for ix in sa.inspect(engine).get_indexes(target.table.name):
        if target.source in (ix.get("column_names") or []) or (
            ix.get("expressions") and any(target.source in str(e) for e in ix["expressions"] or [])
        ):
            out.append(str(ix["name"]))
    return out


def build_plan(
    manager: KeyManager,
    engine: sa.Engine,
    target: Target,
    *,
    batch_size: int = 1000,
    rate: float | None = None,
) -> Plan:
    require_sealable_in_place(target)
    started = time.monotonic()
    per: dict[str, Counter[str]] = defaultdict(Counter)
    samples: dict[str, list[list[Any]]] = defaultdict(list)
    too_long = 0
    # Width of the column receiving ciphertext (characters in place, bytes in
    # a bounded binary column such as EncryptedString's VARBINARY on MariaDB).
    length = getattr(target.table.c[target.column].type, "length", None)
    in_place = target.mode == IN_PLACE
    text_into = is_text_column(target.table.c[target.column])
    for batch in sc.scan(engine, target, batch_size):
        for row in batch:
            kind = sc.classify(manager, target, row)
            per[row.tenant if row.tenant is not None else "(none)"][kind] += 1
            if kind in (sc.PREFIXED_INVALID, sc.NO_TENANT) and len(samples[kind]) < SAMPLE:
                samples[kind].append(list(row.pk))
            if (
                length is not None
                and kind == sc.PLAINTEXT
                and _stored_length(target, row, in_place) > length
            ):
                too_long += 1
                if len(samples["too_long"]) < SAMPLE:
                    samples["too_long"].append(list(row.pk))
    totals: Counter[str] = Counter()
    for c in per.values():
        totals.update(c)
    backend = backend_of(engine)
    if rate is not None:
        source = "given"
    else:
        rate, source = DEFAULT_RATES.get(backend, 3000.0), f"default for {backend}"
    p = Plan(
        target=target.describe(),
        per_tenant={t: {k: c.get(k, 0) for k in sc.KINDS} for t, c in sorted(per.items())},
        totals={k: totals.get(k, 0) for k in sc.KINDS},
        samples=dict(samples),
        too_long=too_long,
        column_length=length,
        indexes=column_indexes(engine, target),
        rate=rate,
        rate_source=source,
        scan_seconds=time.monotonic() - started,
    )
    if p.needs_decision:
        p.warnings.append(
            f"{p.totals[sc.PREFIXED_INVALID]} value(s) start with 'carnet:' but do not open for "
            "their row: inspect them (samples list primary keys), then rerun `run` with "
            "--prefixed=encrypt to seal them as the plaintext they are, or fix them first"
        )
    if p.totals.get(sc.NO_TENANT):
        p.warnings.append(
            f"{p.totals[sc.NO_TENANT]} row(s) have no tenant (NULL tenant or missing parent row): "
            "they cannot be sealed until their tenant is set"
        )
    if too_long:
        p.warnings.append(
            f"{too_long} value(s) would not fit column {target.column} ({length} "
            f"{'characters' if in_place or text_into else 'bytes'}) once encrypted: widen it first"
            + (", or use expand/contract" if in_place else "")
        )
    if p.indexes:
        p.warnings.append(
            f"index(es) {', '.join(p.indexes)} cover {target.source}: they hold plaintext and "
            "become useless on ciphertext; drop them (compaction rebuilds the others)"
        )
    return p


# -- the rate of `migrate run` on this database, measured -------------------------------

# Rows `plan` seals and writes, then rolls back, to time this database: enough
# for a steady figure on a busy machine, stopped early after TRIAL_SECONDS.
TRIAL_ROWS = 5000
TRIAL_SECONDS = 2.0


def measure_rate(
    engine: sa.Engine, target: Target, batch_size: int = 500
) -> tuple[float, int] | None:
    """Rows per second of `migrate run` here, and the rows timed (up to TRIAL_ROWS).

    The same work as `run` (scan with the practice's join, seal, one
    compare-and-set UPDATE per row, a transaction per batch), under a
    throwaway key and rolled back, so nothing is kept. A default figure
    can be off tenfold between backends and machines; this one is this
    database's, today. None when nothing can be timed (no plaintext row,
    or no UPDATE privilege).
    """
    import time

    from ..providers import EphemeralMasterKey
    from . import scan as scan_mod

    # Sealed by a real manager (the same code path as `run`) whose keys live in
    # an in-memory database under a throwaway master key: nothing reaches
    # carnet_keys, and the trial's ciphertexts never open anywhere.
    scratch = make_engine("sqlite://", batch=False)
    trial_manager = KeyManager(scratch, master_key=EphemeralMasterKey("ephemeral://plan"))
    trial_manager.create_schema()
    t = target.table
    in_place = target.mode != EXPAND
    timed = 0
    started = time.monotonic()
    try:
        # The batch engine's own statements (compare-and-set, or PostgreSQL's bulk form).
        writes = WritePlan(engine, t, target.column, None, target.join_or_none(), None)
        for batch in scan_mod.scan(engine, target, batch_size):
            todo = [
                r
                for r in batch
                if r.tenant is not None
                and isinstance(r.source, str)
                and not envelope.looks_like_text_ciphertext(r.source)
            ]
            todo = todo[: TRIAL_ROWS - timed]
            params = []
            for r in todo:
                tenant = str(r.tenant)
                scan_mod.classify_text(trial_manager, r.source, tenant, target.label)
                blob = trial_manager.encrypt(
                    r.source.encode("utf-8"), tenant=tenant, label=target.label
                )
                p = {f"carnet_pk{i}": v for i, v in enumerate(r.pk)}
                p["carnet_new"] = envelope.to_text(blob) if in_place else blob
                if in_place:
                    p["carnet_old"] = r.source
                params.append(p)
            if params:
                with engine.connect() as conn:
                    trans = conn.begin()
                    try:
                        if not in_place:
                            conn.execute(writes.cas_null, params)
                        elif writes.bulk:
                            writes.bulk_execute(conn, params)
                        else:
                            conn.execute(writes.cas, params)
                    finally:
                        trans.rollback()
                _sqlite_commit_cost(engine, sum(len(str(p["carnet_new"])) for p in params))
            timed += len(todo)
            if timed >= TRIAL_ROWS or time.monotonic() - started >= TRIAL_SECONDS:
                break
    except (sa.exc.SQLAlchemyError, CarnetError):
        # Nothing timed (no UPDATE privilege, a table the batch engine cannot
        # page): the estimate falls back to the default rate, and says so.
        return None
    finally:
        trial_manager.close()
        scratch.dispose()
    elapsed = time.monotonic() - started
    return (timed / elapsed, timed) if timed and elapsed > 0 else None


def _sqlite_commit_cost(engine: sa.Engine, nbytes: int) -> None:
    """Spend what committing a batch of ``nbytes`` would on this SQLite file.

    A rolled-back trial skips the commit, which on SQLite is most of a
    batch's cost: the journal and the database file synced to disk (twice in
    rollback-journal mode, once in WAL). Done on a scratch file beside the
    database, deleted at once.
    """
    import os
    import tempfile

    if engine.dialect.name != "sqlite":
        return
    path = engine.url.database
    if not path or path == ":memory:" or path.startswith("file:"):
        return
    with engine.connect() as conn:
        wal = str(conn.exec_driver_sql("PRAGMA journal_mode").scalar()).lower() == "wal"
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryFile(dir=directory) as fh:
        for _ in range(1 if wal else 2):
            fh.write(os.urandom(max(nbytes, 1)))
            fh.flush()
            os.fsync(fh.fileno())
