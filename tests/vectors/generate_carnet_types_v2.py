"""Regenerate carnet_types_v2.json: known-answer vectors of EncryptedBytes and EncryptedJSON.

Run from the repository root: ``python tests/vectors/generate_carnet_types_v2.py``.
Inputs are fixed (keys, key ids, nonces, labels, practices, values). Each
vector records the value as the application holds it (bytes in hex; a JSON
value written with its keys out of order), the exact plaintext the type
seals (a document's bytes; the canonical JSON of docs/format.md), and the
value sealed in format v2 through carnet's private fixed-nonce seam
(``envelope.Sealer._seal_with_nonce``) over ``cryptography``'s AES-256-GCM.
tests/unit/test_types_vectors.py checks the plaintext against the types'
own encoding, the seal byte for byte, and opens each value through the
column type and a ``KeyManager``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from carnet import envelope

# The plaintext each type seals, spelt out here rather than imported: the
# test compares it with what the types produce.
BYTES_CASES: list[tuple[str, bytes, str, str, str, str, bytes]] = [
    (
        "empty document",
        bytes(range(32)),
        "31" * 16,
        "101112131415161718191a1b",
        "letters.scan",
        "cabinet-lyon-3",
        b"",
    ),
    (
        "every byte value, a PDF header and trailer",
        bytes(range(64, 96)),
        "32" * 16,
        "202122232425262728292a2b",
        "letters.scan",
        "cabinet-Évry-ü",
        b"%PDF-1.7\n" + bytes(range(256)) + b"\n%%EOF\n",
    ),
]

JSON_CASES: list[tuple[str, bytes, str, str, str, str, Any]] = [
    (
        "object: keys out of order, nested, unicode, numbers",
        bytes(range(96, 128)),
        "33" * 16,
        "303132333435363738393a3b",
        "consultations.vitals",
        "cabinet-paris-11",
        {
            "tension": {"sys": 128, "dia": 82},
            "allergies": ["pénicilline", "arachide 🥜"],
            "poids_kg": 71.5,
            "fumeur": False,
            "note": None,
            "Zèbre": -3,
        },
    ),
    (
        "array at the top level, empty containers",
        bytes(range(128, 160)),
        "34" * 16,
        "404142434445464748494a4b",
        "consultations.codes",
        "p1",
        [{"b": 1, "a": 2}, [], {}, "Ω", 1e-7],
    ),
]


def canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def seal(
    dek: bytes, key_id_hex: str, nonce_hex: str, label: str, tenant: str, pt: bytes
) -> dict[str, str]:
    key_id = bytes.fromhex(key_id_hex)
    blob = envelope.Sealer(dek, key_id, label, tenant)._seal_with_nonce(
        pt, bytes.fromhex(nonce_hex)
    )
    return {
        "dek": dek.hex(),
        "key_id": key_id_hex,
        "nonce": nonce_hex,
        "label": label,
        "tenant": tenant,
        "plaintext_hex": pt.hex(),
        "aad": envelope.associated_data(key_id, label, tenant, version=2).hex(),
        "blob": blob.hex(),
        "text_form": envelope.to_text(blob),
    }


def main() -> None:
    out: list[dict[str, Any]] = []
    for name, dek, kid, nonce, label, tenant, data in BYTES_CASES:
        v: dict[str, Any] = {"name": name, "type": "EncryptedBytes", "value_hex": data.hex()}
        v.update(seal(dek, kid, nonce, label, tenant, data))
        out.append(v)
    for name, dek, kid, nonce, label, tenant, value in JSON_CASES:
        v = {"name": name, "type": "EncryptedJSON", "value": value}
        v.update(seal(dek, kid, nonce, label, tenant, canonical(value)))
        out.append(v)
    path = Path(__file__).with_name("carnet_types_v2.json")
    doc = {"format": "carnet v2, EncryptedBytes and EncryptedJSON plaintexts", "vectors": out}
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
