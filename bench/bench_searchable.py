"""Issue 13's target: finding a patient by phone through a blind index.

100,000 synthetic patients of 50 practices (2,000 each) on SQLite, in three
tables loaded with the same people:

- ``clear_phone``: names and birth date encrypted (``EncryptedString`` /
  ``EncryptedDate``), the phone in a clear, indexed column (E.164), looked up
  with ``practice_id = :p AND phone = :phone`` through the ORM: the baseline
  of the target, which isolates the cost of searching through a blind index;
- ``sealed``: the same, the phone encrypted too and searchable through
  ``BlindIndex(phone_fr)``, looked up with ``carnet.search`` (normalise,
  HMAC, indexed equality on practice and index value, decrypt the
  candidates, drop false positives);
- ``all_clear``: every field in clear, for context: what encrypting the
  identity fields costs a lookup in all.

Every side runs the same 1,000 lookups (a new Session per repeat) with a
statement built once with bound parameters, and returns the same patients.
Target: ``sealed`` ≤ 1.5× ``clear_phone``, with the index sized by
``plan_bits`` for 2 false positives per lookup (the default advice) and for
1/4 (more bits: fewer rows to open, more leakage).
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from bench.common import Row, interleaved_medians, master_key_uri, repeats, row, scale, temp_dir
from carnet import transforms

N_PATIENTS = 100_000
N_PRACTICES = 50
N_LOOKUPS = 1_000


def _models(bits: int) -> tuple[type[Any], type[Any], type[Any], sa.MetaData]:
    class Base(DeclarativeBase):
        pass

    class AllClear(Base):
        __tablename__ = "patients_all_clear"
        id: Mapped[int] = mapped_column(primary_key=True)
        practice_id: Mapped[str] = mapped_column(sa.String(64))
        first_name: Mapped[str] = mapped_column(sa.String(100))
        last_name: Mapped[str] = mapped_column(sa.String(100))
        birth_date: Mapped[dt.date]
        phone: Mapped[str] = mapped_column(sa.String(32))
        __table_args__ = (sa.Index("ix_all_clear_practice_phone", "practice_id", "phone"),)

    class ClearPhone(Base):
        __tablename__ = "patients_clear_phone"
        id: Mapped[int] = mapped_column(primary_key=True)
        practice_id: Mapped[str] = mapped_column(sa.String(64))
        first_name: Mapped[str] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
        last_name: Mapped[str] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
        birth_date: Mapped[dt.date] = mapped_column(carnet.EncryptedDate(tenant="practice_id"))
        phone: Mapped[str] = mapped_column(sa.String(32))
        __table_args__ = (sa.Index("ix_clear_phone_practice_phone", "practice_id", "phone"),)

    class Sealed(Base):
        __tablename__ = "patients_sealed"
        id: Mapped[int] = mapped_column(primary_key=True)
        practice_id: Mapped[str] = mapped_column(sa.String(64))
        first_name: Mapped[str] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
        last_name: Mapped[str] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
        birth_date: Mapped[dt.date] = mapped_column(carnet.EncryptedDate(tenant="practice_id"))
        phone: Mapped[str] = mapped_column(carnet.EncryptedString(32, tenant="practice_id"))
        phone_bidx = carnet.BlindIndex("phone", transform=transforms.phone_fr, bits=bits)

    return AllClear, ClearPhone, Sealed, Base.metadata


def _population(n: int, practices: int) -> list[dict[str, Any]]:
    rng = random.Random(13)  # noqa: S311 - synthetic data
    firsts = ("Camille", "Léa", "Hugo", "Chloé", "Louis", "Inès", "Jules", "Manon", "Noé", "Zoé")
    lasts = ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand")
    out = []
    for i in range(n):
        # ARCEP's fiction range 01 99 00 xx xx would give only 10,000 numbers;
        # distinct numbers per patient keep both sides returning one row.
        phone = f"+3317{i:07d}"
        out.append({
            "id": i + 1,
            "practice_id": f"cab-{i % practices:03d}",
            "first_name": rng.choice(firsts),
            "last_name": rng.choice(lasts),
            "birth_date": dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(33_000)),
            "phone": phone,
        })  # fmt: skip
    return out


def _fill(engine: sa.Engine, tables: list[Any], people: list[dict[str, Any]]) -> None:
    by_practice: dict[str, list[dict[str, Any]]] = {}
    for p in people:
        by_practice.setdefault(p["practice_id"], []).append(p)
    # Core writes under each practice's scope: the index is computed per row.
    for practice, rows in by_practice.items():
        with carnet.tenant_scope(practice), engine.begin() as conn:
            for cls in tables:
                conn.execute(cls.__table__.insert(), rows)


def _lookups(people: list[dict[str, Any]], n: int) -> list[tuple[str, str, int]]:
    rng = random.Random(7)  # noqa: S311
    picks = rng.sample(people, n)
    return [(p["practice_id"], p["phone"], p["id"]) for p in picks]


def _bench(bits_for: float) -> list[Row]:
    n_patients = scale(N_PATIENTS)
    n_practices = min(N_PRACTICES, n_patients)
    per_practice = n_patients // n_practices
    plan = carnet.plan_bits(per_practice, false_positives=bits_for)
    clear_cls, plain_cls, sealed_cls, metadata = _models(plan.bits)
    with temp_dir() as d:
        engine = sa.create_engine(f"sqlite:///{Path(d) / 'search.db'}")
        keys = carnet.KeyManager(engine, master_key=master_key_uri(Path(d)))
        keys.create_schema()
        metadata.create_all(engine)
        carnet.configure(keys)
        try:
            people = _population(n_patients, n_practices)
            _fill(engine, [clear_cls, plain_cls, sealed_cls], people)
            lookups = _lookups(people, min(scale(N_LOOKUPS), n_patients))

            def by_clear_phone(cls: Any) -> Any:
                # The baselines at their best too: one statement with bound
                # parameters, built once, as carnet.search builds its own.
                stmt = sa.select(cls).where(
                    cls.practice_id == sa.bindparam("p"), cls.phone == sa.bindparam("ph")
                )

                def body() -> None:
                    with Session(engine) as s:
                        for practice, phone, pid in lookups:
                            got = s.scalars(stmt, {"p": practice, "ph": phone}).all()
                            if [p.id for p in got] != [pid]:
                                raise AssertionError("baseline lookup went wrong")

                return body

            plain_body = by_clear_phone(plain_cls)
            clear_body = by_clear_phone(clear_cls)

            candidates = 0

            def sealed_body() -> None:
                nonlocal candidates
                with Session(engine) as s:
                    for practice, phone, pid in lookups:
                        got = carnet.search(s, sealed_cls.phone_bidx, phone, tenant=practice)
                        if [p.id for p in got] != [pid]:
                            raise AssertionError("blind-index lookup went wrong")

            with Session(engine) as s:
                for practice, phone, _pid in lookups:
                    cond, _ = carnet.searchable.candidates(
                        sealed_cls.phone_bidx, phone, tenant=practice
                    )
                    candidates += len(s.scalars(sa.select(sealed_cls.id).where(cond)).all())
            for body in (sealed_body, plain_body, clear_body):
                body()  # warm: key caches, statement caches, page cache
            med = interleaved_medians(
                {
                    "plain": (None, plain_body),
                    "carnet": (None, sealed_body),
                    "clear": (None, clear_body),
                },
                repeats(5),
            )
        finally:
            carnet.configure(None)
            keys.close()
            engine.dispose()
    n = len(lookups)
    extra = candidates / n - 1
    where = f"{n_patients:,} patients, {n_practices} practices, SQLite"
    return [
        row(
            f"lookup by phone: {plan.bits}-bit blind index vs clear phone column",
            med["plain"] / n * 1e6,
            med["carnet"] / n * 1e6,
            "µs/lookup",
            f"{where}; plan_bits(fp={bits_for:g}); "
            f"{extra:.2f} false positive(s) per lookup opened and dropped",
            target=1.5,
        ),
        row(
            f"  same, {plan.bits}-bit, vs a table with every field in clear",
            med["clear"] / n * 1e6,
            med["carnet"] / n * 1e6,
            "µs/lookup",
            "context: adds decrypting names and birth date of each row read",
        ),
    ]


def run() -> list[Row]:
    return _bench(2.0) + _bench(0.25)
