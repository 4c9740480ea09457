"""Ciphertext format v1 (see docs/format.md).

::

    version (1 byte = 0x01) | key id (16) | nonce (12) | AES-256-GCM ciphertext || tag (16)

Associated data::

    version (1) | key id (16) | u32be len | UTF-8 field label | u32be len | UTF-8 tenant id

Binding the label and the tenant means a value copied to another column or
another practice's row fails authentication instead of yielding its text.
Binding the header means the key id cannot be swapped. The text form, for
TEXT columns, is ``TEXT_PREFIX`` followed by standard base64 of those bytes.

Random 96-bit nonces: NIST SP 800-38D limits one key to 2^32 random-nonce
encryptions; carnet's rotation policy keeps each data key far below that
(docs/format.md explains the margin).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from typing import Any

from ._aead import AuthenticationFailed, cipher
from .errors import InvalidCiphertext

VERSION = 1
VERSION_BYTE = b"\x01"
KEY_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = 1 + KEY_ID_SIZE + NONCE_SIZE
MIN_SIZE = HEADER_SIZE + TAG_SIZE
TEXT_PREFIX = "carnet:"

_u32 = struct.Struct(">I")
# Where a value's key id sits, for the hot path's lookup before any check: the
# Opener found under it checks the framing itself.
KEY_ID = slice(1, 1 + KEY_ID_SIZE)
_NONCE = slice(1 + KEY_ID_SIZE, HEADER_SIZE)
_BODY = slice(HEADER_SIZE, None)


def associated_data(key_id: bytes, label: str, tenant: str) -> bytes:
    """The bytes authenticated with every value (not stored: rebuilt on read)."""
    if len(key_id) != KEY_ID_SIZE:
        raise ValueError("key id must be 16 bytes")
    label_b = label.encode("utf-8")
    tenant_b = tenant.encode("utf-8")
    return b"".join(
        (VERSION_BYTE, key_id, _u32.pack(len(label_b)), label_b, _u32.pack(len(tenant_b)), tenant_b)
    )


def key_id_of(blob: bytes) -> bytes:
    """The key id of a v1 value, after checking framing. Raises InvalidCiphertext."""
    if len(blob) < MIN_SIZE:
        raise InvalidCiphertext("value too short to be carnet ciphertext")
    if blob[0] != VERSION:
        raise InvalidCiphertext(f"unknown format version {blob[0]}")
    return bytes(blob[1 : 1 + KEY_ID_SIZE])


def short_key_id(blob: bytes) -> str:
    """The first hex digits of a value's key id, for display ('?' when too short)."""
    return blob[1 : 1 + KEY_ID_SIZE].hex()[:12] if len(blob) > 1 + KEY_ID_SIZE else "?"


def text_head(value: str, n: int) -> str:
    """The first ``n`` base64 characters after the text prefix (a scan's cheap peek)."""
    return value[len(TEXT_PREFIX) : len(TEXT_PREFIX) + n]


class Sealer:
    """Seals values for one data key, field label and practice: the product's hot path.

    Built once per (practice, label) by the KeyManager and kept until the data
    key's cache entry expires (``expires``, a ``time.monotonic()`` deadline).
    Every :meth:`seal` draws a fresh random nonce; :meth:`_seal_with_nonce` is
    the seam the known-answer tests use.
    """

    __slots__ = ("_prefix", "_encrypt", "_aad", "expires")

    def __init__(
        self, key: Any, key_id: bytes, label: str, tenant: str, expires: float = float("inf")
    ) -> None:
        aead = key if hasattr(key, "encrypt") else cipher(key)
        self._prefix = VERSION_BYTE + key_id
        self._encrypt = aead.encrypt
        self._aad = associated_data(key_id, label, tenant)
        self.expires = expires

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return self._prefix + nonce + self._encrypt(nonce, plaintext, self._aad)

    def _seal_with_nonce(self, plaintext: bytes, nonce: bytes) -> bytes:
        return self._prefix + nonce + self._encrypt(nonce, plaintext, self._aad)

    def __repr__(self) -> str:
        return f"<carnet.envelope.Sealer key={self._prefix[1:].hex()[:12]}…>"


class Opener:
    """Opens values of one data key sealed for one field label and practice."""

    __slots__ = ("_decrypt", "_aad", "expires", "label", "tenant")

    def __init__(
        self, key: Any, key_id: bytes, label: str, tenant: str, expires: float = float("inf")
    ) -> None:
        aead = key if hasattr(key, "decrypt") else cipher(key)
        self._decrypt = aead.decrypt
        self._aad = associated_data(key_id, label, tenant)
        self.expires = expires
        self.label = label
        self.tenant = tenant

    def open(self, blob: bytes) -> bytes:
        """Decrypt a v1 value of this key; any other framing or a failed tag raises."""
        if len(blob) < MIN_SIZE or blob[0] != VERSION:
            key_id_of(blob)  # raises the precise InvalidCiphertext
        try:
            return self._decrypt(blob[_NONCE], blob[_BODY], self._aad)
        except AuthenticationFailed:
            raise InvalidCiphertext(label=self.label, tenant=self.tenant) from None

    def __repr__(self) -> str:
        return f"<carnet.envelope.Opener label={self.label!r} tenant={self.tenant!r}>"


def is_v1(blob: bytes) -> bool:
    """Whether ``blob`` is framed as a v1 value (long enough, version byte 1)."""
    return len(blob) >= MIN_SIZE and blob[0] == VERSION


def to_text(blob: bytes) -> str:
    return TEXT_PREFIX + base64.b64encode(blob).decode("ascii")


def looks_like_text_ciphertext(value: str) -> bool:
    """True when a TEXT value carries carnet's prefix. Used only in mixed-read mode and plans."""
    return value.startswith(TEXT_PREFIX)


def from_text(value: str) -> bytes:
    if not value.startswith(TEXT_PREFIX):
        raise InvalidCiphertext("text value lacks the carnet prefix")
    try:
        return base64.b64decode(value[len(TEXT_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCiphertext("text value is not valid base64") from None
