"""Primitive layer: AES-256-GCM from ``cryptography``, nothing home-made.

The only module of carnet that imports ``AESGCM``. This is the hazardous
floor: callers pass the nonce. The envelope (values, :mod:`carnet.envelope`)
and the local master keys (wraps, :mod:`carnet.providers._local`) build their
ciphers here with :func:`cipher` and always draw a fresh random 96-bit nonce;
the Wycheproof vectors run against :func:`encrypt` / :func:`decrypt`, which use
the same :func:`cipher`.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


# What a cipher's decrypt raises when the tag does not match: callers turn it
# into their own error (InvalidCiphertext, MasterKeyMismatch).
AuthenticationFailed = InvalidTag


class AeadError(Exception):
    """:func:`decrypt` found the tag wrong (key, nonce, associated data or ciphertext).

    Only the known-answer seam raises it: the envelope and the local master
    keys decrypt with their own :func:`cipher` and catch
    :data:`AuthenticationFailed`, which they turn into ``InvalidCiphertext``
    and ``MasterKeyMismatch``.
    """


def new_key() -> bytes:
    """A fresh random 256-bit key from the OS CSPRNG."""
    return os.urandom(KEY_SIZE)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def cipher(key: bytes) -> AESGCM:
    """An AESGCM object for ``key``; callers cache it per key (construction is not free)."""
    if len(key) != KEY_SIZE:
        raise ValueError("AES-256-GCM needs a 32-byte key")
    return AESGCM(key)


def encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Ciphertext followed by the 16-byte tag."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("AES-256-GCM here uses 96-bit nonces")
    return cipher(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, nonce: bytes, ciphertext_and_tag: bytes, aad: bytes) -> bytes:
    """The plaintext, or :class:`AeadError` when the tag does not match."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("AES-256-GCM here uses 96-bit nonces")
    if len(ciphertext_and_tag) < TAG_SIZE:
        raise AeadError("ciphertext shorter than the tag")
    try:
        return cipher(key).decrypt(nonce, ciphertext_and_tag, aad)
    except InvalidTag:
        raise AeadError("authentication failed: the tag does not match") from None
