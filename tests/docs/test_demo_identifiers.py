"""After ``carnet demo``: no patient's name, phone number or birth date in the SQLite files.

The demo seals names, birth dates and phone numbers (``EncryptedString``,
``EncryptedDate``). This test reads the raw bytes of the database file and
its WAL or journal, and looks for every patient's values in the forms the demo
writes them and in the forms a leak would take: the phone as written
("06 39 98 12 34") and as digits, the birth date as ISO text (SQLite's DATE
storage), in the French form the notes use, and as SQLite's other date
encodings where a value could be stored as a number (Julian day, Unix time).

A value that also occurs in a column the demo keeps in clear (a doctor's
name in ``notes.author``, a street in a practice's name, a note's date) is
not evidence of a leak; such values are left out, and the test checks that
they are few. Values shorter than 4 bytes are left out too: ciphertext is
uniformly random bytes, so a 3-byte probe would match it by chance about once
per 16 MB.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest

from carnet import _synthetic
from carnet.demo import run_demo, scan_files

SEED = 5
PRACTICES = 3
PATIENTS = 200
MIN_PROBE = 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    lines: list[str] = []
    return run_demo(
        str(tmp_path_factory.mktemp("demo_ids")),
        echo=lines.append,
        seed=SEED,
        practices=PRACTICES,
        patients=PATIENTS,
    )


def _files(figures: dict[str, Any]) -> list[Path]:
    db = Path(figures["database"])
    # The demo's own list, and whatever journal exists now (its last steps write too).
    found = {Path(p) for p in figures["files_scanned"]}
    found |= {db.with_name(db.name + s) for s in ("-wal", "-journal")}
    return sorted(p for p in found | {db} if p.exists())


def _clear_text(db: Path) -> str:
    """Every text value the demo stores in clear, and the schema's SQL."""
    conn = sqlite3.connect(db)
    try:
        parts = [str(r[0]) for r in conn.execute("SELECT sql FROM sqlite_master") if r[0]]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for t in tables:
            for row in conn.execute(f'SELECT * FROM "{t}"'):  # noqa: S608 - names from the file
                parts.extend(v for v in row if isinstance(v, str))
    finally:
        conn.close()
    return "\n".join(parts)


def _date_forms(d: dt.date) -> list[bytes]:
    iso = d.isoformat().encode("ascii")
    french = d.strftime("%d/%m/%Y").encode("ascii")
    # SQLite has no date type: a DATE may be text, a Julian day (REAL) or
    # Unix seconds (INTEGER), stored big-endian in the record.
    julian = d.toordinal() + 1721424.5
    unix = int(dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc).timestamp())
    return [iso, french, struct.pack(">d", julian), struct.pack(">q", unix)]


def test_no_name_phone_or_birth_date_in_the_demo_files(demo: dict[str, Any]) -> None:
    data = _synthetic.generate(SEED, practices=PRACTICES, patients=PATIENTS)
    files = _files(demo)
    assert Path(demo["database"]) in files
    clear = _clear_text(Path(demo["database"]))

    probes: dict[bytes, list[int]] = {}
    left_out: dict[str, set[str]] = {"in clear columns": set(), "short": set()}

    def probe(value: str | bytes, pid: int, text: str | None = None) -> None:
        raw = value.encode("utf-8") if isinstance(value, str) else value
        if text is not None and text in clear:
            left_out["in clear columns"].add(text)
            return
        if len(raw) < MIN_PROBE:
            left_out["short"].add(text or repr(raw))
            return
        probes.setdefault(raw, []).append(pid)

    for p in data.patients:
        probe(p.first_name, p.id, p.first_name)
        probe(p.last_name, p.id, p.last_name)
        probe(p.phone, p.id, p.phone)
        probe(p.phone.replace(" ", ""), p.id, p.phone.replace(" ", ""))
        for i, form in enumerate(_date_forms(p.birth_date)):
            probe(form, p.id, form.decode("ascii") if i < 2 else None)

    # The exclusions are a handful of common words (doctors' names, streets,
    # dates of notes), not a way around the test.
    names = {p.first_name for p in data.patients} | {p.last_name for p in data.patients}
    assert len(left_out["in clear columns"] & names) <= len(names) // 4
    assert len(probes) >= 5 * PATIENTS
    found = scan_files(files, probes)
    assert found == set(), f"{len(found)} patient(s) with a value in the raw files"


def test_the_scan_finds_each_kind_of_value_when_it_is_there(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    # The same scan over a copy with one patient's values planted in clear
    # finds that patient: a scan that can see nothing proves nothing.
    data = _synthetic.generate(SEED, practices=PRACTICES, patients=PATIENTS)
    p = max(data.patients, key=lambda q: len(q.last_name))
    for planted in (p.last_name, p.phone, p.birth_date.isoformat()):
        copy = tmp_path / "copy.db"
        copy.write_bytes(Path(demo["database"]).read_bytes() + planted.encode("utf-8"))
        assert p.id in scan_files([copy], {planted.encode("utf-8"): [p.id]})
