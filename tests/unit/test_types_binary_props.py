"""Properties of EncryptedBytes and EncryptedJSON, without a database of rows.

- any document up to a few KiB comes back byte for byte, and its pipeline
  form (Latin-1 text) maps back to the same bytes;
- canonical JSON reads back equal, is a fixed point, and does not depend on
  the order in which a dict's keys were inserted;
- any JSON value round-trips through the column type and a KeyManager, and
  equal values seal to the same length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

import carnet
from carnet.errors import InvalidPlaintext
from carnet.types_binary import canonical_json

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)
CONTAINERS = st.lists(JSON_VALUES, max_size=5) | st.dictionaries(st.text(), JSON_VALUES, max_size=6)


def _no_surrogates(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.fixture(scope="module")
def sqlite_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[carnet.KeyManager]:
    d = tmp_path_factory.mktemp("props")
    master = "file://" + str(d / "master.key")
    carnet.create_master_key(master).close()
    keys = carnet.KeyManager(sa.create_engine(f"sqlite:///{d / 'keys.db'}"), master_key=master)
    keys.create_schema()
    yield keys
    keys.close()


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=4096), practice=st.sampled_from(["p1", "cabinet-Évry"]))
def test_documents_round_trip_exactly(
    sqlite_keys: carnet.KeyManager, data: bytes, practice: str
) -> None:
    typ = carnet.EncryptedBytes(label="letters.scan")
    assert typ.plaintext(data).encode("latin-1") == data
    assert typ.plaintext(bytearray(data)) == typ.plaintext(memoryview(data)) == typ.plaintext(data)
    blob = typ.encrypt(data, practice, sqlite_keys)
    assert typ.decrypt(blob, practice, sqlite_keys) == data
    # From the pipeline's form too (what the write guard binds to the practice).
    again = typ.encrypt(typ.plaintext(data), practice, sqlite_keys)
    assert typ.decrypt(again, practice, sqlite_keys) == data and len(again) == len(blob)


@settings(max_examples=300, deadline=None)
@given(value=CONTAINERS)
def test_canonical_json_reads_back_equal_and_is_a_fixed_point(value: Any) -> None:
    text = canonical_json(value)
    assert json.loads(text) == value
    assert canonical_json(json.loads(text)) == text
    if isinstance(value, dict):
        # Insertion order does not matter.
        assert canonical_json(dict(reversed(list(value.items())))) == text


@settings(max_examples=150, deadline=None)
@given(value=CONTAINERS)
def test_json_round_trips_through_the_type(sqlite_keys: carnet.KeyManager, value: Any) -> None:
    typ = carnet.EncryptedJSON(label="consultations.vitals")
    if not _no_surrogates(value):
        with pytest.raises(InvalidPlaintext):
            typ.encrypt(value, "p1", sqlite_keys)
        return
    blob = typ.encrypt(value, "p1", sqlite_keys)
    assert typ.decrypt(blob, "p1", sqlite_keys) == value
    reordered = dict(reversed(list(value.items()))) if isinstance(value, dict) else value
    assert len(typ.encrypt(reordered, "p1", sqlite_keys)) == len(blob)


@pytest.mark.parametrize(
    "bad",
    [
        (1, 2),
        {1: "a"},
        {"a": float("nan")},
        {"a": float("inf")},
        {"a": {1, 2}},
        {"a": b"x"},
        "text",
        42,
        None,
    ],
)
def test_what_json_cannot_hold_exactly_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidPlaintext):
        canonical_json(bad)
