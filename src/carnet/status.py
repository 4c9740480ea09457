"""``carnet status``: the key table, the master keys in use, and each encrypted column's values."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import envelope
from . import jobs as _jobs
from ._engines import safe_url
from .batch import iter_rows
from .errors import (
    InvalidCiphertext,
    MasterKeyUnavailable,
)
from .keystore import ACTIVE, AUDIT, DATA, DESTROYED, RETIRED, KeyRecord
from .manager import KeyManager
from .providers import MasterKey
from .reflect import check_column
from .stored import _Keys, blob_of, discover_columns

Progress = Callable[[int], None]


# -- status -----------------------------------------------------------------------------


@dataclass
class ColumnStatus:
    table: str
    column: str
    # "data": carnet values found in it; "declared": an EncryptedText column
    # of the application (--app), found whether or not it has rows
    found_by: str = "data"
    rows: int = 0
    nulls: int = 0
    plaintext: int = 0
    unreadable_framing: int = 0
    unknown_key: int = 0
    # key id (hex) -> {"tenant", "version", "state", "rows"}, in practice and version order
    by_key: dict[str, dict[str, Any]] = field(default_factory=dict)
    # under a live older key: what `reencrypt` moves
    not_on_active: int = 0
    # under a destroyed or retired key: unreadable for good, nothing to move
    destroyed: int = 0
    # in format v1 under a live key, active or older: what `reencrypt` upgrades
    # to v2 (a v1 value under an older key counts in not_on_active too)
    v1: int = 0


@dataclass
class TenantStatus:
    tenant: str
    active_version: int | None
    master_key_uri: str | None
    keys: list[dict[str, Any]]


@dataclass
class StatusReport:
    database: str
    master_key_uri: str
    # True: one key per master key in use unwrapped; None: not checked
    master_key_ok: bool | None
    tenants: list[TenantStatus]
    columns: list[ColumnStatus]
    jobs: list[dict[str, Any]]
    finished_jobs_hidden: int = 0  # finished jobs older than the ones listed

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def check_master_key(manager: KeyManager) -> bool:
    """Unwrap one live DEK per master key URI in use: proves the configured keys open them."""
    seen: set[str] = set()
    for rec in manager.iter_keys():
        if rec.wrapped_key is None or rec.master_key_uri in seen:
            continue
        seen.add(rec.master_key_uri)
        manager.check_unwrap(rec)
    return True


def column_status(
    manager: KeyManager,
    table: str,
    column: str,
    keys: _Keys | None = None,
    batch_size: int = 2000,
    progress: Progress | None = None,
) -> ColumnStatus:
    check_column(manager.engine, table, column)
    keys = keys or _Keys(manager)
    st = ColumnStatus(table=table, column=column)
    counts: Counter[bytes] = Counter()
    v1_counts: Counter[bytes] = Counter()
    for row in iter_rows(manager.engine, table, column, batch_size=batch_size):
        st.rows += 1
        try:
            blob = blob_of(row.value)
        except InvalidCiphertext:
            st.unreadable_framing += 1
            continue
        if blob is None:
            st.nulls += 1
        elif isinstance(blob, str):
            st.plaintext += 1
        elif not envelope.is_known(blob):
            st.unreadable_framing += 1
        else:
            counts[envelope.key_id_of(blob)] += 1
            if not envelope.is_current(blob):
                v1_counts[envelope.key_id_of(blob)] += 1
        if progress is not None and st.rows % batch_size == 0:
            progress(batch_size)
    known: list[tuple[KeyRecord, int]] = []
    for kid, n in counts.items():
        rec = keys.get(kid)
        if rec is None:
            st.unknown_key += n
        else:
            known.append((rec, n))
    # By practice, then version: the order an operator reads a rotation in.
    for rec, n in sorted(known, key=lambda rn: (rn[0].tenant, rn[0].version)):
        st.by_key[rec.key_id.hex()] = {
            "tenant": rec.tenant,
            "version": rec.version,
            "state": rec.state,
            "rows": n,
        }
        if rec.state in (DESTROYED, RETIRED):
            st.destroyed += n
        else:
            st.v1 += v1_counts[rec.key_id]
            if rec.state != ACTIVE:
                st.not_on_active += n
    return st


class UncheckedMasterKey(MasterKey):
    """Stands in for the master key when it is not to be opened
    (``status --no-master-check``): every unwrap is refused."""

    scheme = "unchecked"

    def __init__(self, uri: str | None) -> None:
        self._uri = uri or "(none configured)"

    @property
    def uri(self) -> str:
        return self._uri

    def wrap(self, dek: bytes, context: Any) -> bytes:
        raise MasterKeyUnavailable("the master key was not opened (--no-master-check)")

    def unwrap(self, wrapped: bytes, context: Any) -> bytes:
        raise MasterKeyUnavailable("the master key was not opened (--no-master-check)")

    @classmethod
    def from_uri(cls, uri: str) -> MasterKey:
        return cls(uri)


def status(
    manager: KeyManager,
    columns: Sequence[tuple[str, str]] | None = None,
    check_master: bool = True,
    declared: Sequence[tuple[str, str]] = (),
    finished_jobs: int = _jobs.FINISHED_SHOWN,
) -> StatusReport:
    """Keys per practice, and per encrypted column the rows by key version.

    ``declared``: encrypted columns the application declares; reported even
    when they have no rows yet (discovery by content cannot see those).
    ``finished_jobs``: how many finished jobs to list, most recent first
    (every unfinished one is listed); ``finished_jobs_hidden`` counts the rest.
    """
    manager.create_schema()
    tenants: dict[str, list[KeyRecord]] = {}
    for rec in manager.iter_keys():
        if rec.kind == AUDIT:
            continue  # the audit trail's key belongs to no practice (docs/audit.md)
        tenants.setdefault(rec.tenant, []).append(rec)
    ts = []
    for tenant in sorted(tenants):
        recs = sorted(tenants[tenant], key=lambda r: r.version)
        active = [r for r in recs if r.state == ACTIVE and r.kind == DATA]
        ts.append(
            TenantStatus(
                tenant=tenant,
                active_version=active[0].version if active else None,
                master_key_uri=active[0].master_key_uri if active else None,
                keys=[
                    {
                        "key_id": r.key_id.hex(),
                        "version": r.version,
                        "state": r.state,
                        "kind": r.kind,
                        "master_key_uri": r.master_key_uri,
                    }
                    for r in recs
                ],
            )
        )
    ok = check_master_key(manager) if check_master else None
    cols = list(columns) if columns is not None else discover_columns(manager)
    found_by = dict.fromkeys(cols, "data")
    for tc in declared:
        if tc not in found_by:
            cols.append(tc)
            found_by[tc] = "declared"
    keys = _Keys(manager)
    col_st = []
    for t, c in cols:
        cs = column_status(manager, t, c, keys)
        cs.found_by = found_by[(t, c)]
        col_st.append(cs)
    jobs_rows: list[dict[str, Any]] = []
    shown, hidden = _jobs.recent_jobs(manager.engine, finished_jobs)
    for r in shown:
        jobs_rows.append(
            {
                "job": r.job,
                "worker": f"{r.worker}/{r.workers}",
                "table": r.table_name,
                "column": r.column_name,
                "done": bool(r.done),
                "scanned": int(r.scanned),
                "rewritten": int(r.rewritten),
                "failed": int(r.failed),
            }
        )
    return StatusReport(
        database=safe_url(manager.engine),
        master_key_uri=manager.master_key.uri,
        master_key_ok=ok,
        tenants=ts,
        columns=col_st,
        jobs=jobs_rows,
        finished_jobs_hidden=hidden,
    )
