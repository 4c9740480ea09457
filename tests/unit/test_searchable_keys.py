"""Blind-index keys: known-answer vectors, index roots in carnet_keys, rotation, destruction."""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import carnet
from carnet import indexkeys, transforms
from carnet.errors import ConfigurationError, KeyDestroyed, MasterKeyMismatch, UnknownKey
from carnet.keystore import utcnow
from carnet.manager import IndexRoot
from support import paths

VECTORS = json.loads((paths.VECTORS / "blind_index_v1.json").read_text(encoding="utf-8"))["vectors"]


def _hkdf_by_hand(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    # RFC 5869 with an absent salt (HashLen zero bytes), written out from the RFC.
    prk = std_hmac.new(b"\0" * 32, ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = std_hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


def _info_by_hand(label: str, index: str, tenant: str) -> bytes:
    out = b"carnet-bidx\x01"
    for f in (label, index, tenant):
        b = f.encode()
        out += struct.pack(">I", len(b)) + b
    return out


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_known_answer_vectors(v: dict[str, Any]) -> None:
    root = bytes.fromhex(v["root_key"])
    normalised = getattr(transforms, v["transform"])(*v["input"])
    assert normalised == v["normalised"]
    info = bytes.fromhex(v["info"])
    assert indexkeys.info(v["label"], v["index"], v["tenant"]) == info
    assert _info_by_hand(v["label"], v["index"], v["tenant"]) == info
    key = bytes.fromhex(v["index_key"])
    assert indexkeys.derive_key(root, v["label"], v["index"], v["tenant"]) == key
    assert _hkdf_by_hand(root, info) == key
    mac = std_hmac.new(key, normalised.encode(), hashlib.sha256).digest()
    assert mac.hex() == v["hmac"]
    # leftmost bits of the HMAC, as a big-endian unsigned integer
    assert int.from_bytes(mac, "big") >> (256 - v["bits"]) == v["value"]
    assert indexkeys.value_with_key(key, normalised, v["bits"]) == v["value"]
    r = IndexRoot(b"\0" * 16, 1, root)
    got = indexkeys.index_value(
        r, normalised, label=v["label"], index=v["index"], tenant=v["tenant"], bits=v["bits"]
    )
    assert got == v["value"] and 0 <= got < 2 ** v["bits"]


def test_vectors_separate_practices_and_indexes() -> None:
    by = {v["name"]: v for v in VECTORS}
    a, b = by["phone, 16 bits"], by["same phone, other practice"]
    assert a["normalised"] == b["normalised"] and a["index_key"] != b["index_key"]
    assert by["same phone, other index"]["index_key"] != a["index_key"]


def test_info_is_unambiguous() -> None:
    assert indexkeys.info("ab", "c", "t") != indexkeys.info("a", "bc", "t")
    assert indexkeys.info("a", "b", "ct") != indexkeys.info("a", "bc", "t")


@pytest.mark.parametrize("bits", [0, 64, -1, 1.5, True])
def test_bits_out_of_range_are_refused(bits: Any) -> None:
    with pytest.raises(ConfigurationError):
        indexkeys.check_bits(bits)


# -- index roots in carnet_keys --------------------------------------------------------


def test_index_root_is_created_once_wrapped_and_separate_from_the_data_key(
    unconfigured_keys: carnet.KeyManager,
) -> None:
    unconfigured_keys.ensure_key("p1")
    roots = unconfigured_keys.index_roots("p1")
    assert len(roots) == 1 and len(roots[0].secret) == 32
    recs = {r.kind: r for r in unconfigured_keys.list_keys("p1")}
    assert set(recs) == {"data", "index"}
    assert recs["index"].version == 1 and recs["data"].version == 1
    assert recs["index"].state == "active"
    assert recs["index"].wrapped_key is not None
    assert roots[0].secret not in recs["index"].wrapped_key
    assert "secret" not in repr(roots[0]) and roots[0].secret.hex() not in repr(roots[0])
    assert recs["index"].as_dict()["kind"] == "index"
    # A fresh manager (another process) finds the same root, not a new one.
    other = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    assert other.index_roots("p1")[0].secret == roots[0].secret
    assert other.index_roots("p2", create=False) == []
    assert len(unconfigured_keys.list_keys()) == 2


def test_data_key_rotation_keeps_the_index_root(unconfigured_keys: carnet.KeyManager) -> None:
    root = unconfigured_keys.index_roots("p1")[0]
    unconfigured_keys.ensure_key("p1")
    unconfigured_keys.rotate("p1")
    other = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    again = other.index_roots("p1")
    assert [r.key_id for r in again] == [root.key_id] and again[0].secret == root.secret
    assert sorted(r.version for r in unconfigured_keys.list_keys("p1") if r.kind == "data") == [
        1,
        2,
    ]


def test_one_active_index_root_per_practice_is_enforced_by_the_database(
    unconfigured_keys: carnet.KeyManager,
) -> None:
    unconfigured_keys.ensure_key("p1")
    unconfigured_keys.index_roots("p1")
    t = unconfigured_keys.table
    now = utcnow()
    row = {
        "tenant": "p1", "version": 7, "state": "active", "active_tenant": "p1",
        "master_key_uri": unconfigured_keys.master_key.uri, "wrapped_key": b"x" * 60,
        "created_at": now, "updated_at": now,
    }  # fmt: skip
    for kind in ("index", "data"):
        with pytest.raises(sa.exc.IntegrityError), unconfigured_keys.engine.begin() as conn:
            conn.execute(t.insert().values(key_id=os.urandom(16).hex(), kind=kind, **row))
    # MariaDB reports a failed CHECK as an OperationalError (4025).
    bad_kind = (sa.exc.IntegrityError, sa.exc.OperationalError)
    with pytest.raises(bad_kind), unconfigured_keys.engine.begin() as conn:
        conn.execute(t.insert().values(key_id=os.urandom(16).hex(), kind="other", **row))


def test_rotate_index_root_keeps_the_old_one_for_lookups(
    unconfigured_keys: carnet.KeyManager,
) -> None:
    old = unconfigured_keys.index_roots("p1")[0]
    rec = unconfigured_keys.rotate_index_root("p1")
    assert rec.kind == "index" and rec.version == 2 and rec.state == "active"
    roots = unconfigured_keys.index_roots("p1")
    assert [r.key_id for r in roots] == [rec.key_id, old.key_id]
    assert roots[0].secret != old.secret
    unconfigured_keys.retire(old.key_id)
    other = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    assert [r.key_id for r in other.index_roots("p1")] == [rec.key_id]
    assert [r.key_id for r in unconfigured_keys.index_roots("p1")] == [rec.key_id]


def test_destroy_shreds_the_index_root_too(unconfigured_keys: carnet.KeyManager) -> None:
    unconfigured_keys.ensure_key("gone")
    unconfigured_keys.index_roots("gone")
    unconfigured_keys.rotate_index_root("gone")
    unconfigured_keys.index_roots("kept")
    assert unconfigured_keys.destroy("gone") == 3
    recs = unconfigured_keys.list_keys("gone")
    assert {(r.kind, r.state) for r in recs} == {("data", "destroyed"), ("index", "destroyed")}
    assert all(r.wrapped_key is None for r in recs)
    with pytest.raises(KeyDestroyed):
        unconfigured_keys.index_roots("gone")
    with pytest.raises(KeyDestroyed):
        unconfigured_keys.rotate_index_root("gone")
    other = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    with pytest.raises(KeyDestroyed):
        other.index_roots("gone")
    assert len(other.index_roots("kept")) == 1


def test_an_index_root_is_never_usable_as_a_data_key(unconfigured_keys: carnet.KeyManager) -> None:
    root = unconfigured_keys.index_roots("p1")[0]
    # A header naming the root's key id: refused, not decrypted with it.
    blob = b"\x01" + root.key_id + b"\0" * 12 + b"\0" * 16
    with pytest.raises(UnknownKey):
        unconfigured_keys.decrypt(blob, tenant="p1", label="l")
    # Relabelling the root's row as the practice's data key: the wrap binds the kind.
    t = unconfigured_keys.table
    with unconfigured_keys.engine.begin() as conn:
        conn.execute(t.update().where(t.c.key_id == root.key_id.hex()).values(kind="data"))
    other = carnet.KeyManager(unconfigured_keys.engine, master_key=unconfigured_keys.master_key)
    with pytest.raises(MasterKeyMismatch):
        other.encrypt(b"x", tenant="p1", label="l")


def test_rewrap_keeps_index_roots_unwrappable(
    unconfigured_keys: carnet.KeyManager, tmp_path: Path
) -> None:
    unconfigured_keys.ensure_key("p1")
    secret = unconfigured_keys.index_roots("p1")[0].secret
    new_uri = "file://" + str(tmp_path / "new.key")
    carnet.create_master_key(new_uri).close()
    report = unconfigured_keys.rewrap(new_uri)
    assert report.rewrapped == 2
    other = carnet.KeyManager(unconfigured_keys.engine, master_key=new_uri)
    assert other.index_roots("p1")[0].secret == secret


def _root_race_worker(url: str, master: str, tenant: str, barrier: Any, out: Any) -> None:
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=master)
    barrier.wait()
    try:
        root = keys.index_roots(tenant)[0]
        out.put(f"{root.key_id.hex()}:{hashlib.sha256(root.secret).hexdigest()}")
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out.put(f"error: {type(exc).__name__}: {exc}")
    engine.dispose()


def test_concurrent_first_index_root_creation_yields_one_root(
    unconfigured_keys: carnet.KeyManager, db_url: str, master_key_uri: str
) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n = 5
    for tenant in ("race-a", "race-b"):
        barrier = ctx.Barrier(n)
        out = ctx.Queue()
        procs = [
            ctx.Process(
                target=_root_race_worker, args=(db_url, master_key_uri, tenant, barrier, out)
            )
            for _ in range(n)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert not [r for r in results if r.startswith("error")], results
        recs = unconfigured_keys.list_keys(tenant)
        assert [(r.kind, r.state) for r in recs] == [("index", "active")]
        assert {r.split(":")[0] for r in results} == {recs[0].key_id.hex()}
        assert len(set(results)) == 1  # every process derives from the same secret
