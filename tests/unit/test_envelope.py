"""Ciphertext format v1: known-answer vectors, hand parsing, and byte flips in every field.

Both directions run through the objects the product uses: the envelope's
Sealer (with its fixed-nonce seam) for sealing, KeyManager.decrypt (its
Opener) for opening, with the vectors' data keys stored in a real key table.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import carnet
from carnet import envelope
from carnet.errors import InvalidCiphertext
from carnet.keystore import utcnow, wrap_context
from support import paths

VECTORS = json.loads((paths.VECTORS / "carnet_v1.json").read_text())["vectors"]


def _vector_id(v: dict[str, str]) -> str:
    return v["name"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[carnet.KeyManager]:
    """A KeyManager whose key table holds every vector's data key under its key id."""
    d = tmp_path_factory.mktemp("vectors")
    master = "file://" + str(d / "master.key")
    carnet.create_master_key(master).close()
    keys = carnet.KeyManager(sa.create_engine(f"sqlite:///{d / 'keys.db'}"), master_key=master)
    keys.create_schema()
    versions: dict[str, int] = {}
    seen: set[str] = set()
    now = utcnow()
    with keys.engine.begin() as conn:
        for v in [*VECTORS, _SAMPLE]:
            if v["key_id"] in seen:
                continue
            seen.add(v["key_id"])
            key_id = bytes.fromhex(v["key_id"])
            versions[v["tenant"]] = versions.get(v["tenant"], 0) + 1
            # Inactive keys still open what they sealed: several per practice.
            conn.execute(
                keys.table.insert().values(
                    key_id=v["key_id"],
                    tenant=v["tenant"],
                    version=versions[v["tenant"]],
                    state="inactive",
                    active_tenant=None,
                    master_key_uri=keys.master_key.uri,
                    wrapped_key=keys.master_key.wrap(
                        bytes.fromhex(v["dek"]), wrap_context(v["tenant"], key_id)
                    ),
                    created_at=now,
                    updated_at=now,
                )
            )
    yield keys
    keys.close()


@pytest.mark.parametrize("v", VECTORS, ids=_vector_id)
def test_known_answer_through_carnet(v: dict[str, str], keys: carnet.KeyManager) -> None:
    key_id = bytes.fromhex(v["key_id"])
    aad = envelope.associated_data(key_id, v["label"], v["tenant"])
    assert aad.hex() == v["aad"]
    sealer = envelope.Sealer(bytes.fromhex(v["dek"]), key_id, v["label"], v["tenant"])
    blob = sealer._seal_with_nonce(v["plaintext"].encode(), bytes.fromhex(v["nonce"]))
    assert blob.hex() == v["blob"]
    assert envelope.to_text(blob) == v["text_form"]
    assert envelope.from_text(v["text_form"]) == blob
    rec = keys.get_key(key_id)
    assert rec is not None
    if rec.tenant == v["tenant"]:
        opened = keys.decrypt(blob, tenant=v["tenant"], label=v["label"])
    else:
        # A vector that reuses another practice's key id (to pin the AAD's
        # practice): a key table holds one practice per key, so open it with
        # the Opener the manager would build.
        opened = envelope.Opener(bytes.fromhex(v["dek"]), key_id, v["label"], v["tenant"]).open(
            blob
        )
    assert opened.decode() == v["plaintext"]


@pytest.mark.parametrize("v", VECTORS, ids=_vector_id)
def test_known_answer_parsed_by_hand(v: dict[str, str]) -> None:
    # Independent of carnet.envelope: the layout of docs/format.md, byte by byte.
    blob = bytes.fromhex(v["blob"])
    assert blob[0] == 0x01
    key_id, nonce, body = blob[1:17], blob[17:29], blob[29:]
    assert key_id.hex() == v["key_id"] and nonce.hex() == v["nonce"]
    assert len(body) == len(v["plaintext"].encode()) + 16
    label, tenant = v["label"].encode(), v["tenant"].encode()
    aad = (
        b"\x01"
        + key_id
        + struct.pack(">I", len(label))
        + label
        + struct.pack(">I", len(tenant))
        + tenant
    )
    assert AESGCM(bytes.fromhex(v["dek"])).decrypt(nonce, body, aad).decode() == v["plaintext"]
    assert v["text_form"].startswith("carnet:")


_SAMPLE = {"key_id": bytes(range(16)).hex(), "dek": bytes(range(32)).hex(), "tenant": "p1"}


def _sample() -> tuple[bytes, bytes]:
    key_id = bytes(range(16))
    sealer = envelope.Sealer(bytes(range(32)), key_id, "notes.body", "p1")
    return key_id, sealer.seal("Dépression sévère".encode())


def test_every_single_bit_flip_is_rejected(keys: carnet.KeyManager) -> None:
    _key_id, blob = _sample()
    assert keys.decrypt(blob, tenant="p1", label="notes.body") == "Dépression sévère".encode()
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            # A flipped version byte fails the framing, a flipped key id names
            # another (unknown) key, every other flip fails authentication.
            with pytest.raises(carnet.errors.CarnetError):
                keys.decrypt(bytes(bad), tenant="p1", label="notes.body")


def test_flipped_key_id_changes_the_associated_data() -> None:
    key_id, blob = _sample()
    bad = bytearray(blob)
    bad[5] ^= 1
    # Even with the original key, the header is authenticated through the AAD rebuilt from it.
    opener = envelope.Opener(bytes(range(32)), bytes(bad[1:17]), "notes.body", "p1")
    with pytest.raises(InvalidCiphertext):
        opener.open(bytes(bad))


@pytest.mark.parametrize(
    "label,tenant", [("notes.other", "p1"), ("notes.body", "p2"), ("notes.body", "P1")]
)
def test_other_label_or_tenant_fails(label: str, tenant: str) -> None:
    key_id, blob = _sample()
    with pytest.raises(InvalidCiphertext):
        envelope.Opener(bytes(range(32)), key_id, label, tenant).open(blob)


def test_label_tenant_boundary_is_unambiguous() -> None:
    # Length prefixes: ("ab", "c") and ("a", "bc") must not share associated data.
    k = bytes(16)
    assert envelope.associated_data(k, "ab", "c") != envelope.associated_data(k, "a", "bc")


@pytest.mark.parametrize("n", [0, 1, 28, 29, 44])
def test_truncated_values_are_rejected(n: int) -> None:
    _, blob = _sample()
    with pytest.raises(InvalidCiphertext):
        envelope.key_id_of(blob[:n])


def test_unknown_version_is_rejected() -> None:
    _, blob = _sample()
    with pytest.raises(InvalidCiphertext, match="version 2"):
        envelope.key_id_of(b"\x02" + blob[1:])


@pytest.mark.parametrize("text", ["", "hello", "carnet:", "carnet:!!notbase64!!", "carnet:AQID\n"])
def test_bad_text_forms(text: str) -> None:
    with pytest.raises(InvalidCiphertext):
        blob = envelope.from_text(text)
        envelope.key_id_of(blob)


def test_nonces_are_fresh() -> None:
    sealer = envelope.Sealer(bytes(range(32)), bytes(range(16)), "notes.body", "p1")
    nonces = {sealer.seal(b"x")[17:29] for _ in range(2000)}
    assert len(nonces) == 2000


def test_the_product_seals_through_the_envelope_sealer(keys: carnet.KeyManager) -> None:
    # The sealer the manager caches is the envelope's: vectors test what runs.
    keys.encrypt(b"x", tenant="sealer-check", label="notes.body")
    assert all(type(s) is envelope.Sealer for s in keys.cache.sealers.values())
