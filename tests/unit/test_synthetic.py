"""The synthetic note generator: deterministic, plausible, and free of real contact data."""

from __future__ import annotations

import re

import pytest

from carnet import _synthetic


def test_same_seed_same_data() -> None:
    a = _synthetic.generate(7, practices=3, patients=50)
    b = _synthetic.generate(7, practices=3, patients=50)
    assert a == b
    assert _synthetic.generate(8, practices=3, patients=50) != a


def test_counts_and_links() -> None:
    data = _synthetic.generate(1, practices=4, patients=200, notes_per_patient=(2, 3))
    assert len(data.practices) == 4
    assert len(data.patients) == 200
    assert 400 <= len(data.notes) <= 600
    practice_ids = {p.id for p in data.practices}
    by_id = {p.id: p for p in data.patients}
    for note in data.notes:
        assert note.practice_id in practice_ids
        assert by_id[note.patient_id].practice_id == note.practice_id
        assert note.topic in _synthetic.TOPICS


def test_notes_are_french_clinical_text_of_useful_length() -> None:
    data = _synthetic.generate(3, practices=5, patients=500)
    lengths = sorted(len(n.text.encode("utf-8")) for n in data.notes)
    assert 200 <= lengths[len(lengths) // 2] <= 900
    assert {n.topic for n in data.notes} == set(_synthetic.TOPICS)
    joined = " ".join(n.text for n in data.notes[:200])
    assert "é" in joined and "mg" in joined
    # Each note carries its own figures: verbatim duplicates would weaken the demo's scan.
    assert len({n.text for n in data.notes}) == len(data.notes)


def test_phone_numbers_are_in_the_ranges_reserved_for_fiction() -> None:
    data = _synthetic.generate(5, patients=300)
    pattern = re.compile(r"^(06 39 98|01 99 00) \d\d \d\d$")
    assert all(pattern.match(p.phone) for p in data.patients)


def test_generate_notes_round_robin() -> None:
    notes = _synthetic.generate_notes(100, seed=2, tenants=20)
    assert len(notes) == 100
    assert [n.practice_id for n in notes[:3]] == ["cab-001", "cab-002", "cab-003"]
    per_tenant: dict[str, int] = {}
    for n in notes:
        per_tenant[n.practice_id] = per_tenant.get(n.practice_id, 0) + 1
    assert len(per_tenant) == 20 and set(per_tenant.values()) == {5}
    assert notes == _synthetic.generate_notes(100, seed=2, tenants=20)


def test_repr_shows_no_text_or_identity() -> None:
    data = _synthetic.generate(9, practices=1, patients=1, notes_per_patient=(1, 1))
    patient, note = data.patients[0], data.notes[0]
    assert patient.last_name not in repr(patient) and patient.phone not in repr(patient)
    assert note.text[:20] not in repr(note)


@pytest.mark.parametrize(
    "kwargs", [{"practices": 0}, {"patients": -1}, {"notes_per_patient": (3, 1)}]
)
def test_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        _synthetic.generate(0, **kwargs)  # type: ignore[arg-type]
