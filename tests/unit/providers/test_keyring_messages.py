"""A keyring failure says what it means and how to fix it, not just an exception's name."""

from __future__ import annotations

import keyring
import keyring.errors
import pytest
from keyring.backend import KeyringBackend

import carnet
from carnet.errors import MasterKeyUnavailable


class _Failing(KeyringBackend):
    priority = 1  # type: ignore[assignment]

    def __init__(self, exc: Exception) -> None:
        super().__init__()
        self.exc = exc

    def get_password(self, service: str, username: str) -> str | None:
        raise self.exc

    def set_password(self, service: str, username: str, password: str) -> None:
        raise self.exc

    def delete_password(self, service: str, username: str) -> None:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "says"),
    [
        (keyring.errors.NoKeyringError("entry carnet/master"), "dbus-run-session"),
        (keyring.errors.KeyringLocked("entry carnet/master"), "unlock it"),
        (keyring.errors.InitError("entry carnet/master"), "DBUS_SESSION_BUS_ADDRESS"),
    ],
)
def test_keyring_error_explains_the_fix(exc: Exception, says: str) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(_Failing(exc))
    try:
        with pytest.raises(MasterKeyUnavailable) as info:
            carnet.open_master_key("keyring://carnet/master")
    finally:
        keyring.set_keyring(previous)
    msg = str(info.value)
    assert msg.startswith(f"OS keyring unavailable: {type(exc).__name__}: ")
    assert says in msg
    assert "entry carnet/master" not in msg  # the backend's own text is never echoed
