"""Blind-index keys and values (docs/searchable.md, docs/format.md).

::

    index key   = HKDF-SHA256(IKM = the practice's index root key, salt = none,
                              info = info(label, index, tenant), L = 32)
    info        = "carnet-bidx" | 0x01 | u32be len | label | u32be len | index | u32be len | tenant
    index value = leftmost ``bits`` bits of HMAC-SHA256(index key, UTF-8 of the normalised
                  value), read as a big-endian unsigned integer (0 <= value < 2**bits)

Each (practice, column, index) gets its own key, so equal values in two
practices, or under two indexes of one column, give unrelated index values.
The root is not the data key: rotating a data key leaves every index valid.
The root key is 32 random bytes, a uniformly random HKDF input, so the
extract step needs no salt (RFC 5869, section 3.1).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ConfigurationError, InvalidPlaintext

if TYPE_CHECKING:
    from .manager import IndexRoot

VERSION = 1
INFO_MAGIC = b"carnet-bidx"
MAX_BITS = 63  # stored in a signed 64-bit integer column on every backend
KEY_SIZE = 32

_u32 = struct.Struct(">I")


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ConfigurationError(f"bits must be an integer from 1 to {MAX_BITS}")
    return bits


def info(label: str, index: str, tenant: str) -> bytes:
    """The HKDF info string: unambiguous (length-prefixed), versioned."""
    parts = [INFO_MAGIC, bytes([VERSION])]
    for field in (label, index, tenant):
        b = field.encode("utf-8")
        parts += [_u32.pack(len(b)), b]
    return b"".join(parts)


def derive_key(root: bytes, label: str, index: str, tenant: str) -> bytes:
    """The 32-byte key of one blind index of one practice."""
    if len(root) != KEY_SIZE:
        raise ConfigurationError("an index root key is 32 bytes")
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info(label, index, tenant)
    ).derive(root)


def value_with_key(key: bytes, normalised: str, bits: int) -> int:
    """Index value of an already normalised string under a derived index key."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(normalised.encode("utf-8"))
    return int.from_bytes(h.finalize()[:8], "big") >> (64 - bits)


def _hmac_base(root: IndexRoot, label: str, index: str, tenant: str) -> hmac.HMAC:
    k = (label, index, tenant)
    base = root.derived.get(k)
    if base is None:
        base = hmac.HMAC(derive_key(root.secret, label, index, tenant), hashes.SHA256())
        root.derived[k] = base
    return base


def index_value(
    root: IndexRoot, normalised: str, *, label: str, index: str, tenant: str, bits: int
) -> int:
    """Index value of ``normalised`` under ``root`` (the derived key is cached on the root)."""
    try:
        data = normalised.encode("utf-8")
    except UnicodeEncodeError:
        # The exception object holds the whole string: drop it.
        raise InvalidPlaintext("value is not valid Unicode (lone surrogate)") from None
    h = _hmac_base(root, label, index, tenant).copy()
    h.update(data)
    return int.from_bytes(h.finalize()[:8], "big") >> (64 - bits)
