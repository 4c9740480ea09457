"""A migration SIGKILLed three times and resumed, while the application writes.

Two writer processes update comments through the application's mixed-read
column type (sealed writes) and append each committed value to a ledger. The
migration is killed mid-run three times and resumed. At the end every row
opens in strict mode and holds exactly what it should: the ledger's last
value for rows the application wrote, the original note for the others (so
nothing was lost, and nothing was encrypted twice), and the job's counters
agree.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import sqlalchemy as sa

import carnet
from carnet.jobs import job_progress
from support.paths import ROOT

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from legacy_practice import app as legacy_app  # noqa: E402
from legacy_practice.generate import populate  # noqa: E402

N = 600
JOB = "migrate:consultations.comment"

WRITER = r"""
import os, random, sys, time
import sqlalchemy as sa
import carnet
from legacy_practice import app
url, mk, ledger, stop, me, n = sys.argv[1:7]
me, n = int(me), int(n)
engine = sa.create_engine(url)
keys = carnet.KeyManager(engine, master_key=mk)
carnet.configure(keys)
table = app.consultations("mixed")
rng = random.Random(me)
k = 0
with open(ledger, "a", encoding="utf-8") as out:
    while not os.path.exists(stop):
        cid = rng.randrange(1, n + 1)
        if cid % 2 != me:
            continue
        k += 1
        text = f"écrit par l'application {me}-{k}"
        try:
            app.write_comment(engine, table, cid, text)
        except sa.exc.OperationalError:
            continue  # lock wait gave up: nothing committed, nothing to record
        out.write(f"{cid}\t{text}\n")
        out.flush()
        time.sleep(0.02)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(EXAMPLES), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    )
    return env


def _migrate(db_url: str, mk: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "carnet.migrate.cli",
            "run",
            "--database-url",
            db_url,
            "--master-key",
            mk,
            "--table",
            "consultations",
            "--column",
            "comment",
            "--tenant",
            "patients.practice_id",
            "--batch-size",
            "20",
            "--pause",
            "0.05",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigkill_three_times_and_resume_with_concurrent_writers(
    engine: sa.Engine, db_url: str, master_key_uri: str, tmp_path: Path
) -> None:
    populate(engine, seed=11, practices_n=4, patients_n=60, consultations_n=N, lookalike=False)
    with engine.connect() as conn:
        original = dict(conn.execute(sa.text("SELECT id, comment FROM consultations")).all())
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    for t in ("1", "2", "3", "4"):
        keys.ensure_key(t)  # first writes must not race to create keys

    ledger, stop = tmp_path / "ledger.tsv", tmp_path / "stop"
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                db_url,
                master_key_uri,
                str(ledger),
                str(stop),
                str(i),
                str(N),
            ],
            env=_env(),
        )
        for i in (0, 1)
    ]
    kills = 0
    try:
        for kills in range(1, 4):
            proc = _migrate(db_url, master_key_uri)
            target = kills * N // 4
            deadline = time.monotonic() + 60
            while job_progress(engine, JOB)["scanned"] < target:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "migration made no progress"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
        final = _migrate(db_url, master_key_uri)
        out, err = final.communicate(timeout=120)
        assert final.returncode == 0, err
        assert "resumed after" in out
    finally:
        stop.touch()
        for w in writers:
            w.wait(timeout=30)
    assert all(w.returncode == 0 for w in writers)
    assert kills == 3

    expected = dict(original)
    written: set[int] = set()
    for line in ledger.read_text(encoding="utf-8").splitlines():
        cid, text = line.split("\t")
        expected[int(cid)] = text
        written.add(int(cid))
    assert len(written) > 10, "the writers barely ran: the test proves nothing"

    strict = legacy_app.consultations("strict")
    carnet.configure(keys)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT c.id, c.comment, p.practice_id FROM consultations c "
                    "JOIN patients p ON p.id = c.patient_id ORDER BY c.id"
                )
            ).all()
            assert len(rows) == N
            for cid, raw, practice in rows:
                if expected[cid] is None:
                    assert raw is None
                    continue
                assert raw.startswith("carnet:")
                with carnet.tenant_scope(str(practice)):
                    value = conn.execute(
                        sa.select(strict.c.comment).where(strict.c.id == cid)
                    ).scalar_one()
                assert value == expected[cid], cid
    finally:
        carnet.configure(None)
        keys.close()

    # Every legacy note the application did not touch was sealed by the
    # migration exactly once; rows it did touch may have been sealed by either.
    nonnull = {c for c, v in original.items() if v is not None}
    progress = job_progress(engine, JOB)
    assert len(nonnull - written) <= progress["rewritten"] <= len(nonnull)
    assert progress["failed"] == 0
