"""Issue 22's target: the cost of the shared decrypt budget on reads.

10,000 notes of 10 practices, read through the ORM in one select, on SQLite
and PostgreSQL. Sides, run interleaved in one process, each the decrypt
hook of the same KeyManager:

- ``off``: no decrypt hook (baseline);
- ``noop``: a decrypt hook that does nothing (the floor of any hook), for context;
- ``auditor``: :class:`carnet.audit.Auditor` without a budget (counts only), for context;
- ``local``: a per-process :class:`~carnet.audit.DecryptBudget` as the hook
  (``budget.install(keys)``);
- ``shared SQL``: ``DecryptBudget(store=<the same database>)`` as the hook,
  blocks of 1,000 and of 10,000 reads; and behind an Auditor (``Auditor(budget=...)``);
- ``shared Redis``: the same with ``store="redis://127.0.0.1:6379/0"``.

The budget's limit is high enough never to refuse (10,000,000 per hour): what
is measured is the price of reserving and counting. Each round starts with no
block in hand (a new principal), so every reservation a select needs is paid
inside the timed body.

Target: ``shared`` (block 10,000) ≤ 1.10× ``off``; the others are measured and reported.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from bench.common import (
    Row,
    interleaved_medians,
    master_key_uri,
    postgres_database,
    repeats,
    row,
    scale,
    temp_dir,
)
from carnet.audit import Auditor, DecryptBudget, principal_scope

N_NOTES = 10_000
N_PRACTICES = 10
LIMIT, WINDOW = 10_000_000, 3600.0
REDIS = "redis://127.0.0.1:6379/0"


class Base(DeclarativeBase):
    pass


class BenchNote(Base):
    __tablename__ = "bench_budget_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS, socket_timeout=1).ping())
    except Exception:  # noqa: BLE001 - no Redis: its rows are left out
        return False


def _bench(url: str, directory: Path, db: str) -> list[Row]:
    n = scale(N_NOTES)
    directory = directory / db
    directory.mkdir()
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri(directory))
    keys.create_schema()
    Base.metadata.create_all(engine)
    carnet.configure(keys)
    try:
        with Session(engine) as s:
            s.add_all(
                BenchNote(id=i + 1, practice_id=f"p{i % N_PRACTICES}", body=f"note {i} " * 8)
                for i in range(n)
            )
            s.commit()
        hooks: dict[str, Any] = {
            "off": None,
            "noop": lambda tenant, field, count: None,
            "auditor": Auditor(flush_every=3600),
            "local": DecryptBudget(LIMIT, WINDOW).hook(),
            "sql_1k": DecryptBudget(LIMIT, WINDOW, store=url, block=1000).hook(),
            "sql_10k": DecryptBudget(LIMIT, WINDOW, store=url, block=10_000).hook(),
            "auditor_sql_10k": Auditor(
                budget=DecryptBudget(LIMIT, WINDOW, store=url, block=10_000), flush_every=3600
            ),
        }
        if _redis_up():
            hooks["redis_1k"] = DecryptBudget(LIMIT, WINDOW, store=REDIS, block=1000).hook()
            hooks["redis_10k"] = DecryptBudget(LIMIT, WINDOW, store=REDIS, block=10_000).hook()
        run_id = uuid.uuid4().hex[:8]
        counter = itertools.count()
        principal = ["bench"]

        def one_select() -> None:
            with principal_scope(principal[0]), Session(engine) as s:
                assert len([x.body for x in s.scalars(sa.select(BenchNote))]) == n

        def case(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
            def setup() -> None:
                keys.decrypt_hook = hooks[name]
                # A principal with no block in hand: the select pays its reservations.
                principal[0] = f"bench-{run_id}-{next(counter)}"

            return setup, one_select

        med = interleaved_medians({name: case(name) for name in hooks}, repeats(7))
        labels = {
            "noop": "a decrypt hook that does nothing",
            "auditor": "Auditor counts only, no budget",
            "local": "per-process budget",
            "sql_1k": "shared budget, SQL store (block 1,000)",
            "sql_10k": "shared budget, SQL store (block 10,000)",
            "redis_1k": "shared budget, Redis (block 1,000)",
            "redis_10k": "shared budget, Redis (block 10,000)",
            "auditor_sql_10k": "Auditor + shared budget, SQL store (block 10,000)",
        }
        rows: list[Row] = []
        for name, label in labels.items():
            if name not in med:
                continue
            rows.append(
                row(
                    f"{db}: select {n:,} notes, {label}",
                    med["off"],
                    med[name],
                    "s",
                    "baseline: no decrypt hook",
                    target=1.10 if name in ("sql_10k", "redis_10k") else None,
                )
            )
        return rows
    finally:
        carnet.configure(None)
        keys.close()
        engine.dispose()


def run() -> list[Row]:
    out: list[Row] = []
    with temp_dir() as d:
        out += _bench(f"sqlite:///{d}/bench.db", d, "SQLite")
        with postgres_database() as url:
            if url is not None:
                out += _bench(url, d, "PostgreSQL")
    return out
