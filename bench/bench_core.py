"""Issue 2's targets: the per-value cost of carnet and its cost through SQLAlchemy.

Side by side in one run, on the same database and data:

- seal+open of a ~600-byte note: ``KeyManager.encrypt`` + ``decrypt`` (warm
  cache) against bare ``cryptography`` AESGCM encrypt + decrypt (target ≤ 2×);
- ORM insert and select of 10,000 notes: ``EncryptedText`` against a plain
  ``Text`` column (target ≤ 1.15×) and against sqlalchemy-utils'
  ``StringEncryptedType(Unicode, key, AesGcmEngine)`` (target: carnet's select
  at least 2× faster);
- Core executemany insert and select of 10,000 rows in a ``tenant_scope``
  against plain (target select ≤ 1.8×);
- master-key unwraps reading 10,000 notes of 20 practices, cold and warm;
- peak Python memory of the ORM select.

carnet's database checks are off here (``bench_checks`` measures them). The
compared tables differ only in the note column's type; every side uses
the same session pattern (a new Session per repeat, default
expire_on_commit), the same rows and the same number of statements.
"""

from __future__ import annotations

import os
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

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
from carnet import _synthetic, envelope

N_NOTES = 10_000
N_TENANTS = 20
SEAL_ITERATIONS = 20_000
LABEL = "notes.body"


def _note_of_about(size: int) -> str:
    notes = _synthetic.generate_notes(200, seed=42)
    return min((n.text for n in notes), key=lambda t: abs(len(t.encode("utf-8")) - size))


# -- seal + open ---------------------------------------------------------------------------


def bench_seal_open(keys: carnet.KeyManager) -> list[Row]:
    text = _note_of_about(600)
    plaintext = text.encode("utf-8")
    tenant = "cab-001"
    keys.ensure_key(tenant)
    blob = keys.encrypt(plaintext, tenant=tenant, label=LABEL)
    # The baseline authenticates the same associated data carnet builds.
    aad = envelope.associated_data(keys.key_id_of(blob), LABEL, tenant)
    aes = AESGCM(os.urandom(32))
    n = scale(SEAL_ITERATIONS)
    urandom = os.urandom
    enc, dec = keys.encrypt, keys.decrypt

    def bare_both() -> None:
        for _ in range(n):
            nonce = urandom(12)
            aes.decrypt(nonce, aes.encrypt(nonce, plaintext, aad), aad)

    def carnet_both() -> None:
        for _ in range(n):
            dec(enc(plaintext, tenant=tenant, label=LABEL), tenant=tenant, label=LABEL)

    def bare_enc() -> None:
        for _ in range(n):
            aes.encrypt(urandom(12), plaintext, aad)

    def carnet_enc() -> None:
        for _ in range(n):
            enc(plaintext, tenant=tenant, label=LABEL)

    nonce0 = urandom(12)
    ct0 = aes.encrypt(nonce0, plaintext, aad)

    def bare_dec() -> None:
        for _ in range(n):
            aes.decrypt(nonce0, ct0, aad)

    def carnet_dec() -> None:
        for _ in range(n):
            dec(blob, tenant=tenant, label=LABEL)

    m = interleaved_medians(
        {
            "bare_both": (None, bare_both),
            "carnet_both": (None, carnet_both),
            "bare_enc": (None, bare_enc),
            "carnet_enc": (None, carnet_enc),
            "bare_dec": (None, bare_dec),
            "carnet_dec": (None, carnet_dec),
        },
        repeats(7),
    )
    us = {k: v / n * 1e6 for k, v in m.items()}
    size = f"{len(plaintext)}-byte note, warm cache"
    return [
        row(
            "seal+open, KeyManager vs bare AESGCM",
            us["bare_both"],
            us["carnet_both"],
            "µs/op",
            size,
            target=2.0,
        ),
        row("  seal only (encrypt)", us["bare_enc"], us["carnet_enc"], "µs/op", size),
        row("  open only (decrypt)", us["bare_dec"], us["carnet_dec"], "µs/op", size),
    ]


# -- schema ---------------------------------------------------------------------------------


class MinimalAesGcm(TypeDecorator[str]):
    """The floor any encrypted column type pays: one AES-GCM call per value, no key id,
    no associated data, one key for every practice. Not a safe design: the baseline."""

    impl = sa.LargeBinary
    cache_ok = True

    def __init__(self, key: bytes) -> None:
        super().__init__()
        self._aes = AESGCM(key)

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        nonce = os.urandom(12)
        return nonce + self._aes.encrypt(nonce, value.encode("utf-8"), None)

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        return self._aes.decrypt(value[:12], value[12:], None).decode("utf-8")


class _Models:
    """Four ORM models and three Core tables, identical but for the note column's type."""

    def __init__(self, keys: carnet.KeyManager, minimal_key: bytes | None = None) -> None:
        from sqlalchemy_utils import StringEncryptedType
        from sqlalchemy_utils.types.encrypted.encrypted_type import AesGcmEngine

        class Base(DeclarativeBase):
            pass

        def columns(body: Any) -> dict[str, Any]:
            return {
                "id": mapped_column(sa.Integer, primary_key=True),
                "practice_id": mapped_column(sa.String(64), index=True),
                "patient_id": mapped_column(sa.Integer),
                "body": mapped_column(body, nullable=True),
            }

        def model(name: str, body: Any) -> type[Any]:
            attrs: dict[str, Any] = {"__tablename__": name, **columns(body)}
            # carnet's database checks off: this module measures the column type
            # and the pipeline against the other types; bench_checks measures
            # the checks' own cost, with them on (docs/performance.md).
            attrs["__table_args__"] = {"info": {"carnet_checks": False}}
            attrs["__annotations__"] = {
                "id": Mapped[int],
                "practice_id": Mapped[str],
                "patient_id": Mapped[int],
                "body": Mapped[Any],
            }
            return type(name, (Base,), attrs)

        utils_key = "bench-passphrase-not-a-secret"  # noqa: S105 - throwaway benchmark key
        self.plain = model("orm_plain", sa.Text())
        self.carnet = model("orm_carnet", carnet.EncryptedText(tenant="practice_id", manager=keys))
        self.utils = model("orm_utils", StringEncryptedType(sa.Unicode, utils_key, AesGcmEngine))
        minimal_key = minimal_key or os.urandom(32)
        self.minimal = model("orm_minimal", MinimalAesGcm(minimal_key))
        self.core_plain = model("core_plain", sa.Text()).__table__
        self.core_minimal = model("core_minimal", MinimalAesGcm(minimal_key)).__table__
        self.core_carnet = model(
            "core_carnet", carnet.EncryptedText(tenant="practice_id", manager=keys)
        ).__table__
        self.metadata = Base.metadata


def _orm_insert(
    engine: sa.Engine, cls: type[Any], data: list[_synthetic.Note]
) -> Callable[[], None]:
    def body() -> None:
        with Session(engine) as session:
            session.add_all(
                cls(practice_id=n.practice_id, patient_id=n.patient_id, body=n.text) for n in data
            )
            session.commit()

    return body


def _orm_select(engine: sa.Engine, cls: type[Any], expect: int) -> Callable[[], None]:
    def body() -> None:
        with Session(engine) as session:
            notes = session.scalars(sa.select(cls)).all()
            total = sum(len(n.body) for n in notes)
        if len(notes) != expect or not total:
            raise RuntimeError(f"{cls.__name__}: read {len(notes)} rows, expected {expect}")

    return body


def _delete_all(engine: sa.Engine, table: sa.Table) -> Callable[[], None]:
    def setup() -> None:
        with engine.begin() as conn:
            conn.execute(table.delete())

    return setup


def core_insert(
    engine: sa.Engine, table: sa.Table, tenant: str, params: list[dict[str, Any]]
) -> Callable[[], None]:
    def body() -> None:
        with carnet.tenant_scope(tenant), engine.begin() as conn:
            conn.execute(table.insert(), params)

    return body


def _core_select(
    engine: sa.Engine, table: sa.Table, tenant: str, expect: int
) -> Callable[[], None]:
    def body() -> None:
        with carnet.tenant_scope(tenant), engine.connect() as conn:
            rows = conn.execute(sa.select(table)).all()
        if len(rows) != expect or not isinstance(rows[0].body, str):
            raise RuntimeError(f"{table.name}: read {len(rows)} rows, expected {expect}")

    return body


def _peak_kib(fn: Callable[[], None]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1024
    finally:
        tracemalloc.stop()


def bench_database(url: str, label: str, directory: Path) -> list[Row]:
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri(directory))
    try:
        return _bench_database(engine, keys, label)
    finally:
        keys.close()
        engine.dispose()


def _bench_database(engine: sa.Engine, keys: carnet.KeyManager, label: str) -> list[Row]:
    keys.create_schema()
    m = _Models(keys)
    m.metadata.create_all(engine)
    n = scale(N_NOTES)
    data = _synthetic.generate_notes(n, seed=7, tenants=N_TENANTS)
    tenants = sorted({d.practice_id for d in data})
    for t in tenants:
        keys.ensure_key(t)  # key creation is a one-off per practice, not what is measured here
    reps = repeats(5)
    rows: list[Row] = []
    mean_len = sum(len(d.text.encode()) for d in data) // len(data)
    what = f"{n:,} notes (mean {mean_len} B), {len(tenants)} practices, {label}"

    # ORM insert: each repeat empties the table first (untimed) and inserts the same rows.
    ins = interleaved_medians(
        {
            name: (_delete_all(engine, cls.__table__), _orm_insert(engine, cls, data))
            for name, cls in (
                ("plain", m.plain),
                ("carnet", m.carnet),
                ("utils", m.utils),
                ("minimal", m.minimal),
            )
        },
        reps,
    )
    # ORM select: the tables now hold the rows of the last insert.
    sel = interleaved_medians(
        {
            name: (None, _orm_select(engine, cls, n))
            for name, cls in (
                ("plain", m.plain),
                ("carnet", m.carnet),
                ("utils", m.utils),
                ("minimal", m.minimal),
            )
        },
        reps,
    )
    ms = 1e3
    rows += [
        row(
            f"ORM insert, EncryptedText vs Text [{label}]",
            ins["plain"] * ms,
            ins["carnet"] * ms,
            "ms",
            what,
            target=1.15,
        ),
        row(
            f"ORM select, EncryptedText vs Text [{label}]",
            sel["plain"] * ms,
            sel["carnet"] * ms,
            "ms",
            what,
            target=1.15,
        ),
        row(
            f"ORM insert, EncryptedText vs sqlalchemy-utils [{label}]",
            ins["utils"] * ms,
            ins["carnet"] * ms,
            "ms",
            "StringEncryptedType(Unicode, AesGcmEngine)",
        ),
        row(
            f"ORM select, EncryptedText vs sqlalchemy-utils [{label}]",
            sel["utils"] * ms,
            sel["carnet"] * ms,
            "ms",
            "StringEncryptedType(Unicode, AesGcmEngine)",
            target=0.5,
        ),
    ]

    # Core: one practice's rows in one tenant_scope, one executemany.
    tenant = tenants[0]
    params = [{"practice_id": tenant, "patient_id": d.patient_id, "body": d.text} for d in data]
    core_ins = interleaved_medians(
        {
            name: (_delete_all(engine, table), core_insert(engine, table, tenant, params))
            for name, table in (
                ("plain", m.core_plain),
                ("carnet", m.core_carnet),
                ("minimal", m.core_minimal),
            )
        },
        reps,
    )
    core_sel = interleaved_medians(
        {
            name: (None, _core_select(engine, table, tenant, n))
            for name, table in (
                ("plain", m.core_plain),
                ("carnet", m.core_carnet),
                ("minimal", m.core_minimal),
            )
        },
        reps,
    )
    core_what = f"{n:,} rows of one practice in tenant_scope, {label}"
    rows += [
        row(
            f"Core executemany insert, EncryptedText vs Text [{label}]",
            core_ins["plain"] * ms,
            core_ins["carnet"] * ms,
            "ms",
            core_what,
        ),
        row(
            f"Core select, EncryptedText vs Text [{label}]",
            core_sel["plain"] * ms,
            core_sel["carnet"] * ms,
            "ms",
            core_what,
            target=1.8,
        ),
    ]

    # Against the minimal AES-GCM type: what carnet adds on top of the floor.
    floor = "minimal AES-GCM TypeDecorator (one key, no associated data)"
    rows += [
        row(
            f"ORM insert, EncryptedText vs minimal type [{label}]",
            ins["minimal"] * ms,
            ins["carnet"] * ms,
            "ms",
            floor,
            target=1.10,
        ),
        row(
            f"ORM select, EncryptedText vs minimal type [{label}]",
            sel["minimal"] * ms,
            sel["carnet"] * ms,
            "ms",
            floor,
            target=1.10,
        ),
        row(
            f"Core executemany insert, EncryptedText vs minimal type [{label}]",
            core_ins["minimal"] * ms,
            core_ins["carnet"] * ms,
            "ms",
            floor,
            target=1.10,
        ),
        row(
            f"Core select, EncryptedText vs minimal type [{label}]",
            core_sel["minimal"] * ms,
            core_sel["carnet"] * ms,
            "ms",
            floor,
            target=1.10,
        ),
    ]

    # Master-key calls: cold cache, then warm.
    keys.clear_cache()
    keys.reset_stats()
    _orm_select(engine, m.carnet, n)()
    cold = keys.stats()["master_unwraps"]
    _orm_select(engine, m.carnet, n)()
    warm = keys.stats()["master_unwraps"] - cold
    rows.append(
        row(
            f"master-key unwraps reading {n:,} notes of {len(tenants)} practices [{label}]",
            float(cold),
            float(warm),
            "unwraps",
            f"baseline = cold cache (expect {len(tenants)}, one per practice), "
            "value = warm cache (expect 0)",
        )
    )

    # Peak Python heap of one ORM select (tracemalloc slows code: measured apart from timings).
    peak = {
        name: _peak_kib(_orm_select(engine, cls, n))
        for name, cls in (("plain", m.plain), ("carnet", m.carnet), ("utils", m.utils))
    }
    rows += [
        row(
            f"ORM select peak memory, EncryptedText vs Text [{label}]",
            peak["plain"] / 1024,
            peak["carnet"] / 1024,
            "MiB",
            "tracemalloc peak",
        ),
        row(
            f"ORM select peak memory, EncryptedText vs sqlalchemy-utils [{label}]",
            peak["utils"] / 1024,
            peak["carnet"] / 1024,
            "MiB",
            "tracemalloc peak",
        ),
    ]
    return rows


def run() -> list[Row]:
    rows: list[Row] = []
    with warnings.catch_warnings():
        # sqlalchemy-utils' own deprecation chatter is not what is measured.
        warnings.simplefilter("ignore")
        with temp_dir() as d:
            keys = carnet.KeyManager(f"sqlite:///{d / 'micro.db'}", master_key=master_key_uri(d))
            keys.create_schema()
            try:
                rows += bench_seal_open(keys)
            finally:
                keys.close()
                keys.engine.dispose()
            (d / "sqlite").mkdir()
            rows += bench_database(
                f"sqlite:///{d / 'sqlite' / 'bench.db'}", "SQLite file", d / "sqlite"
            )
            with postgres_database() as pg_url:
                if pg_url is not None:
                    (d / "pg").mkdir()
                    rows += bench_database(pg_url, "PostgreSQL", d / "pg")
    return rows
