"""``run_demo``: its figures, and an independent look at the bytes it leaves on disk."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from carnet import _synthetic
from carnet.demo import distinctive_probes, note_probes, run_demo, scan_files
from carnet.errors import ConfigurationError

SEED = 11
PRACTICES = 4
PATIENTS = 150


DEMO_DIR: dict[str, Path] = {}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[str]]:
    lines: list[str] = []
    DEMO_DIR["path"] = tmp_path_factory.mktemp("demo")
    figures = run_demo(
        str(DEMO_DIR["path"]),
        echo=lines.append,
        seed=SEED,
        practices=PRACTICES,
        patients=PATIENTS,
    )
    return figures, lines


def _dataset() -> _synthetic.Dataset:
    return _synthetic.generate(SEED, practices=PRACTICES, patients=PATIENTS)


def test_figures(demo: tuple[dict[str, Any], list[str]]) -> None:
    figures, lines = demo
    n = len(_dataset().notes)
    assert figures["practices"] == PRACTICES
    assert figures["patients"] == PATIENTS
    assert figures["notes"] == n
    assert figures["notes_found_in_file"] == 0
    assert figures["notes_found_final"] == 0
    assert figures["notes_total_final"] == n + 1
    assert figures["phones_found_in_file"] == 0  # phone numbers are encrypted too
    assert figures["phone_lookup_ids"] == figures["phone_lookup_expected"] != []
    assert figures["phone_lookup_candidates"] >= len(figures["phone_lookup_ids"])
    assert figures["notes_read_back"] == n
    assert figures["cold_unwraps"] == PRACTICES
    assert figures["warm_unwraps"] == 0
    assert figures["rotated_version"] == 2
    assert figures["old_notes_key_version"] == 1
    assert figures["new_note_key_version"] == 2
    assert figures["old_notes_readable_after_rotation"] > 0
    assert figures["shredded_notes"] > 0
    assert figures["shredded_unreadable"] == figures["shredded_notes"]
    assert figures["shredded_orm_error"] == "KeyDestroyed"
    assert figures["other_notes_readable"] == figures["other_notes"] > 0
    assert f"0 of {n} notes found in clinic.db" in "\n".join(lines)


def test_database_file_holds_no_note_text(demo: tuple[dict[str, Any], list[str]]) -> None:
    figures, _ = demo
    raw = b"".join(Path(p).read_bytes() for p in figures["files_scanned"])
    assert Path(figures["database"]).read_bytes() in raw
    for note in _dataset().notes:
        text = note.text.encode("utf-8")
        # Slices picked here, not the demo's own probes, so a bug there cannot hide a leak.
        for start in range(0, max(1, len(text) - 24), 97):
            assert text[start : start + 24] not in raw


def test_scan_finds_a_planted_canary(
    demo: tuple[dict[str, Any], list[str]],
    tmp_path: Path,
) -> None:
    figures, _ = demo
    copy = tmp_path / "clinic-copy.db"
    shutil.copyfile(figures["database"], copy)
    notes = _dataset().notes
    canary = notes[3].text
    other = next(n for n in notes if n.patient_id != notes[3].patient_id).text
    con = sqlite3.connect(copy)
    with con:
        con.execute("CREATE TABLE leak (body TEXT)")
        con.execute("INSERT INTO leak VALUES (?)", (canary,))
    con.close()
    assert canary.encode("utf-8") in copy.read_bytes()
    probes = distinctive_probes({4: canary, 5: other})
    assert scan_files([copy], probes) == {4}
    assert scan_files([figures["database"]], probes) == set()


def test_output_shows_no_note_text_but_the_labelled_example(
    demo: tuple[dict[str, Any], list[str]],
) -> None:
    _, lines = demo
    out = "\n".join(lines).encode("utf-8")
    notes = _dataset().notes
    example = notes[0].text.encode("utf-8")
    for note in notes[1:]:
        # A patient's notes can share an opening (name, birth date) with the example.
        assert not any(p in out for p in note_probes(note.text, 24) if p not in example)
    assert "read back through carnet" in "\n".join(lines)


def test_refuses_a_directory_with_an_earlier_demo(demo: tuple[dict[str, Any], list[str]]) -> None:
    figures, _ = demo
    with pytest.raises(ConfigurationError, match="already exists"):
        run_demo(figures["directory"], echo=lambda _line: None)


def test_the_demo_database_ends_with_its_checks(demo: tuple[dict[str, Any], list[str]]) -> None:
    import sqlalchemy as sa

    from carnet import dbchecks

    engine = sa.create_engine(f"sqlite:///{DEMO_DIR['path'] / 'clinic.db'}")
    encrypted = {"notes": ["body"], "patients": ["first_name", "last_name", "birth_date", "phone"]}
    try:
        with engine.connect() as conn:
            for table, columns in encrypted.items():
                for col in columns:
                    spec = dbchecks.ColumnSpec(table, None, col, "binary", practice="practice_id")
                    assert dbchecks.missing(conn, spec) == [], (table, col)
                    assert dbchecks.mode_installed(conn, spec) == "v2"
    finally:
        engine.dispose()
