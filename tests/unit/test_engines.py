"""carnet._engines.make_engine, the one engine factory: the stores' engines.

The audit store and the shared budget's SQL store write beside the application
on connections of their own; their engines come from the same factory as the
command line's, and say which store a bad URL was for.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from carnet._engines import make_engine
from carnet.audit_store import AuditStore
from carnet.budget_store import SQLBudgetStore
from carnet.errors import ConfigurationError

PASSWORD = "PLANTED-pw-5f1c"  # noqa: S105 - a planted value, looked for in errors


@pytest.mark.parametrize("store", ["audit store", "budget store"])
@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_a_store_refuses_an_in_memory_sqlite_database(store: str, url: str) -> None:
    with pytest.raises(ConfigurationError, match=f"the {store} needs a connection of its own"):
        make_engine(url, batch=False, store=store)


def test_a_bad_store_url_names_the_store_and_never_its_password() -> None:
    with pytest.raises(ConfigurationError, match="bad audit store URL") as bad:
        make_engine("not a url", batch=False, store="audit store")
    assert "expected e.g." in str(bad.value)
    url = f"postgresql+nosuchdriver://u:{PASSWORD}@127.0.0.1/test"
    with pytest.raises(ConfigurationError, match="bad budget store URL") as unknown:
        make_engine(url, batch=False, store="budget store")
    assert PASSWORD not in str(unknown.value)
    assert unknown.value.__cause__ is None and unknown.value.__suppress_context__


def test_the_stores_take_their_engines_from_the_factory(
    tmp_path: Path, master_key_uri: str
) -> None:
    keys = carnet.KeyManager(
        sa.create_engine(f"sqlite:///{tmp_path}/k.db"), master_key=master_key_uri
    )
    try:
        with pytest.raises(ConfigurationError, match="the audit store needs a connection"):
            AuditStore(keys, "sqlite://")
        with pytest.raises(ConfigurationError, match="the budget store needs a connection"):
            SQLBudgetStore("sqlite://", create=False)
        audit = AuditStore(keys, f"sqlite:///{tmp_path}/audit.db")
        budget = SQLBudgetStore(f"sqlite:///{tmp_path}/budget.db", create=False)
        for engine in (audit.engine, budget.engine):
            # The factory's options for a store: parameters never printed,
            # connections checked before use.
            assert engine.hide_parameters
            assert engine.pool._pre_ping
    finally:
        keys.close()


def test_a_store_waits_for_a_sqlite_lock_for_its_own_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("create table t (x integer)")
    holder.execute("begin exclusive")
    try:
        engine = make_engine(f"sqlite:///{path}", batch=False, timeout=0.3, store="audit store")
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            with engine.begin() as conn:
                conn.execute(sa.text("insert into t values (1)"))
        waited = time.monotonic() - started
        # The store's 0.3 s, not the batch engine's 30 s, and not at once.
        assert 0.25 <= waited < 10
        engine.dispose()
    finally:
        holder.execute("rollback")
        holder.close()
