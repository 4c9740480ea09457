"""Read-only walks over a migrated column, and what each stored value is.

``plan`` and ``verify`` read; only the batch engine writes. The walk is the
same keyset pagination as the engine's (flat memory, one short read
transaction per batch, so it never holds back PostgreSQL's vacuum horizon or
InnoDB's purge for the whole table).

Classification never trusts the prefix alone: a value counts as sealed only
when it opens, with the row's tenant and the column's label, under AES-GCM.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .. import envelope
from ..batch import after_key
from ..errors import CarnetError, DatabaseError, KeyDestroyed, db_error_code, describe_db_error
from ..manager import KeyManager
from .target import IN_PLACE, Target

NULL = "null"
PLAINTEXT = "plaintext"
SEALED = "sealed"
SHREDDED = "shredded"
# Starts with carnet's prefix (or sits in the new binary column) but does not
# open for this row: a legacy note that merely begins with "carnet:", or a value
# copied from another row, tenant or column. Never guessed either way.
PREFIXED_INVALID = "prefixed_invalid"
NO_TENANT = "no_tenant"
# Expand/contract only: the legacy column already holds the text form of a value
# that opens for this row (an earlier in-place run); it is copied, not re-sealed.
LEGACY_SEALED = "legacy_sealed"
KINDS = (PLAINTEXT, SEALED, NULL, PREFIXED_INVALID, NO_TENANT, SHREDDED, LEGACY_SEALED)
TO_DO = (PLAINTEXT, LEGACY_SEALED)


@dataclass
class ScannedRow:
    pk: tuple[Any, ...]
    tenant: str | None
    value: Any
    source: Any


def tenant_str(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return v if isinstance(v, str) else str(v)


def scan(engine: sa.Engine, target: Target, batch_size: int = 1000) -> Iterator[list[ScannedRow]]:
    t = target.table
    pk_cols = [t.c[c] for c in target.pk]
    cols: list[sa.ColumnElement[Any]] = [
        *pk_cols,
        target.tenant_column().label("carnet_tenant"),
        t.c[target.column],
    ]
    if target.mode != IN_PLACE:
        cols.append(t.c[target.source])
    base = target.join(sa.select(*cols).select_from(t))
    last: tuple[Any, ...] | None = None
    while True:
        q = base
        if last is not None:
            q = q.where(after_key(pk_cols, last))
        q = q.order_by(*pk_cols).limit(batch_size)
        failure: DatabaseError | None = None
        try:
            with engine.connect() as conn:
                rows = conn.execute(q).all()
        except sa.exc.DBAPIError as exc:
            after = f"after primary key {list(last)}" if last is not None else "from the start"
            failure = DatabaseError(
                f"{target.name}: database error while reading the rows {after}: "
                f"{describe_db_error(exc)}",
                table=t.name,
                column=target.source,
                pks=(last,) if last is not None else (),
                code=db_error_code(exc),
            )
        if failure is not None:
            # Outside the except block: the driver's message may quote a
            # stored value (SQLite's undecodable text), and must not ride
            # along as __context__.
            raise failure
        if not rows:
            return
        n = len(pk_cols)
        batch = [
            ScannedRow(
                tuple(r[:n]),
                tenant_str(r[n]),
                r[n + 1],
                r[n + 2] if target.mode != IN_PLACE else r[n + 1],
            )
            for r in rows
        ]
        last = batch[-1].pk
        yield batch


def is_text_column(col: sa.ColumnElement[Any]) -> bool:
    """True when a column stores text (carnet's prefixed form), not bytes."""
    try:
        return col.type.python_type is str
    except NotImplementedError:
        return False


def opens(keys: KeyManager, blob: bytes, tenant: str, label: str) -> str:
    """SEALED, SHREDDED or PREFIXED_INVALID for a candidate ciphertext."""
    try:
        keys.decrypt(blob, tenant=tenant, label=label)
    except KeyDestroyed:
        return SHREDDED
    except CarnetError:
        return PREFIXED_INVALID
    return SEALED


def classify_text(keys: KeyManager, value: str, tenant: str, label: str) -> str:
    if not envelope.looks_like_text_ciphertext(value):
        return PLAINTEXT
    try:
        blob = envelope.from_text(value)
    except CarnetError:
        return PREFIXED_INVALID
    return opens(keys, blob, tenant, label)


def classify(keys: KeyManager, target: Target, row: ScannedRow) -> str:
    if target.mode == IN_PLACE:
        if row.value is None:
            return NULL
        if row.tenant is None:
            return NO_TENANT
        if isinstance(row.value, (bytes, bytearray, memoryview)):
            # A binary column (after an expand/contract): raw v1 bytes, no text prefix.
            return opens(keys, bytes(row.value), row.tenant, target.label)
        return classify_text(keys, row.value, row.tenant, target.label)
    if row.value is not None:
        if row.tenant is None:
            return NO_TENANT
        if isinstance(row.value, str):  # a text-storage column: the prefixed form
            return (
                classify_text(keys, row.value, row.tenant, target.label)
                if envelope.looks_like_text_ciphertext(row.value)
                else PREFIXED_INVALID
            )
        return opens(keys, bytes(row.value), row.tenant, target.label)
    if row.source is None:
        return NULL
    if row.tenant is None:
        return NO_TENANT
    if not isinstance(row.source, str):
        return PLAINTEXT  # a DATE column: never ciphertext
    kind = classify_text(keys, row.source, row.tenant, target.label)
    return LEGACY_SEALED if kind == SEALED else kind
