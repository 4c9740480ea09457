"""Regenerate blind_index_v1.json, the known-answer vectors of blind indexes v1.

Run from the repository root: ``python tests/vectors/generate_blind_index_v1.py``.
Inputs are fixed (root key, label, index name, tenant, transform, raw value,
bits); outputs are the HKDF info, the derived index key, the full HMAC and the
truncated index value, computed with ``cryptography`` through
``carnet.indexkeys``. ``tests/unit/test_searchable_keys.py`` checks them through
carnet and again with a from-scratch HKDF/HMAC (Python's ``hmac`` module)
following docs/format.md, so a change made to code and generator together
still fails.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac

from carnet import indexkeys, transforms

CASES = [
    (
        "phone, 16 bits",
        bytes(range(32)),
        "patients.phone_bidx",
        "phone_fr",
        "cabinet-lyon-3",
        "phone_fr",
        ["06 12 34 56 78"],
        16,
    ),
    (
        "same phone, other practice",
        bytes(range(32)),
        "patients.phone_bidx",
        "phone_fr",
        "cabinet-lyon-4",
        "phone_fr",
        ["+33 6 12 34 56 78"],
        16,
    ),
    (
        "same phone, other index",
        bytes(range(32)),
        "patients.phone_last4",
        "last4",
        "cabinet-lyon-3",
        "last4",
        ["0612345678"],
        8,
    ),
    (
        "folded name, 63 bits",
        bytes.fromhex("ff" * 32),
        "patients.last_name_bidx",
        "folded",
        "p1",
        "folded",
        ["  Hélène   DUPONT "],
        63,
    ),
    (
        "one bit",
        bytes.fromhex("ff" * 32),
        "patients.last_name_bidx",
        "folded",
        "p1",
        "folded",
        ["Martin"],
        1,
    ),
    (
        "birth date",
        bytes(range(100, 132)),
        "patients.birth_date_bidx",
        "date_iso",
        "p2",
        "date_iso",
        ["1984-02-29"],
        12,
    ),
    (
        "compound initial + last name",
        bytes(range(100, 132)),
        "patients.name_bidx",
        "initial_lastname",
        "cabinet-paris-12",
        "initial_lastname",
        ["Élodie", "Le Gall"],
        20,
    ),
    (
        "exact, non-ASCII tenant and label",
        bytes(range(7, 39)),
        "dossiers.numéro_bidx",
        "exact",
        "cabinet-été",
        "exact",
        ["A-12 345"],
        32,
    ),
    (
        "empty normalised value",
        bytes(range(7, 39)),
        "dossiers.code_bidx",
        "exact",
        "p1",
        "exact",
        [""],
        24,
    ),
]


def main() -> None:
    out = []
    for name, root, label, index, tenant, transform, raw, bits in CASES:
        normalised = getattr(transforms, transform)(*raw)
        key = indexkeys.derive_key(root, label, index, tenant)
        h = hmac.HMAC(key, hashes.SHA256())
        h.update(normalised.encode("utf-8"))
        out.append(
            {
                "name": name,
                "root_key": root.hex(),
                "label": label,
                "index": index,
                "tenant": tenant,
                "transform": transform,
                "input": raw,
                "normalised": normalised,
                "bits": bits,
                "info": indexkeys.info(label, index, tenant).hex(),
                "index_key": key.hex(),
                "hmac": h.finalize().hex(),
                "value": indexkeys.value_with_key(key, normalised, bits),
            }
        )
    path = Path(__file__).with_name("blind_index_v1.json")
    doc = {
        "description": "carnet blind index v1: HKDF-SHA256 index keys, truncated HMAC-SHA256",
        "vectors": out,
    }
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
