"""Regenerate carnet_v1.json, the known-answer vectors of ciphertext format v1.

Run from the repository root: ``python tests/vectors/generate_carnet_v1.py``.
Inputs are fixed (keys, key ids, nonces, labels, tenants, plaintexts); the
outputs come from ``cryptography``'s AES-256-GCM. carnet reads v1 but no
longer writes it, so the value is framed here by hand (version 1, key id,
nonce, ciphertext and tag) around carnet's v1 associated data; the output is
byte for byte the file carnet's v1 sealer made. The tests check them two
ways: opened through carnet, and re-parsed by hand with the layout written
in docs/format.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from carnet import envelope

CASES = [
    (
        "empty note",
        bytes(range(32)),
        "00112233445566778899aabbccddeeff",
        "000102030405060708090a0b",
        "notes.body",
        "cabinet-lyon-3",
        "",
    ),
    (
        "ascii note",
        bytes.fromhex("ff" * 32),
        "0f" * 16,
        "ffffffffffffffffffffffff",
        "notes.body",
        "p1",
        "Patient seen for follow-up.",
    ),
    (
        "french note with accents",
        bytes(range(100, 132)),
        "a1" * 16,
        "cafebabefacedbaddecaf888",
        "consultations.comment",
        "cabinet-paris-11",
        "Patiente anxieuse, suivi dépression ; évoque des violences conjugales.",
    ),
    (
        "non-BMP characters and a unicode tenant",
        bytes(range(200, 232)),
        "5a" * 16,
        "0102030405060708090a0b0c",
        "notes.body",
        "cabinet-Évry-ü",
        "Note 🩺 with emoji",
    ),
    (
        "custom label",
        bytes(range(32)),
        "00112233445566778899aabbccddeeff",
        "0c0b0a090807060504030201",
        "legacy-comment-v1",
        "p1",
        "renamed column keeps its label",
    ),
]


def main() -> None:
    out = []
    for name, dek, key_id_hex, nonce_hex, label, tenant, text in CASES:
        key_id = bytes.fromhex(key_id_hex)
        nonce = bytes.fromhex(nonce_hex)
        aad = envelope.associated_data(key_id, label, tenant, version=1)
        blob = b"\x01" + key_id + nonce + AESGCM(dek).encrypt(nonce, text.encode("utf-8"), aad)
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
    path = Path(__file__).with_name("carnet_v1.json")
    path.write_text(
        json.dumps({"format": "carnet v1", "vectors": out}, indent=2, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
