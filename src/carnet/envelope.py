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

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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


def _seal_with_nonce(
    cipher: AESGCM, key_id: bytes, nonce: bytes, plaintext: bytes, aad: bytes
) -> bytes:
    # Seam for known-answer tests; the public path always draws a fresh nonce.
    return b"".join((VERSION_BYTE, key_id, nonce, cipher.encrypt(nonce, plaintext, aad)))


def seal(cipher: AESGCM, key_id: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under a data key with a fresh random nonce."""
    return _seal_with_nonce(cipher, key_id, os.urandom(NONCE_SIZE), plaintext, aad)


def open_(cipher: AESGCM, blob: bytes, aad: bytes) -> bytes:
    """Decrypt a v1 value whose framing was checked by :func:`key_id_of`."""
    try:
        return cipher.decrypt(blob[1 + KEY_ID_SIZE : HEADER_SIZE], blob[HEADER_SIZE:], aad)
    except InvalidTag:
        raise InvalidCiphertext() from None


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
