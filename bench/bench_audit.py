"""Issue 21's target: the cost of the durable audit trail on reads.

10,000 notes of 10 practices, read through the ORM (one select of all of
them, and 100 selects of 100 notes each, a new Session per select), on
SQLite and PostgreSQL, the trail in the same database. Sides, run
interleaved in one process:

- ``off``: no audit hook (baseline);
- ``auditor``: the in-process :class:`carnet.audit.Auditor` alone (counts in
  memory, no store), for context;
- ``best_effort``: :class:`carnet.audit.AuditTrail` default mode, installed
  as the decrypt hook (``trail.install(keys)``), written by its background
  thread every second (process CPU time counts that thread's work);
- ``rows``: the same with ``rows=True`` (every row's primary key recorded),
  measured after the others against its own ``off`` run: once a rows trail is
  installed, every ORM load of the process goes through its listener;
- ``required``: reservations of 1,000 reads (and of 10,000) committed before
  values open: one store transaction per block and key.

Target: ``best_effort`` ≤ 1.10× ``off``; the others are measured and reported.
"""

from __future__ import annotations

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
from carnet.audit import Auditor, AuditTrail, principal_scope

N_NOTES = 10_000
N_PRACTICES = 10


class Base(DeclarativeBase):
    pass


class BenchNote(Base):
    __tablename__ = "bench_audit_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


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
        trails = {
            "best_effort": AuditTrail(keys),
            "required": AuditTrail(keys, mode="required", block=1000),
            "required_10k": AuditTrail(keys, mode="required", block=10_000),
        }
        # The hook each trail's install() sets up (for best_effort, its closure),
        # as an application gets it.
        hooks: dict[str, Any] = {}
        for k, t in trails.items():
            t.install(keys)
            hooks[k] = keys.decrypt_hook
        hooks["off"] = None
        # The in-process counter that existed before the trail, for context.
        hooks["auditor"] = Auditor(flush_every=3600)

        def one_select() -> None:
            with principal_scope("bench"), Session(engine) as s:
                assert len([x.body for x in s.scalars(sa.select(BenchNote))]) == n

        def hundred_selects() -> None:
            step = max(1, n // 100)
            with principal_scope("bench"):
                for i in range(100):
                    lo = (i * step) % n
                    with Session(engine) as s:
                        q = sa.select(BenchNote).where(BenchNote.id > lo, BenchNote.id <= lo + 100)
                        [x.body for x in s.scalars(q)]

        def case(
            name: str, body: Callable[[], None]
        ) -> tuple[Callable[[], None], Callable[[], None]]:
            def setup() -> None:
                keys.decrypt_hook = hooks[name]

            # No flush in the body: the trails' background threads write every
            # second, and process CPU time counts their work when it happens.
            return setup, body

        workloads = (("select 10,000", one_select), ("100 selects of 100", hundred_selects))
        med: dict[tuple[str, str], float] = {}
        # rows=True listens to every ORM load for the rest of the process: the
        # other sides are measured first, then off against rows.
        first = ("off", "auditor", "best_effort", "required", "required_10k")
        for names in (first, ("off", "rows")):
            if "rows" in names:
                trails["rows"] = AuditTrail(keys, rows=True)
                trails["rows"].install(keys)
                hooks["rows"] = keys.decrypt_hook
            for label, body in workloads:
                cases = {name: case(name, body) for name in names}
                got = interleaved_medians(cases, repeats(7))  # type: ignore[arg-type]
                for name, v in got.items():
                    key = (label, name if name != "off" or "rows" not in names else "off-rows")
                    med[key] = v
        rows: list[Row] = []
        for label, _body in workloads:
            for name in ("auditor", "best_effort", "required", "required_10k", "rows"):
                base = med[(label, "off-rows" if name == "rows" else "off")]
                rows.append(
                    row(
                        f"{db}: {label} notes, "
                        + {
                            "auditor": "Auditor counts only",
                            "required": "trail required (block 1,000)",
                            "required_10k": "trail required (block 10,000)",
                        }.get(name, f"trail {name}"),
                        base,
                        med[(label, name)],
                        "s",
                        f"baseline: no audit hook; {n:,} notes",
                        target=1.10 if name == "best_effort" else None,
                    )
                )
        for t in trails.values():
            t.close()
            assert t.store.verify().ok
            t.store.engine.dispose()
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
