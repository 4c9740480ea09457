"""Project Wycheproof AES-GCM vectors against carnet's AEAD primitive layer.

Semantics follow Wycheproof: a ``valid`` case must encrypt to exactly
``ct || tag`` and decrypt back to ``msg``; an ``invalid`` case must be
rejected on decryption; an ``acceptable`` case may be rejected, but if it
decrypts it must yield ``msg``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from carnet import _aead
from support import paths

VECTORS = paths.VECTORS / "wycheproof" / "aes_gcm_test.json"

# carnet only ever uses AES-256 with 96-bit nonces and full 128-bit tags.
KEY_BITS, IV_BITS, TAG_BITS = 256, 96, 128
# Pinned so a loader or filtering bug that drops cases fails instead of passing on fewer.
EXPECTED_CASES = 66


def _load() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
    cases = [
        case
        for group in data["testGroups"]
        if (group["keySize"], group["ivSize"], group["tagSize"]) == (KEY_BITS, IV_BITS, TAG_BITS)
        for case in group["tests"]
    ]
    return data, cases


DATA, CASES = _load()


def test_vector_file_is_whole() -> None:
    assert DATA["algorithm"] == "AES-GCM"
    total = sum(len(group["tests"]) for group in DATA["testGroups"])
    assert total == DATA["numberOfTests"]


def test_selected_case_count() -> None:
    assert len(CASES) == EXPECTED_CASES
    assert len({case["tcId"] for case in CASES}) == EXPECTED_CASES
    results = {case["result"] for case in CASES}
    assert results <= {"valid", "invalid", "acceptable"}
    # Both kinds must be present, or half of the semantics goes untested.
    assert {"valid", "invalid"} <= results


@pytest.mark.parametrize("case", CASES, ids=[f"tc{case['tcId']}" for case in CASES])
def test_wycheproof_case(case: dict[str, Any]) -> None:
    key = bytes.fromhex(case["key"])
    iv = bytes.fromhex(case["iv"])
    aad = bytes.fromhex(case["aad"])
    msg = bytes.fromhex(case["msg"])
    ct = bytes.fromhex(case["ct"])
    tag = bytes.fromhex(case["tag"])
    assert (len(key), len(iv), len(tag)) == (KEY_BITS // 8, IV_BITS // 8, TAG_BITS // 8)

    if case["result"] == "valid":
        assert _aead.encrypt(key, iv, msg, aad) == ct + tag
        assert _aead.decrypt(key, iv, ct + tag, aad) == msg
    elif case["result"] == "invalid":
        with pytest.raises(_aead.AeadError):
            _aead.decrypt(key, iv, ct + tag, aad)
        # Whatever made the case invalid, carnet's own encryption must not produce it.
        assert _aead.encrypt(key, iv, msg, aad) != ct + tag
    else:
        try:
            plaintext = _aead.decrypt(key, iv, ct + tag, aad)
        except _aead.AeadError:
            return
        assert plaintext == msg


def test_decrypt_rejects_input_shorter_than_tag() -> None:
    with pytest.raises(_aead.AeadError):
        _aead.decrypt(bytes(32), bytes(12), bytes(15), b"")
