"""``keyring://service/name`` master keys, kept by the OS keyring.

Through the ``keyring`` library: Secret Service (GNOME Keyring, KWallet) on
Linux, Keychain on macOS, Credential Locker on Windows. The entry holds the
same text as a key file: ``carnet-master-key-v1:<base64>``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError, MasterKeyUnavailable
from ._local import SECRET_SIZE, LocalMasterKey

HEADER = "carnet-master-key-v1:"
T = TypeVar("T")

# What a backend's exception means for the operator, and the fix (docs/providers.md,
# "keyring://"). Only the class name is known to be safe to show.
_WHY = {
    "NoKeyringError": "no keyring backend is available to this process (on a server: run a "
    "Secret Service, e.g. gnome-keyring-daemon under dbus-run-session, or use another "
    "master key)",
    "KeyringLocked": "the keyring is locked: unlock it (log in to the desktop session, or "
    "gnome-keyring-daemon --unlock on a server)",
    "InitError": "the keyring backend failed to start (no D-Bus session bus: "
    "DBUS_SESSION_BUS_ADDRESS unset?)",
    "SecretServiceNotAvailableException": "no Secret Service on the session bus "
    "(start gnome-keyring-daemon or KWallet in this session)",
    "PromptDismissedException": "the unlock prompt was dismissed",
    "LockedException": "the keyring collection is locked: unlock it",
    "PasswordSetError": "the keyring refused to store the entry (locked or read-only)",
}


def _names(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    name = unquote(parts.path.lstrip("/"))
    service = unquote(parts.netloc)
    if parts.scheme != "keyring" or not service or not name or "/" in name:
        raise ConfigurationError(
            f"keyring master key URI must look like keyring://service/name, got {uri!r}"
        )
    return service, name


def _backend_call(fn: Callable[[Any], T]) -> T:
    import keyring

    try:
        return fn(keyring)
    except Exception as exc:  # noqa: BLE001 - the backend boundary: every failure is "unreachable"
        # Backends raise KeyringError, OSError, or their own exceptions (secretstorage's
        # SecretServiceNotAvailableException when no session bus is set). Whatever it
        # is, the master key cannot be had; the type name says why, and no message of
        # the backend is echoed (it may name the entry).
        name = type(exc).__name__
        why = _WHY.get(name)
        raise MasterKeyUnavailable(
            f"OS keyring unavailable: {name}" + (f": {why}" if why else "")
        ) from None


class KeyringMasterKey(LocalMasterKey):
    scheme = "keyring"

    @classmethod
    def from_uri(cls, uri: str) -> KeyringMasterKey:
        service, name = _names(uri)
        text = _backend_call(lambda k: k.get_password(service, name))
        if text is None:
            raise ConfigurationError(
                f"no keyring entry {service}/{name} (create one: carnet master new keyring://{service}/{name})"
            )
        if not text.startswith(HEADER):
            raise ConfigurationError(f"keyring entry {service}/{name} is not a carnet master key")
        try:
            secret = base64.b64decode(text[len(HEADER) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(
                f"keyring entry {service}/{name} is not a carnet master key"
            ) from None
        if len(secret) != SECRET_SIZE:
            raise ConfigurationError(f"keyring entry {service}/{name} is not a carnet master key")
        return cls(f"keyring://{service}/{name}", secret)

    @classmethod
    def create(cls, uri: str) -> KeyringMasterKey:
        service, name = _names(uri)
        if _backend_call(lambda k: k.get_password(service, name)) is not None:
            raise ConfigurationError(
                f"keyring entry {service}/{name} already exists; not overwriting"
            )
        secret = os.urandom(SECRET_SIZE)
        text = HEADER + base64.b64encode(secret).decode("ascii")
        _backend_call(lambda k: k.set_password(service, name, text))
        return cls(f"keyring://{service}/{name}", secret)
