"""carnet's own tables, declared in one place: the data keys, batch jobs, migrations, audit trail.

The key table's name is configurable (``KeyManager(table_name=...)``); the
others have fixed names. :func:`carnet_metadata` gathers the current
declaration of all four, as the running code expects them. Schema tools
(``KeyManager.create_schema`` for the keys, the Alembic helpers in
:mod:`carnet.migrate.alembic`) compare a live database with it.

:func:`looks_like_carnet_table` recognises a live table by its columns rather
than its name, so that a key table under a custom name is still recognised
as one (a schema tool that mistook it for an unknown table would propose to
drop it: that drops every wrapped data key, a crypto-shred of every tenant).
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from .audit_store import AUDIT_TABLE, audit_table
from .jobs import JOBS_TABLE, jobs_table
from .keystore import keys_table
from .migrations import MIGRATIONS

KEYS_TABLE = "carnet_keys"
MIGRATIONS_TABLE = MIGRATIONS.name

# Columns each table has had since its first release. A live table holding all
# of a signature is carnet's, whatever its name. Only the columns that define
# the table belong here: one added by a later release (a live table from an
# older release lacks it) must not be required, or that older table would no
# longer be recognised, exactly when it needs protecting during an upgrade;
# nor one a later release may replace (the key table's ``active_tenant``).
KEYS_SIGNATURE = frozenset(
    {"key_id", "tenant", "version", "state", "master_key_uri", "wrapped_key"}
)
JOBS_SIGNATURE = frozenset(
    {"job", "worker", "workers", "table_name", "column_name", "lower_pk", "upper_pk", "last_pk"}
)
MIGRATIONS_SIGNATURE = frozenset(
    {"table_name", "column_name", "source_column", "mode", "label", "tenant", "state"}
)
AUDIT_SIGNATURE = frozenset({"seq", "mac", "key_id", "kind", "principal", "practice", "first_at"})
SIGNATURES = (KEYS_SIGNATURE, JOBS_SIGNATURE, MIGRATIONS_SIGNATURE, AUDIT_SIGNATURE)


def carnet_metadata(keys_table_name: str = KEYS_TABLE) -> sa.MetaData:
    """A new MetaData holding carnet's four tables as the current release declares them."""
    md = sa.MetaData()
    keys_table(md, keys_table_name)
    jobs_table(md, JOBS_TABLE)
    MIGRATIONS.to_metadata(md)
    audit_table(md, AUDIT_TABLE)
    return md


# The shared decrypt budget's and the decoys' tables (carnet.budget_store, carnet.decoys).
BUDGET_TABLE = "carnet_budget"
DECOYS_TABLE = "carnet_decoys"


def table_names(keys_table_name: str = KEYS_TABLE) -> frozenset[str]:
    """Names of carnet's tables with this key table name (and the default one): never
    scanned for an application's encrypted values."""
    return frozenset(
        {
            KEYS_TABLE,
            keys_table_name,
            JOBS_TABLE,
            MIGRATIONS_TABLE,
            AUDIT_TABLE,
            BUDGET_TABLE,
            DECOYS_TABLE,
        }
    )


def looks_like_carnet_table(column_names: Iterable[str]) -> bool:
    """True if a table with these columns is one of carnet's (see the signatures above)."""
    names = {c.lower() for c in column_names}
    return any(sig <= names for sig in SIGNATURES)
