"""A practice's first keys, created where the statement that needs them can see them.

The one protocol for the write guard (a data key) and the blind-index
columns (an index root, and with it the data key):

- On SQLite, when the key table lives in the statement's own database, the
  key is created inside the statement's connection's transaction: a second
  connection would wait on the write lock this one may hold. It then lives
  and dies with that transaction: a rollback, of the transaction or of any
  savepoint, makes carnet forget it (forgetting a key that did commit costs
  one reload, never a wrong answer).
- Elsewhere the key commits in a short transaction of its own: nothing to
  forget.

The rollback, savepoint and commit handlers are attached by
:mod:`carnet._hooks`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from .manager import IndexRoot, KeyManager

# conn.info key: what this connection's open transaction created, as
# (manager, practice, data key id or None, whether index roots were created).
_NEW = "carnet_new_keys"


def data_key(conn: sa.Connection, manager: KeyManager, tenant: str) -> None:
    """Create ``tenant``'s first data key if needed, where the statement on ``conn`` sees it."""
    if manager._shares_sqlite_database(conn):
        created = manager._ensure_key_in(conn, tenant)
        if created is not None:
            _remember(conn, manager, tenant, created, roots=False)
    else:
        manager.ensure_key(tenant)


def index_roots(conn: sa.Connection, manager: KeyManager, tenant: str) -> list[IndexRoot]:
    """``tenant``'s index roots, the first created if needed, where ``conn`` sees them."""
    if not manager._shares_sqlite_database(conn):
        return manager.index_roots(tenant)
    roots, created = manager._index_roots_in(conn, tenant)
    if created is not None:
        # This transaction now holds SQLite's write lock: the practice's data
        # key, if new too, must be created inside it as well, not on a second
        # connection that would wait on this one.
        key_id = manager._ensure_key_in(conn, tenant)
        _remember(conn, manager, tenant, key_id, roots=True)
    return roots


def _remember(
    conn: sa.Connection, manager: KeyManager, tenant: str, key_id: bytes | None, *, roots: bool
) -> None:
    conn.info.setdefault(_NEW, []).append((manager, tenant, key_id, roots))


def forget(conn: sa.Connection, *_args: Any) -> None:
    """A savepoint rolled back may have held the keys: forget them, but keep the list,
    since the enclosing transaction may still roll back too."""
    for manager, tenant, key_id, roots in conn.info.get(_NEW) or ():
        if roots:
            manager._forget_index_roots(tenant)
        if key_id is not None:
            manager._forget_key(tenant, key_id)


def on_rollback(conn: sa.Connection) -> None:
    forget(conn)
    conn.info.pop(_NEW, None)


def on_commit(conn: sa.Connection) -> None:
    conn.info.pop(_NEW, None)
