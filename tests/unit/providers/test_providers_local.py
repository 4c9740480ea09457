"""file:// and keyring:// master keys, and the URI registry."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import keyring
import pytest
from keyring.backend import KeyringBackend
from keyrings.alt.file import PlaintextKeyring

import carnet
from carnet.errors import ConfigurationError, MasterKeyMismatch
from carnet.providers.file import FileMasterKey
from carnet.providers.keyring import KeyringMasterKey

CTX = {"tenant": "p1", "key_id": "00" * 16}


def test_file_key_round_trip_and_context_binding(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/m.key"
    mk = carnet.create_master_key(uri)
    assert isinstance(mk, FileMasterKey) and mk.uri == uri
    assert os.stat(tmp_path / "m.key").st_mode & 0o777 == 0o600
    dek = os.urandom(32)
    wrapped = mk.wrap(dek, CTX)
    assert dek not in wrapped
    again = carnet.open_master_key(uri)
    assert again.unwrap(wrapped, CTX) == dek
    for ctx in ({**CTX, "tenant": "p2"}, {**CTX, "key_id": "11" * 16}):
        with pytest.raises(MasterKeyMismatch):
            again.unwrap(wrapped, ctx)
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 1
        with pytest.raises(MasterKeyMismatch):
            again.unwrap(bytes(bad), CTX)


def test_another_file_key_does_not_unwrap(tmp_path: Path) -> None:
    a = carnet.create_master_key(f"file://{tmp_path}/a.key")
    b = carnet.create_master_key(f"file://{tmp_path}/b.key")
    with pytest.raises(MasterKeyMismatch):
        b.unwrap(a.wrap(os.urandom(32), CTX), CTX)


def test_file_key_refuses_loose_permissions(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/m.key"
    carnet.create_master_key(uri)
    os.chmod(tmp_path / "m.key", 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        carnet.open_master_key(uri)


def test_file_key_refuses_symlink_missing_garbage_and_overwrite(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/m.key"
    carnet.create_master_key(uri)
    with pytest.raises(ConfigurationError, match="already exists"):
        carnet.create_master_key(uri)
    os.symlink(tmp_path / "m.key", tmp_path / "link.key")
    with pytest.raises(ConfigurationError, match="link"):
        carnet.open_master_key(f"file://{tmp_path}/link.key")
    with pytest.raises(ConfigurationError, match="does not exist"):
        carnet.open_master_key(f"file://{tmp_path}/none.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(ConfigurationError, match="not a carnet master key"):
        carnet.open_master_key(f"file://{garbage}")


@pytest.mark.parametrize(
    "uri",
    [
        "file:/relative",
        "file://host/x",
        "nonsense",
        "keyring://svc",
        "keyring:///name",
        "bogus://x/y",
    ],
)
def test_bad_uris(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        carnet.open_master_key(uri)


def test_secret_not_in_repr(tmp_path: Path) -> None:
    mk = carnet.create_master_key(f"file://{tmp_path}/m.key")
    text = (tmp_path / "m.key").read_text().split(":", 1)[1].strip()
    assert text not in repr(mk) and text not in repr(vars(mk))


@pytest.fixture
def file_keyring(tmp_path: Path) -> Iterator[KeyringBackend]:
    # A real keyring backend that stores to a file; the Secret Service variant
    # of this test lives with the production providers' tests.
    previous = keyring.get_keyring()
    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring.cfg")  # type: ignore[misc]
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def test_keyring_key_round_trip(file_keyring: KeyringBackend) -> None:
    uri = "keyring://carnet-test/master"
    mk = carnet.create_master_key(uri)
    assert isinstance(mk, KeyringMasterKey) and mk.uri == uri
    with pytest.raises(ConfigurationError, match="already exists"):
        carnet.create_master_key(uri)
    dek = os.urandom(32)
    assert carnet.open_master_key(uri).unwrap(mk.wrap(dek, CTX), CTX) == dek
    with pytest.raises(ConfigurationError, match="no keyring entry"):
        carnet.open_master_key("keyring://carnet-test/other")


def test_secret_service_without_a_session_bus_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SecretService backend forced on a machine with no D-Bus session:
    # secretstorage raises its own exception type, outside keyring's errors.
    from keyring.backends.SecretService import Keyring as SecretServiceKeyring

    from carnet.errors import MasterKeyUnavailable

    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent-carnet-test")
    previous = keyring.get_keyring()
    keyring.set_keyring(SecretServiceKeyring())
    try:
        with pytest.raises(MasterKeyUnavailable, match="OS keyring unavailable"):
            carnet.open_master_key("keyring://carnet-test/master")
    finally:
        keyring.set_keyring(previous)
