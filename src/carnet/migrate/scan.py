"""The migration's names for what a stored value is, and its read-only walk.

``plan``, ``verify`` and ``finish`` read; only the batch engine writes. Both
the walk and the judgement of a value are :mod:`carnet.verify`'s, the ones
behind ``carnet verify`` too; this module names the outcomes as the
migration reports them (``sealed``, ``shredded``, ``prefixed_invalid``...).

Classification never trusts the prefix alone: a value counts as sealed only
when it opens, with the row's tenant and the column's label, under AES-GCM.
"""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa

from .. import verify as vf
from ..manager import KeyManager
from .target import IN_PLACE, Target

NULL = "null"
PLAINTEXT = "plaintext"
SEALED = "sealed"
# Under a destroyed key: the practice was crypto-shredded (not a retired key:
# that value does not open, and is PREFIXED_INVALID).
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
# What a finished column may hold.
CLEAN = (SEALED, NULL, SHREDDED)

_KIND_OF = {
    vf.OK: SEALED,
    vf.NULL: NULL,
    vf.PLAINTEXT: PLAINTEXT,
    vf.DESTROYED: SHREDDED,
    vf.LEGACY_SEALED: LEGACY_SEALED,
}

# One row read; ``source`` is ``value`` in place.
ScannedRow = vf.Row
tenant_str = vf.practice_str


def kind_of(outcome: vf.Outcome) -> str:
    """The migration's name for one of :mod:`carnet.verify`'s outcomes."""
    if outcome.kind == vf.FAILED:
        return NO_TENANT if outcome.reason == vf.NO_PRACTICE else PREFIXED_INVALID
    return _KIND_OF[outcome.kind]


def scan(engine: sa.Engine, target: Target, batch_size: int = 1000) -> Iterator[list[ScannedRow]]:
    """Every row of ``target``, a batch at a time: primary key, tenant, value, legacy value."""
    return vf.rows(
        engine,
        target.table,
        target.column,
        tenant=target.tenant_column(),
        join=target.join_or_none(),
        pk=target.pk,
        source=None if target.mode == IN_PLACE else target.source,
        batch_size=batch_size,
    )


def classify_text(manager: KeyManager, value: str, tenant: str, label: str) -> str:
    """PLAINTEXT, SEALED, SHREDDED or PREFIXED_INVALID for a text value of a row of ``tenant``."""
    return kind_of(vf.classify(manager, value, label=label, tenant=tenant))


def classify(manager: KeyManager, target: Target, row: ScannedRow) -> str:
    """What one scanned row holds, in the migration's words."""
    return kind_of(
        vf.classify_row(manager, row, label=target.label, expand=target.mode != IN_PLACE)
    )
