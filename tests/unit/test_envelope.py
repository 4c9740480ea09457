"""Ciphertext formats: v2 (written) and v1 (read only). Known-answer vectors,
hand parsing, and byte flips in every field.

Both directions run through the objects the product uses: the envelope's
Sealer (with its fixed-nonce seam) for sealing, KeyManager.decrypt (its
Opener) for opening, with the vectors' data keys stored in a real key table.
carnet no longer writes v1: its vectors are only opened, and split by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import carnet
from carnet import envelope
from carnet.errors import CarnetError, InvalidCiphertext, TenantMismatch, UnknownKey
from carnet.keystore import utcnow, wrap_context
from support import paths

V1_VECTORS = json.loads((paths.VECTORS / "carnet_v1.json").read_text())["vectors"]
V2_VECTORS = json.loads((paths.VECTORS / "carnet_v2.json").read_text())["vectors"]


def _vector_id(v: dict[str, str]) -> str:
    return v["name"]


def _aad(version: int, key_id: bytes, label: str, tenant: str) -> bytes:
    # docs/format.md, "Associated data", written out independently of carnet.envelope.
    lb, tb = label.encode(), tenant.encode()
    return (
        bytes([version])
        + key_id
        + struct.pack(">I", len(lb))
        + lb
        + struct.pack(">I", len(tb))
        + tb
    )


@pytest.fixture(scope="module")
def vector_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[carnet.KeyManager]:
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
        for v in [*V1_VECTORS, *V2_VECTORS, _SAMPLE]:
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


# -- v2: the format carnet writes ---------------------------------------------------------


@pytest.mark.parametrize("v", V2_VECTORS, ids=_vector_id)
def test_v2_known_answer_through_carnet(v: dict[str, str], vector_keys: carnet.KeyManager) -> None:
    key_id = bytes.fromhex(v["key_id"])
    aad = envelope.associated_data(key_id, v["label"], v["tenant"])
    assert aad.hex() == v["aad"]
    sealer = envelope.Sealer(bytes.fromhex(v["dek"]), key_id, v["label"], v["tenant"])
    blob = sealer._seal_with_nonce(v["plaintext"].encode(), bytes.fromhex(v["nonce"]))
    assert blob.hex() == v["blob"]
    assert envelope.to_text(blob) == v["text_form"]
    assert envelope.from_text(v["text_form"]) == blob
    assert envelope.version_of(blob) == 2 and envelope.is_current(blob)
    assert envelope.key_id_of(blob) == key_id
    assert envelope.tenant_of(blob) == v["tenant"]
    assert envelope.text_key_id(v["text_form"]) == key_id
    assert len(blob) == envelope.overhead(v["tenant"]) + len(v["plaintext"].encode())
    assert len(v["text_form"]) == envelope.text_length(v["tenant"], len(v["plaintext"].encode()))
    rec = vector_keys.get_key(key_id)
    assert rec is not None and rec.tenant == v["tenant"]
    opened = vector_keys.decrypt(blob, tenant=v["tenant"], label=v["label"])
    assert opened.decode() == v["plaintext"]


@pytest.mark.parametrize("v", V2_VECTORS, ids=_vector_id)
def test_v2_known_answer_parsed_by_hand(v: dict[str, str]) -> None:
    # Independent of carnet.envelope: the layout of docs/format.md, byte by byte.
    blob = bytes.fromhex(v["blob"])
    tenant = v["tenant"].encode()
    assert blob[0] == 0x02
    key_id = blob[1:17]
    # The label tag: the first 4 bytes of SHA-256 of the UTF-8 label.
    assert blob[17:21] == hashlib.sha256(v["label"].encode()).digest()[:4]
    (n,) = struct.unpack(">H", blob[21:23])
    assert n == len(tenant) and blob[23 : 23 + n] == tenant
    nonce, body = blob[23 + n : 35 + n], blob[35 + n :]
    assert key_id.hex() == v["key_id"] and nonce.hex() == v["nonce"]
    assert len(body) == len(v["plaintext"].encode()) + 16
    aad = _aad(2, key_id, v["label"], v["tenant"])
    assert aad.hex() == v["aad"]
    assert AESGCM(bytes.fromhex(v["dek"])).decrypt(nonce, body, aad).decode() == v["plaintext"]
    # The text form: six ':'-separated parts, lowercase hex, standard padded base64.
    prefix, version, kid_hex, tag_hex, tenant_hex, b64 = v["text_form"].split(":")
    assert (prefix, version) == ("carnet", "2")
    assert kid_hex == key_id.hex() and tenant_hex == tenant.hex()
    assert tag_hex == blob[17:21].hex()
    assert kid_hex == kid_hex.lower() and tenant_hex == tenant_hex.lower()
    assert base64.b64decode(b64, validate=True) == nonce + body


def test_v2_vectors_cover_the_documented_cases() -> None:
    tenants = [v["tenant"] for v in V2_VECTORS]
    assert any(not t.isascii() for t in tenants)  # a unicode practice
    assert any(len(t.encode()) > 255 for t in tenants)  # both bytes of the length field
    assert any(v["plaintext"] == "" for v in V2_VECTORS)
    assert len({v["label"] for v in V2_VECTORS}) > 1


# -- v1: read only ------------------------------------------------------------------------


@pytest.mark.parametrize("v", V1_VECTORS, ids=_vector_id)
def test_v1_known_answer_opens_through_carnet(
    v: dict[str, str], vector_keys: carnet.KeyManager
) -> None:
    key_id = bytes.fromhex(v["key_id"])
    blob = bytes.fromhex(v["blob"])
    assert envelope.associated_data(key_id, v["label"], v["tenant"], version=1).hex() == v["aad"]
    assert envelope.from_text(v["text_form"]) == blob
    assert envelope.to_text(blob) == v["text_form"]  # a v1 value keeps its v1 text form
    assert envelope.version_of(blob) == 1 and not envelope.is_current(blob)
    assert envelope.key_id_of(blob) == key_id
    assert envelope.tenant_of(blob) is None  # v1 names no practice
    assert envelope.text_key_id(v["text_form"]) == key_id
    rec = vector_keys.get_key(key_id)
    assert rec is not None
    if rec.tenant == v["tenant"]:
        opened = vector_keys.decrypt(blob, tenant=v["tenant"], label=v["label"])
    else:
        # A vector that reuses another practice's key id (to pin the AAD's
        # practice): a key table holds one practice per key, so open it with
        # the Opener the manager would build.
        opened = envelope.Opener(bytes.fromhex(v["dek"]), key_id, v["label"], v["tenant"]).open(
            blob
        )
    assert opened.decode() == v["plaintext"]


@pytest.mark.parametrize("v", V1_VECTORS, ids=_vector_id)
def test_v1_known_answer_parsed_by_hand(v: dict[str, str]) -> None:
    blob = bytes.fromhex(v["blob"])
    assert blob[0] == 0x01
    key_id, nonce, body = blob[1:17], blob[17:29], blob[29:]
    assert key_id.hex() == v["key_id"] and nonce.hex() == v["nonce"]
    assert len(body) == len(v["plaintext"].encode()) + 16
    aad = _aad(1, key_id, v["label"], v["tenant"])
    assert AESGCM(bytes.fromhex(v["dek"])).decrypt(nonce, body, aad).decode() == v["plaintext"]
    assert v["text_form"] == "carnet:" + base64.b64encode(blob).decode()


def test_the_seam_no_longer_writes_v1() -> None:
    v = V1_VECTORS[1]
    sealer = envelope.Sealer(bytes.fromhex(v["dek"]), bytes.fromhex(v["key_id"]), "l", "p1")
    assert sealer._seal_with_nonce(b"x", bytes.fromhex(v["nonce"]))[0] == 2


def test_v1_and_v2_of_one_note_do_not_open_as_each_other() -> None:
    # The version byte is in the associated data: a v1 body reframed as v2 fails.
    v = V1_VECTORS[1]
    blob = bytes.fromhex(v["blob"])
    tag = hashlib.sha256(v["label"].encode()).digest()[:4]
    reframed = b"\x02" + blob[1:17] + tag + struct.pack(">H", 2) + b"p1" + blob[17:]
    opener = envelope.Opener(bytes.fromhex(v["dek"]), blob[1:17], v["label"], "p1")
    assert opener.open(blob).decode() == v["plaintext"]
    with pytest.raises(InvalidCiphertext):
        opener.open(reframed)


# -- tampering ----------------------------------------------------------------------------

_SAMPLE = {"key_id": bytes(range(16)).hex(), "dek": bytes(range(32)).hex(), "tenant": "p1"}
_NOTE = "Dépression sévère".encode()


def _sample(tenant: str = "p1") -> tuple[bytes, bytes]:
    key_id = bytes(range(16))
    sealer = envelope.Sealer(bytes(range(32)), key_id, "notes.body", tenant)
    return key_id, sealer.seal(_NOTE)


# Each field of a v2 value of practice "p1" (two bytes), as (start, end).
_P = len(b"p1")
V2_FIELDS = {
    "version": (0, 1),
    "key id": (1, 17),
    "label tag": (17, 21),
    "length": (21, 23),
    "practice": (23, 23 + _P),
    "nonce": (23 + _P, 35 + _P),
    "ciphertext": (35 + _P, 35 + _P + len(_NOTE)),
    "tag": (35 + _P + len(_NOTE), 51 + _P + len(_NOTE)),
}


def test_v2_fields_tile_the_value() -> None:
    _, blob = _sample()
    assert blob[0] == 2 and len(blob) == envelope.overhead("p1") + len(_NOTE)
    assert max(end for _, end in V2_FIELDS.values()) == len(blob)
    assert sum(end - start for start, end in V2_FIELDS.values()) == len(blob)


# The error each field's flips raise through KeyManager.decrypt. Another
# version byte: unknown (or v1, whose tag fails); another key id: not in the
# key table; another length or practice: the value names another practice (or
# none that decodes); the rest fails the tag.
_EXPECTED: dict[str, tuple[type[CarnetError], ...]] = {
    "version": (InvalidCiphertext,),
    "key id": (UnknownKey,),
    "label tag": (InvalidCiphertext,),
    "length": (InvalidCiphertext, TenantMismatch),
    "practice": (InvalidCiphertext, TenantMismatch),
    "nonce": (InvalidCiphertext,),
    "ciphertext": (InvalidCiphertext,),
    "tag": (InvalidCiphertext,),
}


@pytest.mark.parametrize("name", list(V2_FIELDS))
def test_every_bit_flip_in_each_v2_field_is_rejected(
    name: str, vector_keys: carnet.KeyManager
) -> None:
    _key_id, blob = _sample()
    assert vector_keys.decrypt(blob, tenant="p1", label="notes.body") == _NOTE
    start, end = V2_FIELDS[name]
    for i in range(start, end):
        for bit in range(8):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(_EXPECTED[name]):
                vector_keys.decrypt(bytes(bad), tenant="p1", label="notes.body")


def test_v2_version_byte_set_to_v1_fails_the_tag(vector_keys: carnet.KeyManager) -> None:
    _, blob = _sample()
    with pytest.raises(InvalidCiphertext):
        vector_keys.decrypt(b"\x01" + blob[1:], tenant="p1", label="notes.body")


def test_every_single_bit_flip_of_a_v1_value_is_rejected(vector_keys: carnet.KeyManager) -> None:
    v = next(v for v in V1_VECTORS if v["tenant"] == "p1" and v["label"] == "notes.body")
    blob = bytes.fromhex(v["blob"])
    assert vector_keys.decrypt(blob, tenant="p1", label="notes.body").decode() == v["plaintext"]
    for i in range(len(blob)):
        for bit in (0x01, 0x80):
            bad = bytearray(blob)
            bad[i] ^= bit
            with pytest.raises(CarnetError):
                vector_keys.decrypt(bytes(bad), tenant="p1", label="notes.body")


def test_a_v2_value_naming_another_practice_raises_tenant_mismatch(
    vector_keys: carnet.KeyManager,
) -> None:
    # Sealed for p2 under p1's key: opened as p1, its header names p2.
    key_id = bytes(range(16))
    blob = envelope.Sealer(bytes(range(32)), key_id, "notes.body", "p2").seal(b"x")
    assert envelope.tenant_of(blob) == "p2"
    with pytest.raises(TenantMismatch):
        vector_keys.decrypt(blob, tenant="p1", label="notes.body")
    with pytest.raises(TenantMismatch):
        envelope.Opener(bytes(range(32)), key_id, "notes.body", "p1").open(blob)


def test_a_forged_header_practice_fails_the_tag() -> None:
    # Rewrite the header to name p2 and open as p2 with the right key: what the
    # database checks (the header) agrees with the row, but the AAD does not.
    key_id, blob = _sample("p1")
    forged = blob[:21] + envelope.practice_field("p2") + blob[23 + _P :]
    assert envelope.tenant_of(forged) == "p2"
    with pytest.raises(InvalidCiphertext):
        envelope.Opener(bytes(range(32)), key_id, "notes.body", "p2").open(forged)


def test_a_value_of_another_field_raises_invalid_ciphertext_before_opening() -> None:
    # Same practice, another label: the header's label tag says so, and a
    # forged tag still fails the AAD, which holds the label in full.
    key_id, blob = _sample("p1")
    other = envelope.Opener(bytes(range(32)), key_id, "notes.summary", "p1")
    with pytest.raises(InvalidCiphertext, match="another field"):
        other.open(blob)
    retagged = blob[:17] + envelope.label_tag("notes.summary") + blob[21:]
    with pytest.raises(InvalidCiphertext, match="does not authenticate"):
        other.open(retagged)


def test_flipped_key_id_changes_the_associated_data() -> None:
    key_id, blob = _sample()
    bad = bytearray(blob)
    bad[5] ^= 1
    # Even with the original key, the header is authenticated through the AAD rebuilt from it.
    opener = envelope.Opener(bytes(range(32)), bytes(bad[1:17]), "notes.body", "p1")
    with pytest.raises(InvalidCiphertext):
        opener.open(bytes(bad))


@pytest.mark.parametrize("label,tenant", [("notes.other", "p1"), ("notes.body", "P1")])
def test_other_label_or_tenant_fails(label: str, tenant: str) -> None:
    key_id, blob = _sample()
    with pytest.raises((InvalidCiphertext, TenantMismatch)):
        envelope.Opener(bytes(range(32)), key_id, label, tenant).open(blob)


def test_label_tenant_boundary_is_unambiguous() -> None:
    # Length prefixes: ("ab", "c") and ("a", "bc") must not share associated data.
    k = bytes(16)
    assert envelope.associated_data(k, "ab", "c") != envelope.associated_data(k, "a", "bc")


_V2_LEN = envelope.overhead("p1") + len(_NOTE)


@pytest.mark.parametrize("n", [0, 1, 16, 17, 18, 19, 20, 21, 32, 20 + 28, _V2_LEN - len(_NOTE) - 1])
def test_truncated_v2_values_are_rejected(n: int, vector_keys: carnet.KeyManager) -> None:
    _, blob = _sample()
    with pytest.raises(InvalidCiphertext):
        envelope.key_id_of(blob[:n])
    with pytest.raises(InvalidCiphertext):
        vector_keys.decrypt(
            blob[:n] if n > 17 else blob[:n] + bytes(17 - n), tenant="p1", label="l"
        )


@pytest.mark.parametrize("n", [_V2_LEN - len(_NOTE), _V2_LEN - 1])
def test_v2_values_cut_in_the_body_fail_the_tag(n: int, vector_keys: carnet.KeyManager) -> None:
    _, blob = _sample()
    with pytest.raises(InvalidCiphertext):
        vector_keys.decrypt(blob[:n], tenant="p1", label="notes.body")


@pytest.mark.parametrize("n", [0, 1, 28, 29, 44])
def test_truncated_v1_values_are_rejected(n: int) -> None:
    blob = bytes.fromhex(V1_VECTORS[1]["blob"])
    with pytest.raises(InvalidCiphertext):
        envelope.key_id_of(blob[:n])


@pytest.mark.parametrize("version", [0, 3, 0x82, 0xFF])
def test_unknown_version_is_rejected(version: int, vector_keys: carnet.KeyManager) -> None:
    _, blob = _sample()
    bad = bytes([version]) + blob[1:]
    with pytest.raises(InvalidCiphertext, match=f"version {version}"):
        envelope.key_id_of(bad)
    assert not envelope.is_known(bad)
    with pytest.raises(InvalidCiphertext):
        vector_keys.decrypt(bad, tenant="p1", label="notes.body")


def test_zero_length_practice_is_rejected() -> None:
    _, blob = _sample()
    bad = blob[:17] + b"\x00\x00" + blob[19 + _P :]
    with pytest.raises(InvalidCiphertext):
        envelope.key_id_of(bad)


# -- the text form ------------------------------------------------------------------------


def _text_parts() -> list[str]:
    _, blob = _sample()
    return envelope.to_text(blob).split(":")


def _variants(part: str) -> list[str]:
    """Every one-character change of ``part`` into a character of the text form's alphabets."""
    alphabet = "0123456789abcdefABCDEF+/=:gz \n"
    out = []
    for i, c in enumerate(part):
        for r in alphabet:
            if r != c:
                out.append(part[:i] + r + part[i + 1 :])
    return out


@pytest.mark.parametrize(
    "index", range(6), ids=["prefix", "version", "key id", "label tag", "practice", "body"]
)
def test_every_change_in_each_text_part_is_rejected(
    index: int, vector_keys: carnet.KeyManager
) -> None:
    parts = _text_parts()
    text = ":".join(parts)
    assert vector_keys.decrypt(envelope.from_text(text), tenant="p1", label="notes.body") == _NOTE
    tried = 0
    for changed in _variants(parts[index]):
        bad = ":".join([*parts[:index], changed, *parts[index + 1 :]])
        with pytest.raises(CarnetError):
            vector_keys.decrypt(envelope.from_text(bad), tenant="p1", label="notes.body")
        tried += 1
    assert tried > 0


def test_text_form_is_lowercase_hex_only() -> None:
    parts = _text_parts()
    for index in (2, 3, 4):
        upper = [*parts]
        upper[index] = upper[index].upper()
        if upper[index] == parts[index]:
            continue
        with pytest.raises(InvalidCiphertext):
            envelope.from_text(":".join(upper))
        assert index != 2 or envelope.text_key_id(":".join(upper)) is None


def test_text_form_parts_dropped_or_added_are_rejected() -> None:
    parts = _text_parts()
    for i in range(2, 6):
        with pytest.raises(InvalidCiphertext):
            envelope.from_text(":".join(parts[:i] + parts[i + 1 :]))
    with pytest.raises(InvalidCiphertext):
        envelope.from_text(":".join([*parts, "x"]))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "carnet:",
        "carnet:!!notbase64!!",
        "carnet:AQID\n",
        "carnet:2:",
        "carnet:2::::",
        "carnet:2:00:00000000:7031:AAAA",
        "carnet:2:" + "00" * 16 + ":00000000::" + "A" * 40,
        "carnet:2:" + "00" * 16 + ":00000000:703:" + "A" * 40,
        "carnet:2:" + "00" * 16 + ":00000000:7031:" + "A" * 39,
        "carnet:2:" + "00" * 16 + ":000000:7031:" + "A" * 40,
        "carnet:2:" + "00" * 16 + ":7031:" + "A" * 40,
    ],
)
def test_bad_text_forms(text: str) -> None:
    with pytest.raises(InvalidCiphertext):
        blob = envelope.from_text(text)
        envelope.key_id_of(blob)


def test_nonces_are_fresh() -> None:
    sealer = envelope.Sealer(bytes(range(32)), bytes(range(16)), "notes.body", "p1")
    at = 19 + _P
    nonces = {sealer.seal(b"x")[at : at + 12] for _ in range(2000)}
    assert len(nonces) == 2000


def test_the_product_seals_through_the_envelope_sealer(vector_keys: carnet.KeyManager) -> None:
    # The sealer the manager caches is the envelope's: vectors test what runs.
    blob = vector_keys.encrypt(b"x", tenant="sealer-check", label="notes.body")
    assert blob[0] == 2 and envelope.tenant_of(blob) == "sealer-check"
    assert all(type(s) is envelope.Sealer for s in vector_keys.cache.sealers.values())
