"""Regenerate carnet_v2.json, the known-answer vectors of ciphertext format v2.

Run from the repository root: ``python tests/vectors/generate_carnet_v2.py``.
Inputs are fixed (keys, key ids, nonces, labels, practices, plaintexts); the
outputs come from ``cryptography``'s AES-256-GCM through carnet's private
fixed-nonce seam (``envelope.Sealer._seal_with_nonce``). The tests check them
three ways: through the seam, opened through ``KeyManager.decrypt``, and by
re-parsing each value (binary and text form) by hand with the layout written
in docs/format.md.

Every key id belongs to one practice, as in a key table, so that every vector
opens through a ``KeyManager``.
"""

from __future__ import annotations

import json
from pathlib import Path

from carnet import envelope

CASES = [
    (
        "empty note",
        bytes(range(32)),
        "20112233445566778899aabbccddeeff",
        "000102030405060708090a0b",
        "notes.body",
        "cabinet-lyon-3",
        "",
    ),
    (
        "ascii note, two-byte practice",
        bytes.fromhex("ff" * 32),
        "2f" * 16,
        "ffffffffffffffffffffffff",
        "notes.body",
        "p1",
        "Patient seen for follow-up.",
    ),
    (
        "french note with accents",
        bytes(range(100, 132)),
        "b1" * 16,
        "cafebabefacedbaddecaf888",
        "consultations.comment",
        "cabinet-paris-11",
        "Patiente anxieuse, suivi dépression ; évoque des violences conjugales.",
    ),
    (
        "non-BMP characters and a unicode practice",
        bytes(range(200, 232)),
        "6a" * 16,
        "0102030405060708090a0b0c",
        "notes.body",
        "cabinet-Évry-ü",
        "Note 🩺 with emoji",
    ),
    (
        "custom label",
        bytes.fromhex("ff" * 32),
        "2f" * 16,
        "0c0b0a090807060504030201",
        "legacy-comment-v1",
        "p1",
        "renamed column keeps its label",
    ),
    (
        "longest practice id: 255 characters, 510 UTF-8 bytes",
        bytes(range(50, 82)),
        "7e" * 16,
        "a0a1a2a3a4a5a6a7a8a9aaab",
        "notes.body",
        "é" * 255,
        "length field 0x01fe",
    ),
]


def main() -> None:
    out = []
    for name, dek, key_id_hex, nonce_hex, label, tenant, text in CASES:
        key_id = bytes.fromhex(key_id_hex)
        nonce = bytes.fromhex(nonce_hex)
        aad = envelope.associated_data(key_id, label, tenant, version=2)
        blob = envelope.Sealer(dek, key_id, label, tenant)._seal_with_nonce(
            text.encode("utf-8"), nonce
        )
        out.append(
            {
                "name": name,
                "dek": dek.hex(),
                "key_id": key_id_hex,
                "nonce": nonce_hex,
                "label": label,
                "tenant": tenant,
                "plaintext": text,
                "aad": aad.hex(),
                "blob": blob.hex(),
                "text_form": envelope.to_text(blob),
            }
        )
    path = Path(__file__).with_name("carnet_v2.json")
    path.write_text(
        json.dumps({"format": "carnet v2", "vectors": out}, indent=2, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
