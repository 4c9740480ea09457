"""Storage of format v2 against v1, measured on sealed values (docs/format.md).

    PYTHONPATH=src python bench/format_storage.py

Seals a 600-byte note and an ``EncryptedDate`` (10 bytes) for practice ids of
8 and 20 UTF-8 bytes through carnet's Sealer (v2), frames the same notes as
v1 by hand (carnet no longer writes v1), and prints the lengths of both
forms, binary (bytes) and text (characters), and what v2 adds. Not a
``bench_*`` module: ``python -m bench`` does not run it.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from carnet import envelope

NOTES = {"600-byte note": b"n" * 600, "EncryptedDate": b"2026-12-06"}
PRACTICES = ["cab-0001", "cabinet-lyon-3-12345"]  # 8 and 20 UTF-8 bytes


def v1_value(dek: bytes, key_id: bytes, label: str, tenant: str, note: bytes) -> bytes:
    nonce = os.urandom(12)
    aad = envelope.associated_data(key_id, label, tenant, version=1)
    return b"\x01" + key_id + nonce + AESGCM(dek).encrypt(nonce, note, aad)


def rows() -> list[tuple[str, int, int, int, int, int]]:
    """(note, practice bytes, v1 binary, v2 binary, v1 text, v2 text) for each case."""
    dek, key_id = os.urandom(32), os.urandom(16)
    out = []
    for name, note in NOTES.items():
        for practice in PRACTICES:
            v2 = envelope.Sealer(dek, key_id, "notes.body", practice).seal(note)
            v1 = v1_value(dek, key_id, "notes.body", practice, note)
            p = len(practice.encode())
            assert len(v2) == envelope.width(len(note), p)
            assert len(envelope.to_text(v2)) == envelope.width(len(note), p, text=True)
            assert envelope.to_text(v1) == "carnet:" + base64.b64encode(v1).decode()
            out.append(
                (name, p, len(v1), len(v2), len(envelope.to_text(v1)), len(envelope.to_text(v2)))
            )
    return out


def main() -> None:
    print("| value | practice id | v1 binary | v2 binary | added | v1 text | v2 text | added |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, p, b1, b2, t1, t2 in rows():
        print(
            f"| {name} | {p} bytes | {b1} B | {b2} B | +{b2 - b1} B ({100 * (b2 - b1) / b1:.1f} %)"
            f" | {t1} ch | {t2} ch | +{t2 - t1} ch ({100 * (t2 - t1) / t1:.1f} %) |"
        )


if __name__ == "__main__":
    main()
