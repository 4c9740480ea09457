"""Known-answer vectors of EncryptedBytes and EncryptedJSON (tests/vectors/carnet_types_v2.json).

Each vector is checked three ways: the types' own plaintext encoding gives
the recorded plaintext (a document's bytes; canonical JSON), sealing it
through the envelope's fixed-nonce seam gives the recorded value byte for
byte, and the column type opens the value, through a KeyManager holding the
vector's data key in a real key table, back to the application's value. The
generator is run again and must reproduce the committed file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import carnet
from carnet import envelope
from carnet.keystore import utcnow, wrap_context
from carnet.types_binary import canonical_json
from support import paths

FILE = paths.VECTORS / "carnet_types_v2.json"
VECTORS: list[dict[str, Any]] = json.loads(FILE.read_text("utf-8"))["vectors"]


def _id(v: dict[str, Any]) -> str:
    return str(v["name"])


@pytest.fixture(scope="module")
def vector_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[carnet.KeyManager]:
    d = tmp_path_factory.mktemp("type-vectors")
    master = "file://" + str(d / "master.key")
    carnet.create_master_key(master).close()
    keys = carnet.KeyManager(sa.create_engine(f"sqlite:///{d / 'keys.db'}"), master_key=master)
    keys.create_schema()
    now = utcnow()
    versions: dict[str, int] = {}
    with keys.engine.begin() as conn:
        for v in VECTORS:
            key_id = bytes.fromhex(v["key_id"])
            versions[v["tenant"]] = versions.get(v["tenant"], 0) + 1
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


def _type(v: dict[str, Any]) -> Any:
    cls = {"EncryptedBytes": carnet.EncryptedBytes, "EncryptedJSON": carnet.EncryptedJSON}
    return cls[v["type"]](label=v["label"])


def _value(v: dict[str, Any]) -> Any:
    return bytes.fromhex(v["value_hex"]) if v["type"] == "EncryptedBytes" else v["value"]


def test_both_types_have_vectors() -> None:
    kinds = {v["type"] for v in VECTORS}
    assert kinds == {"EncryptedBytes", "EncryptedJSON"}
    # A JSON vector whose keys are out of order: canonical form is not the input's.
    assert any(
        v["type"] == "EncryptedJSON"
        and json.dumps(v["value"], ensure_ascii=False).encode() != bytes.fromhex(v["plaintext_hex"])
        for v in VECTORS
    )


@pytest.mark.parametrize("v", VECTORS, ids=_id)
def test_plaintext_is_the_types_encoding(v: dict[str, Any]) -> None:
    plain = bytes.fromhex(v["plaintext_hex"])
    typ = _type(v)
    if v["type"] == "EncryptedBytes":
        # The pipeline's form of a document reads back as its exact bytes.
        assert typ.plaintext(_value(v)).encode("latin-1") == plain == _value(v)
    else:
        assert canonical_json(_value(v)).encode("utf-8") == plain
        assert typ.plaintext(_value(v)).encode("utf-8") == plain


@pytest.mark.parametrize("v", VECTORS, ids=_id)
def test_seal_and_open_through_the_type(v: dict[str, Any], vector_keys: carnet.KeyManager) -> None:
    key_id = bytes.fromhex(v["key_id"])
    plain = bytes.fromhex(v["plaintext_hex"])
    aad = envelope.associated_data(key_id, v["label"], v["tenant"])
    assert aad.hex() == v["aad"]
    sealer = envelope.Sealer(bytes.fromhex(v["dek"]), key_id, v["label"], v["tenant"])
    blob = sealer._seal_with_nonce(plain, bytes.fromhex(v["nonce"]))
    assert blob.hex() == v["blob"]
    assert envelope.to_text(blob) == v["text_form"]
    # By hand: the body after the header is the nonce then AES-GCM's output.
    body = blob[len(blob) - len(plain) - 28 :]
    assert body[:12].hex() == v["nonce"]
    assert AESGCM(bytes.fromhex(v["dek"])).decrypt(body[:12], body[12:], aad) == plain
    opened = _type(v).decrypt(blob, v["tenant"], vector_keys)
    assert opened == _value(v)
    assert type(opened) is (bytes if v["type"] == "EncryptedBytes" else type(v["value"]))


def test_the_generator_reproduces_the_file(tmp_path: Path) -> None:
    gen = paths.VECTORS / "generate_carnet_types_v2.py"
    copy = tmp_path / gen.name
    copy.write_text(gen.read_text("utf-8"), "utf-8")
    subprocess.run([sys.executable, str(copy)], check=True, cwd=tmp_path)
    assert (tmp_path / FILE.name).read_text("utf-8") == FILE.read_text("utf-8")
