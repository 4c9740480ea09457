"""Shared logic of master keys whose 256-bit secret is held locally (file, OS keyring).

The DEK is wrapped with AES-256-GCM under the master secret, with the wrap
context as associated data::

    0x01 | nonce (12) | ciphertext || tag

AES-GCM rather than RFC 3394 key wrap because the wrap must authenticate the
tenant and key id, which key wrap cannot.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .._aead import AuthenticationFailed, cipher
from ..errors import MasterKeyMismatch
from .base import MasterKey, context_aad

WRAP_VERSION = 1
SECRET_SIZE = 32


class LocalMasterKey(MasterKey):
    """A master key whose secret this process holds in memory."""

    def __init__(self, uri: str, secret: bytes) -> None:
        if len(secret) != SECRET_SIZE:
            raise ValueError("master key secret must be 32 bytes")
        self._uri = uri
        self._aead = cipher(secret)

    @property
    def uri(self) -> str:
        return self._uri

    def wrap(self, dek: bytes, context: Mapping[str, str]) -> bytes:
        nonce = os.urandom(12)
        return bytes([WRAP_VERSION]) + nonce + self._aead.encrypt(nonce, dek, context_aad(context))

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        if len(wrapped) < 1 + 12 + 16 or wrapped[0] != WRAP_VERSION:
            raise MasterKeyMismatch(f"wrapped key is not in a format {self.scheme}:// can open")
        try:
            return self._aead.decrypt(wrapped[1:13], wrapped[13:], context_aad(context))
        except AuthenticationFailed:
            raise MasterKeyMismatch(
                f"wrapped key does not open under master key {self.uri} "
                "(another master key, another tenant's key, or tampered)"
            ) from None


class EphemeralMasterKey(LocalMasterKey):
    """A random master key that lives only in this process and is never stored.

    For trials whose ciphertexts must never open anywhere else (``carnet
    migrate plan`` times real seals under one, in a throwaway database).
    """

    scheme = "ephemeral"

    def __init__(self, name: str = "ephemeral://trial") -> None:
        super().__init__(name, os.urandom(SECRET_SIZE))

    @classmethod
    def from_uri(cls, uri: str) -> MasterKey:
        raise NotImplementedError("an ephemeral master key cannot be opened from a URI")
