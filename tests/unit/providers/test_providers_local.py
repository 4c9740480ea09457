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


def test_file_key_refuses_missing_garbage_and_overwrite(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/m.key"
    carnet.create_master_key(uri)
    with pytest.raises(ConfigurationError, match="already exists"):
        carnet.create_master_key(uri)
    with pytest.raises(ConfigurationError, match="does not exist"):
        carnet.open_master_key(f"file://{tmp_path}/none.key")
    os.symlink(tmp_path / "none.key", tmp_path / "dangling.key")
    with pytest.raises(ConfigurationError, match="does not exist"):
        carnet.open_master_key(f"file://{tmp_path}/dangling.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    with pytest.raises(ConfigurationError, match="not a carnet master key"):
        carnet.open_master_key(f"file://{garbage}")


OTHER_UID = 65534  # nobody


def _chown_or_skip(path: Path, uid: int) -> None:
    # Giving a file to another user needs root (CI runs as root).
    try:
        os.chown(path, uid, -1)
    except PermissionError:
        pytest.skip("changing a file's owner needs root")


def test_file_key_refuses_a_file_another_user_owns(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/m.key"
    carnet.create_master_key(uri)
    _chown_or_skip(tmp_path / "m.key", OTHER_UID)
    with pytest.raises(ConfigurationError, match="owned by uid 65534"):
        carnet.open_master_key(uri)


def test_file_key_refuses_a_directory_others_can_write_or_own(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    d.mkdir()
    uri = f"file://{d}/m.key"
    carnet.create_master_key(uri)
    d.chmod(0o777)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        carnet.open_master_key(uri)
    # A sticky directory (like /tmp): others cannot rename what they do not own.
    d.chmod(0o1777)
    assert carnet.open_master_key(uri).uri == uri
    d.chmod(0o755)
    _chown_or_skip(d, OTHER_UID)
    with pytest.raises(ConfigurationError, match="directory .* owned by uid 65534"):
        carnet.open_master_key(uri)


def test_file_key_follows_a_container_secret_mount(tmp_path: Path) -> None:
    # The layout a Kubernetes secret volume uses: name -> ..data/name, ..data ->
    # a timestamped directory, all owned by root and not writable by others.
    mount = tmp_path / "secret"
    mount.mkdir()
    stamped = mount / "..2026_12_06_10_00_00.123"
    stamped.mkdir()
    made = carnet.create_master_key(f"file://{stamped}/master.key")
    (stamped / "master.key").chmod(0o400)
    os.symlink(stamped.name, mount / "..data")
    os.symlink("..data/master.key", mount / "master.key")
    key = carnet.open_master_key(f"file://{mount}/master.key")
    ctx = {"tenant": "p1", "key_id": "00" * 16}
    assert key.unwrap(made.wrap(b"k" * 32, ctx), ctx) == b"k" * 32


def test_file_key_refuses_a_link_into_or_from_an_unsafe_directory(tmp_path: Path) -> None:
    safe = tmp_path / "safe"
    unsafe = tmp_path / "unsafe"
    safe.mkdir()
    unsafe.mkdir()
    carnet.create_master_key(f"file://{unsafe}/m.key")
    os.symlink(unsafe / "m.key", safe / "link.key")
    unsafe.chmod(0o777)
    with pytest.raises(ConfigurationError, match="unsafe.*writable by group or others"):
        carnet.open_master_key(f"file://{safe}/link.key")
    unsafe.chmod(0o755)
    carnet.create_master_key(f"file://{safe}/m.key")
    os.symlink(safe / "m.key", unsafe / "link.key")
    unsafe.chmod(0o777)
    with pytest.raises(ConfigurationError, match="writable by group or others"):
        carnet.open_master_key(f"file://{unsafe}/link.key")


def test_file_key_checks_the_file_it_opened_not_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file swapped in between the checks on the path and the open: the
    # checks on the opened file (fstat) see it.
    from carnet.providers import file as file_provider

    uri = f"file://{tmp_path}/m.key"
    carnet.create_master_key(uri)
    carnet.create_master_key(f"file://{tmp_path}/attacker.key")
    (tmp_path / "attacker.key").chmod(0o644)  # the attacker's key, readable by anyone
    real_open = os.open

    def swap_then_open(path: str, flags: int, *args: int) -> int:
        os.replace(tmp_path / "attacker.key", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(file_provider.os, "open", swap_then_open)
    with pytest.raises(ConfigurationError, match="accessible by group or others"):
        carnet.open_master_key(uri)


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
