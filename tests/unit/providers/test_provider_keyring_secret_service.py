"""keyring:// master keys against a real Secret Service (gnome-keyring-daemon).

tests/unit/providers/test_providers_local.py covers the provider with keyrings.alt's file
backend; this is the store Linux desktops and servers with a session keyring
actually use, on a private bus started by the fixture (tests/support/secret_service.py).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import carnet
from carnet.errors import ConfigurationError, MasterKeyMismatch, MasterKeyUnavailable
from carnet.providers.keyring import HEADER, KeyringMasterKey

if TYPE_CHECKING:
    from support.secret_service import SecretService


# A prompt that nobody answers must fail the test, not hang CI.
pytestmark = pytest.mark.timeout(60)

URI = "keyring://carnet-ss-test/master"
CTX = {"tenant": "p1", "key_id": "00" * 16}


def _stored_text(service: SecretService) -> str:
    """The entry's secret, read with secretstorage rather than through keyring."""
    with service.default_collection() as collection:
        items = list(collection.search_items({"service": "carnet-ss-test", "username": "master"}))
        assert len(items) == 1
        secret: bytes = items[0].get_secret()
        return secret.decode()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_master_key_lives_in_the_secret_service(secret_service: SecretService) -> None:
    keyring_file = secret_service.keyrings / "login.keyring"
    before = keyring_file.read_bytes()
    mk = carnet.create_master_key(URI)
    assert isinstance(mk, KeyringMasterKey) and mk.uri == URI

    text = _stored_text(secret_service)
    assert text.startswith(HEADER)
    secret = base64.b64decode(text[len(HEADER) :], validate=True)
    assert len(secret) == 32
    # The bytes read straight from the daemon are the key the provider uses.
    dek = os.urandom(32)
    assert KeyringMasterKey("keyring://direct/read", secret).unwrap(mk.wrap(dek, CTX), CTX) == dek

    # gnome-keyring has written the entry to disk (the file changed) but
    # encrypted under the unlock password: neither the entry's text, its
    # base64 nor the raw key may be found in any file the daemon wrote.
    assert keyring_file.read_bytes() != before
    encoded = text[len(HEADER) :].encode()
    for path in _files(secret_service.root):
        data = path.read_bytes()
        for needle in (encoded, secret, HEADER.encode()):
            assert needle not in data, f"{needle!r:.30} found in {path}"


def test_wrap_unwrap_and_context_binding(secret_service: SecretService) -> None:
    mk = carnet.create_master_key(URI)
    with pytest.raises(ConfigurationError, match="already exists"):
        carnet.create_master_key(URI)
    dek = os.urandom(32)
    wrapped = mk.wrap(dek, CTX)
    assert dek not in wrapped
    # A second open reads the key back from the daemon, not from the object.
    again = carnet.open_master_key(URI)
    assert again.unwrap(wrapped, CTX) == dek
    for ctx in ({**CTX, "tenant": "p2"}, {**CTX, "key_id": "11" * 16}):
        with pytest.raises(MasterKeyMismatch):
            again.unwrap(wrapped, ctx)
    other = carnet.create_master_key("keyring://carnet-ss-test/other")
    with pytest.raises(MasterKeyMismatch):
        other.unwrap(wrapped, CTX)
    with pytest.raises(ConfigurationError, match="no keyring entry"):
        carnet.open_master_key("keyring://carnet-ss-test/absent")


def test_entry_that_is_not_a_master_key(secret_service: SecretService) -> None:
    import keyring

    keyring.set_password("carnet-ss-test", "master", "hunter2")
    with pytest.raises(ConfigurationError, match="not a carnet master key") as info:
        carnet.open_master_key(URI)
    assert "hunter2" not in str(info.value)


def test_locked_collection_is_unavailable(secret_service: SecretService) -> None:
    carnet.create_master_key(URI)
    text = _stored_text(secret_service)
    secret_service.lock()
    # keyring asks the daemon to unlock; with no prompter on the private bus
    # the prompt is dismissed, which is what a headless server sees.
    with pytest.raises(MasterKeyUnavailable) as info:
        carnet.open_master_key(URI)
    assert "locked" in str(info.value).lower()
    assert text[len(HEADER) :] not in str(info.value)
    with pytest.raises(MasterKeyUnavailable):
        carnet.create_master_key("keyring://carnet-ss-test/second")


@pytest.mark.parametrize("what", ["daemon", "bus"])
def test_stopped_service_is_unavailable(secret_service: SecretService, what: str) -> None:
    carnet.create_master_key(URI)
    if what == "daemon":
        secret_service.stop_daemon()
    else:
        secret_service.stop_bus()
    with pytest.raises(MasterKeyUnavailable):
        carnet.open_master_key(URI)


def test_key_manager_round_trip_on_sqlite(secret_service: SecretService, tmp_path: Path) -> None:
    carnet.create_master_key(URI)
    url = f"sqlite:///{tmp_path / 'notes.db'}"
    note = "BP 120/80, follow up in two weeks"
    keys = carnet.KeyManager(url, master_key=URI)
    try:
        keys.create_schema()
        sealed = keys.encrypt_text(note, tenant="p1", label="notes.body")
        assert b"follow up" not in sealed
        assert keys.decrypt_text(sealed, tenant="p1", label="notes.body") == note
    finally:
        keys.close()
    # A new manager opens the master key from the daemon again to unwrap the stored DEK.
    km2 = carnet.KeyManager(url, master_key=URI)
    try:
        assert km2.decrypt_text(sealed, tenant="p1", label="notes.body") == note
        with pytest.raises(carnet.errors.CarnetError):
            km2.decrypt_text(sealed, tenant="p2", label="notes.body")
    finally:
        km2.close()
