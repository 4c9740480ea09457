"""A failed statement on the key table shows no wrapped key.

Wrapped data keys are key material: useless without the master key, but kept
out of every message all the same (as ``KeyRecord``'s repr does). A
statement on ``carnet_keys`` that fails (a unique violation in a race, a lock
time-out) must not print them as SQLAlchemy's parameters.
"""

from __future__ import annotations

import traceback

import pytest
import sqlalchemy as sa

import carnet
from carnet.keystore import utcnow

WRAPPED = bytes(range(7, 7 + 48))


def test_failed_key_insert_shows_no_wrapped_key(engine: sa.Engine, master_key_uri: str) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    row = {
        "key_id": "ab" * 16,
        "tenant": "p1",
        "version": 1,
        "state": "inactive",
        "active_tenant": None,
        "master_key_uri": keys.master_key.uri,
        "wrapped_key": WRAPPED,
        "created_at": utcnow(),
        "updated_at": utcnow(),
    }
    with engine.begin() as conn:
        conn.execute(keys.table.insert(), row)
    with pytest.raises(sa.exc.IntegrityError) as ei, engine.begin() as conn:
        conn.execute(keys.table.insert(), row)  # same key id
    text = "".join(traceback.format_exception(ei.value)) + repr(ei.value.params)
    for form in (repr(WRAPPED), WRAPPED.hex(), str(list(WRAPPED[:8]))[1:-1]):
        assert form not in text, form
    assert "INSERT INTO carnet_keys" in text
    keys.close()
