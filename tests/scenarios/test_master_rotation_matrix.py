"""Master-key rotation across every provider, on every database backend.

Notes are written under one master key, then every DEK is rewrapped through
file -> keyring -> aws-kms -> pkcs11 -> file (and the reverse chain). After
each step a fresh KeyManager that knows only the new master key reads every
note written so far, the stored ciphertext of the notes is byte-for-byte
unchanged (rewrap touches the key table only), and the previous master key is
destroyed wherever the provider allows it, so it is provably not needed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import keyring
import pytest
import sqlalchemy as sa
from keyrings.alt.file import PlaintextKeyring
from sqlalchemy.orm import Session

import carnet
from carnet.providers import create_master_key
from support.models import Base, Note

if TYPE_CHECKING:
    from support.kms_server import MotoServer
    from support.softhsm import SoftHsm


PRACTICES = [f"practice-{i}" for i in range(5)]


@pytest.fixture
def file_keyring(tmp_path: Path) -> Iterator[None]:
    # A real keyring backend that stores to a file: no Secret Service here.
    previous = keyring.get_keyring()
    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring.cfg")  # type: ignore[misc]
    keyring.set_keyring(backend)
    yield
    keyring.set_keyring(previous)


class Masters:
    """Makes a fresh master key per provider, and destroys it when told."""

    def __init__(self, tmp_path: Path, kms: MotoServer, hsm: SoftHsm) -> None:
        self.tmp_path = tmp_path
        self.kms = kms
        self.hsm = hsm
        self.tag = uuid.uuid4().hex[:8]

    def make(self, kind: str) -> str:
        if kind == "file":
            uri = f"file://{self.tmp_path}/master-{uuid.uuid4().hex[:6]}.key"
            create_master_key(uri).close()
        elif kind == "keyring":
            uri = f"keyring://carnet-rotation/{self.tag}-{uuid.uuid4().hex[:6]}"
            create_master_key(uri).close()
        elif kind == "aws-kms":
            arn = self.kms.client().create_key()["KeyMetadata"]["Arn"]
            uri = f"aws-kms://{arn}"
        elif kind == "pkcs11":
            uri = self.hsm.uri(f"rotation-{uuid.uuid4().hex[:10]}")
            create_master_key(uri).close()
        else:
            raise AssertionError(kind)
        return uri

    def destroy(self, uri: str) -> None:
        if uri.startswith("file://"):
            os.unlink(uri[len("file://") :])
        elif uri.startswith("keyring://"):
            service, name = uri[len("keyring://") :].split("/", 1)
            keyring.delete_password(service, name)
        elif uri.startswith("aws-kms://"):
            arn = uri[len("aws-kms://") :]
            client = self.kms.client()
            client.schedule_key_deletion(KeyId=arn.rsplit("/", 1)[1], PendingWindowInDays=7)
        elif uri.startswith("pkcs11://"):
            import pkcs11
            from pkcs11 import ObjectClass

            label = uri.split("/")[3].split("?")[0]
            session = (
                pkcs11.lib(self.hsm.module).get_token(token_label=self.hsm.token).open(rw=True)
            )
            try:
                session.get_key(object_class=ObjectClass.SECRET_KEY, label=label).destroy()
            finally:
                session.close()


@pytest.fixture
def masters(
    tmp_path: Path, kms_env: MotoServer, softhsm: SoftHsm, hsm_pin: str, file_keyring: None
) -> Masters:
    return Masters(tmp_path, kms_env, softhsm)


def write_notes(engine: sa.Engine, keys: carnet.KeyManager, tag: str) -> dict[int, str | None]:
    carnet.configure(keys)
    with Session(engine) as s:
        notes = [
            Note(practice_id=p, body=f"{tag} note {i} of {p}: stable angina, review in 3 mo")
            for p in PRACTICES
            for i in range(3)
        ]
        s.add_all(notes)
        s.commit()
        return {n.id: n.body for n in notes}


def read_notes(engine: sa.Engine, keys: carnet.KeyManager) -> dict[int, str | None]:
    carnet.configure(keys)
    with Session(engine) as s:
        return {n.id: n.body for n in s.scalars(sa.select(Note))}


def raw_bodies(engine: sa.Engine) -> dict[int, object]:
    with engine.connect() as conn:
        return {row.id: row.body for row in conn.execute(sa.text("SELECT id, body FROM notes"))}


def master_uris(engine: sa.Engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT master_key_uri FROM carnet_keys")).scalars())


CHAINS = {
    "forward": ["file", "keyring", "aws-kms", "pkcs11", "file"],
    "backward": ["pkcs11", "aws-kms", "keyring", "file", "pkcs11"],
}


@pytest.mark.parametrize("chain", list(CHAINS))
def test_rewrap_chain_across_providers(engine: sa.Engine, masters: Masters, chain: str) -> None:
    kinds = CHAINS[chain]
    current = masters.make(kinds[0])
    keys = carnet.KeyManager(engine, master_key=current)
    keys.create_schema()
    Base.metadata.create_all(engine)
    expected: dict[int, str | None] = dict(write_notes(engine, keys, kinds[0]))
    try:
        for kind in kinds[1:]:
            target = masters.make(kind)
            before = raw_bodies(engine)
            report = keys.rewrap(to=target)
            assert report.rewrapped == len(PRACTICES)
            assert master_uris(engine) == {target}
            assert raw_bodies(engine) == before  # no data row touched
            keys.close()
            masters.destroy(current)
            # A new process, given only the new master key.
            keys = carnet.KeyManager(engine, master_key=target)
            assert read_notes(engine, keys) == expected
            assert keys.stats()["master_unwraps"] == len(PRACTICES)
            expected.update(write_notes(engine, keys, kind))
            current = target
        assert read_notes(engine, keys) == expected
    finally:
        carnet.configure(None)
        keys.close()


def test_rewrap_is_idempotent_and_resumable(engine: sa.Engine, masters: Masters) -> None:
    source, target = masters.make("file"), masters.make("aws-kms")
    keys = carnet.KeyManager(engine, master_key=source)
    keys.create_schema()
    Base.metadata.create_all(engine)
    expected = write_notes(engine, keys, "start")
    try:
        first = keys.rewrap(to=target, batch_size=2)
        again = keys.rewrap(to=target, batch_size=2)
        assert (first.rewrapped, again.rewrapped, again.already) == (5, 0, 5)
        fresh = carnet.KeyManager(engine, master_key=target)
        assert read_notes(engine, fresh) == expected
        fresh.close()
    finally:
        carnet.configure(None)
        keys.close()


def test_a_manager_without_the_old_key_refuses_unrewrapped_deks(
    engine: sa.Engine, masters: Masters
) -> None:
    source, target = masters.make("pkcs11"), masters.make("aws-kms")
    keys = carnet.KeyManager(engine, master_key=source)
    keys.create_schema()
    Base.metadata.create_all(engine)
    write_notes(engine, keys, "start")
    keys.close()
    stranger = carnet.KeyManager(engine, master_key=target)
    try:
        carnet.configure(stranger)
        with (
            Session(engine) as s,
            pytest.raises(carnet.errors.MasterKeyUnavailable, match="previous_master_keys"),
        ):
            [n.body for n in s.scalars(sa.select(Note))]
    finally:
        carnet.configure(None)
        stranger.close()
