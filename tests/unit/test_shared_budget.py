"""The shared decrypt budget (DecryptBudget(store=...)) on each SQL backend and on Redis.

The multi-process scenarios are in tests/scenarios/test_budget_processes.py and the
property test of the written guarantee in test_shared_budget_property.py.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from carnet.audit import Auditor, DecryptBudget, principal_scope
from carnet.budget_store import SQLBudgetStore
from carnet.errors import BudgetStoreUnavailable, CarnetError, DecryptBudgetExceeded
from support.models import Note, configured_keys

REDIS = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _reads(budget: DecryptBudget, principal: str, n: int) -> int:
    got = 0
    for _ in range(n):
        try:
            budget.charge(principal)
        except DecryptBudgetExceeded:
            break
        got += 1
    return got


@pytest.mark.parametrize(
    ("db_kind", "store_kind"),
    [
        pytest.param("sqlite", "sql", id="sql-sqlite"),
        pytest.param("postgresql", "sql", id="sql-postgresql", marks=pytest.mark.db),
        pytest.param("mariadb", "sql", id="sql-mariadb", marks=pytest.mark.db),
        pytest.param("sqlite", "redis", id="redis"),
    ],
)
def test_two_processes_share_the_limit(db_url: str, store_kind: str) -> None:
    store = db_url if store_kind == "sql" else REDIS
    a = DecryptBudget(50, 60, store=store, block=7)
    b = DecryptBudget(50, 60, store=store, block=7)
    p = f"p-{uuid.uuid4().hex}"
    got = 0
    # Interleaved: each asks for blocks of 7; the last grants are partial, so the
    # two together get the limit exactly once each has used its blocks.
    for _ in range(40):
        got += _reads(a, p, 1) + _reads(b, p, 1)
    assert got == 50
    with pytest.raises(DecryptBudgetExceeded):
        a.charge(p)
    # Another principal has its own budget.
    assert _reads(a, f"q-{uuid.uuid4().hex}", 5) == 5


def test_the_budget_frees_as_reservations_age_out(tmp_path: Path) -> None:
    clock = Clock()
    store = SQLBudgetStore(f"sqlite:///{tmp_path / 'b.db'}", clock=clock)
    budget = DecryptBudget(10, 10, store=store, block=5, lease=1, clock=clock)
    assert _reads(budget, "p", 20) == 10
    clock.now += 10.5  # window, not window + lease: still counted
    with pytest.raises(DecryptBudgetExceeded):
        budget.charge("p")
    clock.now += 0.6  # past window + lease
    assert _reads(budget, "p", 20) == 10


def test_an_idle_process_holds_at_most_one_block(tmp_path: Path) -> None:
    clock = Clock()
    store = SQLBudgetStore(f"sqlite:///{tmp_path / 'b.db'}", clock=clock)
    slow = DecryptBudget(12, 60, store=store, block=4, lease=1, clock=clock)
    fast = DecryptBudget(12, 60, store=store, block=4, lease=1, clock=clock)
    # A slow reader: one read per lease. Each new block gives back what the
    # last one left, so its reservations never strand more than one block.
    for _ in range(5):
        assert _reads(slow, "p", 1) == 1
        clock.now += 1.5
    assert _reads(fast, "p", 20) == 12 - 5 - 3


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://carnet:pw-PLANTED-s3cret@127.0.0.1:1/none",
        "redis://:pw-PLANTED-s3cret@127.0.0.1:1/0",
    ],
    ids=["sql", "redis"],
)
def test_required_fails_closed_when_the_store_is_down(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    budget = DecryptBudget(10, 60, store=url, timeout=1)
    with pytest.raises(BudgetStoreUnavailable) as info:
        budget.charge("p")
    assert isinstance(info.value, CarnetError)
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in caplog.text
    # And again at once, without waiting for the store a second time.
    with pytest.raises(BudgetStoreUnavailable):
        budget.charge("p")
    # Exempt principals never ask the store.
    DecryptBudget(10, 60, store=url, exempt=("batch",), timeout=1).charge("batch", 1000)


def test_best_effort_falls_back_and_records_it_when_the_store_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    where = tmp_path / "later"  # no such directory yet: SQLite cannot open the file
    store = SQLBudgetStore(f"sqlite:///{where / 'b.db'}", clock=clock)
    budget = DecryptBudget(10, 60, store=store, block=5, lease=1, clock=clock, mode="best_effort")
    caplog.set_level(logging.WARNING, "carnet.audit")
    # The per-process budget: the limit still holds in this process.
    assert _reads(budget, "p", 20) == 10
    assert "falling back to the per-process budget" in caplog.text
    assert budget.shared is not None and budget.shared.fallback_reads == 10
    # The store comes back: the reads let through are recorded there first.
    where.mkdir()
    clock.now += 61  # the per-process window is over; the store's is not
    other = DecryptBudget(10, 60, store=store, block=5, lease=1, clock=clock)
    assert _reads(budget, "q", 1) == 1
    assert "answers again" in caplog.text
    with store.engine.connect() as conn:
        log = json.loads(
            conn.execute(
                sa.text("SELECT log FROM carnet_budget WHERE principal = 'p'")
            ).scalar_one()
        )
    assert sum(n for _t, n, _tag in log) == 10
    with pytest.raises(DecryptBudgetExceeded):
        other.charge("p")


@pytest.mark.parametrize("how", ["auditor", "install"])
@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_a_refused_read_discloses_nothing(
    engine: sa.Engine, db_url: str, master_key_uri: str, how: str
) -> None:
    with configured_keys(engine, master_key_uri) as keys:
        with Session(engine) as s:
            s.add_all(Note(id=i, practice_id="p1", body=f"PLANTED-refused-{i}") for i in (1, 2, 3))
            s.commit()
        budget = DecryptBudget(2, 60, store=db_url, block=1)
        if how == "auditor":
            Auditor(budget=budget).install(keys)
        else:
            budget.install(keys)  # the budget alone, its lean hook
        p = f"p-{uuid.uuid4().hex}"
        with principal_scope(p), Session(engine) as s:
            assert [n.body for n in s.scalars(sa.select(Note).where(Note.id < 3))]
            with pytest.raises(DecryptBudgetExceeded) as info:
                s.scalars(sa.select(Note).where(Note.id == 3)).all()
        text = "".join(traceback.format_exception(info.value))
        assert "PLANTED" not in text
