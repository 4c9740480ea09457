"""Reading stored values without opening them: what a raw value is; which columns hold them.

Shared by the commands that scan tables (status, key usage, re-encryption,
verification): a raw value's binary form, the key records of a run, and
discovery of encrypted columns by their content.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from . import envelope
from .errors import (
    ConfigurationError,
    InvalidCiphertext,
)
from .keystore import KeyRecord
from .manager import KeyManager
from .reflect import check_column, raw_type

# Values of a column that is not (yet) encrypted: legacy text without carnet's prefix.
PLAINTEXT = "plaintext"


# -- reading stored values --------------------------------------------------------------


def blob_of(value: Any) -> bytes | str | None:
    """The binary value (v1 or v2) of a raw stored value; ``PLAINTEXT`` for legacy
    text; None for NULL."""
    if value is None:
        return None
    if isinstance(value, str):
        if not envelope.looks_like_text_ciphertext(value):
            return PLAINTEXT
        return envelope.from_text(value)
    return bytes(value)


class _Keys:
    """Key records by id and active key per tenant, loaded once per run (one row per key)."""

    def __init__(self, manager: KeyManager) -> None:
        self.manager = manager
        self._by_id: dict[bytes, KeyRecord | None] = {}
        self._active: dict[str, bytes] = {}

    def get(self, key_id: bytes) -> KeyRecord | None:
        if key_id not in self._by_id:
            self._by_id[key_id] = self.manager.get_key(key_id)
        return self._by_id[key_id]

    def active(self, tenant: str) -> bytes:
        kid = self._active.get(tenant)
        if kid is None:
            kid = self.manager.ensure_key(tenant).key_id
            self._active[tenant] = kid
        return kid


def _label(table: str, column: str, label: str | None) -> str:
    return label if label is not None else f"{table.rpartition('.')[2]}.{column}"


def _carnet_value(manager: KeyManager, value: Any) -> bool:
    try:
        blob = blob_of(value)
    except InvalidCiphertext:
        return True  # carnet's prefix with a broken body: still a carnet column
    if blob is None or blob == PLAINTEXT or isinstance(blob, str):
        return False
    if not envelope.is_known(blob):
        return False
    return manager.get_key(envelope.key_id_of(blob)) is not None


def is_encrypted_column(manager: KeyManager, tbl: sa.Table, column: str, sample: int = 50) -> bool:
    """True if some of the first non-NULL values carry carnet blobs (or the column is empty)."""
    col = sa.type_coerce(tbl.c[column], raw_type(tbl.c[column], manager.engine.dialect))
    with manager.engine.connect() as conn:
        values = (
            conn.execute(sa.select(col).where(tbl.c[column].is_not(None)).limit(sample))
            .scalars()
            .all()
        )
    if not values:
        return True
    return any(_carnet_value(manager, v) for v in values)


def require_encrypted(manager: KeyManager, table: str, column: str) -> sa.Table:
    tbl = check_column(manager.engine, table, column)
    if not is_encrypted_column(manager, tbl, column):
        raise ConfigurationError(
            f"{table}.{column} holds no carnet values: not an encrypted column"
        )
    return tbl


def discover_columns(manager: KeyManager) -> list[tuple[str, str]]:
    """Columns of every table whose stored values carry carnet ciphertext."""
    insp = sa.inspect(manager.engine)
    found: list[tuple[str, str]] = []
    from .schema import table_names

    skip = table_names(manager.table.name)  # carnet's own tables hold no notes
    for name in sorted(insp.get_table_names()):
        if name in skip:
            continue
        tbl = sa.Table(name, sa.MetaData(), autoload_with=manager.engine)
        if not tbl.primary_key.columns:
            continue
        for col in tbl.columns:
            try:
                py = col.type.python_type
            except NotImplementedError:
                continue
            if py not in (bytes, str) or col.primary_key:
                continue
            c = sa.type_coerce(col, col.type)
            with manager.engine.connect() as conn:
                values = (
                    conn.execute(sa.select(c).where(col.is_not(None)).limit(50)).scalars().all()
                )
            if any(_carnet_value(manager, v) for v in values):
                found.append((name, col.name))
    return found
