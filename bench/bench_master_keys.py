"""Master-key costs: calls and wall time through AWS KMS and an HSM, and rewrap.

The KMS is moto's server on loopback (a real HTTP round trip, but no WAN:
in-region AWS KMS adds roughly 5-20 ms a call), the HSM is SoftHSM2 in a
temporary directory. Rows whose back-end is missing are reported as such.

- reading 100,000 notes of 50 practices with a cold DEK cache and a warm one,
  under a file master key, then the same data rewrapped under KMS and under
  the HSM: master-key calls grow with practices, not with notes;
- one wrap and one unwrap per provider, against the file provider;
- ``rewrap`` of 10,000 DEKs from a file master key to KMS and to the HSM,
  against file to file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import carnet
from bench.common import Row, master_key_uri, row, scale, temp_dir, timed

PRACTICES = 50
SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
)
HSM_PIN = "bench-pin-0000"
CTX = {"tenant": "bench", "key_id": "00" * 16}


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "bench_mk_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(32))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_kms() -> Iterator[str | None]:
    """A KMS key ARN on a local moto server, with the AWS settings pointing there."""
    try:
        import boto3
        import moto.server  # noqa: F401 - only checks that the server extra is there
    except ImportError:
        yield None
        return
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL_KMS",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
        )
    }
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        fake = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
        os.environ.update(
            AWS_ENDPOINT_URL_KMS=f"http://127.0.0.1:{port}", AWS_REGION="eu-west-3", **fake
        )
        client = boto3.client("kms", region_name="eu-west-3")
        yield client.create_key()["KeyMetadata"]["Arn"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def softhsm(directory: Path) -> Iterator[str | None]:
    """A pkcs11:// URI of a fresh key on a SoftHSM2 token kept under ``directory``."""
    module = next((m for m in SOFTHSM_MODULES if os.path.isfile(m)), None)
    util = shutil.which("softhsm2-util")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        module = None
    if module is None or util is None:
        yield None
        return
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["CARNET_PKCS11_PIN"] = HSM_PIN
    subprocess.run(
        [util, "--init-token", "--free", "--label", "bench", "--so-pin", "0000", "--pin", HSM_PIN],
        check=True,
        capture_output=True,
    )
    uri = f"pkcs11://bench/master?module={module}"
    carnet.create_master_key(uri).close()
    yield uri


def _sqlite_engine(path: Path) -> sa.Engine:
    engine = sa.create_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _fast(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        # The benchmark measures master-key work, not fsync.
        dbapi_conn.execute("PRAGMA synchronous=OFF")
        dbapi_conn.execute("PRAGMA journal_mode=WAL")

    return engine


def _fill(engine: sa.Engine, n: int) -> None:
    practices = [f"practice-{i:02d}" for i in range(PRACTICES)]
    per = max(1, n // PRACTICES)
    with Session(engine) as s:
        for p in practices:
            s.add_all(
                Note(practice_id=p, body=f"consultation {i} of {p}: BP 130/85, review 3 mo")
                for i in range(per)
            )
            s.flush()
        s.commit()


def _read_all(engine: sa.Engine) -> int:
    with Session(engine) as s:
        return sum(1 for n in s.scalars(sa.select(Note)) if n.body is not None)


def _read_rows(
    engine: sa.Engine, keys: carnet.KeyManager, label: str, n: int, baseline_cold: float | None
) -> tuple[list[Row], float]:
    carnet.configure(keys)
    _read_all(engine)  # page cache and statement cache warm for every provider alike
    colds, warms = [], []
    for _ in range(3):
        keys.clear_cache()
        keys.reset_stats()
        colds.append(timed(lambda: _read_all(engine)))
        cold_calls = keys.stats()["master_calls"]
        keys.reset_stats()
        warms.append(timed(lambda: _read_all(engine)))
        warm_calls = keys.stats()["master_calls"]
    cold, warm = statistics.median(colds), statistics.median(warms)
    what = f"{n:,} notes of {PRACTICES} practices, ORM, SQLite file"
    rows = [
        row(
            f"master-key calls reading {what} [{label}]",
            float(cold_calls),
            float(warm_calls),
            "calls",
            "baseline = cold DEK cache (one unwrap per practice), value = warm cache",
        ),
        row(
            f"read {what}, cold vs warm cache [{label}]",
            warm,
            cold,
            "s",
            f"{cold_calls} master-key calls in the cold read; medians of 3",
        ),
    ]
    if baseline_cold is not None:
        rows.append(
            row(
                f"read {what}, cold cache, {label} vs file master key",
                baseline_cold,
                cold,
                "s",
                "whole cold read, master-key calls included; medians of 3",
            )
        )
    return rows, cold


def _call_latency(uri: str, reps: int = 200) -> tuple[float, float]:
    mk = carnet.open_master_key(uri)
    dek = os.urandom(32)
    wrapped = mk.wrap(dek, CTX)
    # Per-call clocks, not timed(): its gc.collect() per call would dwarf a wrap.
    wraps, unwraps = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        mk.wrap(dek, CTX)
        t1 = time.perf_counter()
        mk.unwrap(wrapped, CTX)
        wraps.append(t1 - t0)
        unwraps.append(time.perf_counter() - t1)
    mk.close()
    return statistics.median(wraps), statistics.median(unwraps)


def _rewrap_time(d: Path, to: str | None, n: int, name: str) -> tuple[float, int]:
    """Seconds to rewrap ``n`` DEKs made under a fresh file key to ``to`` (another file key)."""
    sub = d / name
    sub.mkdir()
    engine = _sqlite_engine(sub / "keys.db")
    keys = carnet.KeyManager(engine, master_key=master_key_uri(sub))
    keys.create_schema()
    for i in range(n):
        keys.ensure_key(f"t{i:06d}")
    keys.reset_stats()
    target = to or f"file://{sub / 'target.key'}"
    if to is None:
        carnet.create_master_key(target).close()
    started = time.perf_counter()
    report = keys.rewrap(to=target, batch_size=500)
    elapsed = time.perf_counter() - started
    calls = keys.stats()["master_calls"]
    assert report.rewrapped == n  # noqa: S101 - a bench that rewrapped less measured nothing
    keys.close()
    engine.dispose()
    return elapsed, calls


def run() -> list[Row]:
    rows: list[Row] = []
    n = scale(100_000)
    n_keys = scale(10_000)
    with contextlib.ExitStack() as stack:
        d = stack.enter_context(temp_dir())
        kms_arn = stack.enter_context(moto_kms())
        (d / "hsm").mkdir()
        hsm_uri = stack.enter_context(softhsm(d / "hsm"))
        kms_uri = f"aws-kms://{kms_arn}" if kms_arn else None
        file_uri = master_key_uri(d)

        # Per-call latency of each provider.
        fw, fu = _call_latency(file_uri)
        us = 1e6
        for label, uri in (("AWS KMS (moto, loopback)", kms_uri), ("HSM (SoftHSM2)", hsm_uri)):
            if uri is None:
                rows.append(
                    row(
                        f"one wrap / unwrap [{label}]",
                        None,
                        None,
                        "µs",
                        "back-end not available here",
                    )
                )
                continue
            w, u = _call_latency(uri)
            rows.append(
                row(
                    f"one wrap (DEK under master key) [{label}] vs file",
                    fw * us,
                    w * us,
                    "µs",
                    "median of 200",
                )
            )
            rows.append(
                row(f"one unwrap [{label}] vs file", fu * us, u * us, "µs", "median of 200")
            )

        # Reads: the same notes, rewrapped from provider to provider.
        engine = _sqlite_engine(d / "notes.db")
        keys = carnet.KeyManager(engine, master_key=file_uri)
        keys.create_schema()
        Base.metadata.create_all(engine)
        carnet.configure(keys)
        try:
            _fill(engine, n)
            more, file_cold = _read_rows(engine, keys, "file", n, None)
            rows += more
            for label, uri in (("AWS KMS", kms_uri), ("HSM", hsm_uri)):
                if uri is None:
                    continue
                keys.rewrap(to=uri)
                fresh = carnet.KeyManager(engine, master_key=uri)
                more, _ = _read_rows(engine, fresh, label, n, file_cold)
                rows += more
                fresh.close()
        finally:
            carnet.configure(None)
            keys.close()
            engine.dispose()

        # Rewrap of many DEKs.
        base, base_calls = _rewrap_time(d, None, n_keys, "rewrap-file")
        for label, uri in (("AWS KMS", kms_uri), ("HSM", hsm_uri)):
            if uri is None:
                continue
            secs, calls = _rewrap_time(d, uri, n_keys, f"rewrap-{label.split()[0].lower()}")
            rows.append(
                row(
                    f"rewrap {n_keys:,} DEKs, file → {label} vs file → file",
                    base,
                    secs,
                    "s",
                    f"{calls:,} master-key calls ({n_keys / secs:,.0f} DEKs/s); "
                    f"file → file made {base_calls:,}",
                )
            )
    return rows
