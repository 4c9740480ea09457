"""Ciphertext formats v2 (written) and v1 (read); see docs/format.md.

Binary form, v2::

    0x02 | key id (16) | label tag (4) | u16be len | practice (UTF-8) | nonce (12)
         | AES-256-GCM ciphertext || tag (16)

    label tag = the first 4 bytes of SHA-256(UTF-8 field label)

v1 (read only, upgraded by ``carnet reencrypt``)::

    0x01 | key id (16) | nonce (12) | AES-256-GCM ciphertext || tag (16)

Associated data (both versions; the version byte differs)::

    version (1) | key id (16) | u32be len | UTF-8 field label | u32be len | UTF-8 practice

v2 carries the practice and a tag of the field label in its header, in
clear, so that the database itself can compare them, byte for byte, with the
row's practice column and the column's label (CHECK constraints and
triggers, see :mod:`carnet.dbchecks`), whichever client wrote the row. The
header is authenticated through the associated data (the label and the
practice in full): a forged header fails the tag. Binding the label and the
practice means a value copied to another column or another practice's row
fails instead of yielding its text.

Text form, for TEXT columns::

    v2: "carnet:2:" + hex(key id) + ":" + hex(label tag) + ":" + hex(UTF-8 practice)
        + ":" + base64(nonce | ciphertext || tag)
    v1: "carnet:" + base64(binary form)

Lowercase hex in v2, so that SQLite, which has no base64 decoding, can
compare the key id and the practice with ``hex()``.

Random 96-bit nonces: NIST SP 800-38D limits one key to 2^32 random-nonce
encryptions; carnet's rotation policy keeps each data key far below that
(docs/format.md explains the margin).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from typing import Any

from ._aead import AuthenticationFailed, cipher
from .errors import InvalidCiphertext, TenantMismatch

VERSION = 2  # the version carnet writes
V1 = 1
VERSIONS = (V1, VERSION)
VERSION_BYTE = b"\x02"
V1_BYTE = b"\x01"
KEY_ID_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
LABEL_TAG_SIZE = 4
# v1: version, key id, nonce. v2 adds, after the key id, the label tag, a u16
# length and the practice.
V1_HEADER_SIZE = 1 + KEY_ID_SIZE + NONCE_SIZE
V1_MIN_SIZE = V1_HEADER_SIZE + TAG_SIZE
LABEL_TAG_AT = 1 + KEY_ID_SIZE
PRACTICE_AT = LABEL_TAG_AT + LABEL_TAG_SIZE + 2
# The shortest v2 value: a one-byte practice and the empty note.
MIN_SIZE = PRACTICE_AT + 1 + NONCE_SIZE + TAG_SIZE
MAX_PRACTICE_BYTES = 0xFFFF
# The bound column sizes are computed for: a practice id is at most 255
# characters (the key table's VARCHAR(255)), so at most 1020 UTF-8 bytes.
MAX_PRACTICE_CHARS = 255
PRACTICE_BOUND_BYTES = 4 * MAX_PRACTICE_CHARS
TEXT_PREFIX = "carnet:"
TEXT_PREFIX_V2 = "carnet:2:"

_u32 = struct.Struct(">I")
_u16 = struct.Struct(">H")
# Where a value's key id sits (both versions), for the hot path's lookup before
# any check: the Opener found under it checks the framing itself.
KEY_ID = slice(1, 1 + KEY_ID_SIZE)
LABEL_TAG = slice(LABEL_TAG_AT, LABEL_TAG_AT + LABEL_TAG_SIZE)
_LEN = slice(LABEL_TAG_AT + LABEL_TAG_SIZE, PRACTICE_AT)
_V1_NONCE = slice(1 + KEY_ID_SIZE, V1_HEADER_SIZE)
_V1_BODY = slice(V1_HEADER_SIZE, None)


def _version_byte(version: int) -> bytes:
    if version == VERSION:
        return VERSION_BYTE
    if version == V1:
        return V1_BYTE
    raise ValueError(f"unknown format version {version}")


def associated_data(key_id: bytes, label: str, tenant: str, version: int = VERSION) -> bytes:
    """The bytes authenticated with every value (not stored: rebuilt on read)."""
    if len(key_id) != KEY_ID_SIZE:
        raise ValueError("key id must be 16 bytes")
    label_b = label.encode("utf-8")
    tenant_b = tenant.encode("utf-8")
    return b"".join(
        (
            _version_byte(version),
            key_id,
            _u32.pack(len(label_b)),
            label_b,
            _u32.pack(len(tenant_b)),
            tenant_b,
        )
    )


def label_tag(label: str) -> bytes:
    """The v2 header's tag of a field label: the first 4 bytes of its SHA-256.

    Not a secret and not what authenticates (the associated data holds the
    label in full): it lets the database refuse a value copied from another
    column. Two labels share a tag with probability 2^-32; a value copied
    between two such columns passes the database's check and fails at read.
    """
    return hashlib.sha256(label.encode("utf-8")).digest()[:LABEL_TAG_SIZE]


def practice_field(tenant: str) -> bytes:
    """The v2 header's practice field: u16be length and the UTF-8 bytes."""
    raw = tenant.encode("utf-8")
    if not raw or len(raw) > MAX_PRACTICE_BYTES:
        raise ValueError("a practice id is 1 to 65535 UTF-8 bytes")
    return _u16.pack(len(raw)) + raw


def version_of(blob: bytes) -> int:
    """The format version of a well-framed value. Raises InvalidCiphertext otherwise."""
    if not blob:
        raise InvalidCiphertext("value too short to be carnet ciphertext")
    v = blob[0]
    if v == VERSION:
        if len(blob) < MIN_SIZE:
            raise InvalidCiphertext("value too short to be carnet ciphertext")
        n = _u16.unpack(blob[_LEN])[0]
        if n == 0 or len(blob) < PRACTICE_AT + n + NONCE_SIZE + TAG_SIZE:
            raise InvalidCiphertext("value too short to be carnet ciphertext")
        return v
    if v == V1:
        if len(blob) < V1_MIN_SIZE:
            raise InvalidCiphertext("value too short to be carnet ciphertext")
        return v
    raise InvalidCiphertext(f"unknown format version {v}")


def key_id_of(blob: bytes) -> bytes:
    """The key id of a v1 or v2 value, after checking framing. Raises InvalidCiphertext."""
    version_of(blob)
    return bytes(blob[KEY_ID])


def tenant_of(blob: bytes) -> str | None:
    """The practice a v2 value names in its header (None for v1, which names none).

    Metadata, not a secret (the row's practice column holds the same); it is
    authenticated, so trust it only once the value has opened.
    """
    if version_of(blob) == V1:
        return None
    n = _u16.unpack(blob[_LEN])[0]
    try:
        return bytes(blob[PRACTICE_AT : PRACTICE_AT + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCiphertext("value header names no valid practice") from None


def is_known(blob: bytes) -> bool:
    """Whether ``blob`` is framed as a value of a version carnet reads."""
    try:
        version_of(blob)
    except InvalidCiphertext:
        return False
    return True


def is_current(blob: bytes) -> bool:
    """Whether ``blob`` is a well-framed value of the version carnet writes (v2)."""
    return is_known(blob) and blob[0] == VERSION


def width(note_bytes: int, practice_bytes: int, *, text: bool = False) -> int:
    """Bytes (binary form) or characters (``text``: text form) of a v2 value.

    For a note of ``note_bytes`` and a practice id of ``practice_bytes`` UTF-8
    bytes; column sizes pass :data:`PRACTICE_BOUND_BYTES`, the longest practice.
    """
    body = NONCE_SIZE + note_bytes + TAG_SIZE
    if not text:
        return PRACTICE_AT + practice_bytes + body
    return (
        len(TEXT_PREFIX_V2)
        + 2 * KEY_ID_SIZE
        + 1
        + 2 * LABEL_TAG_SIZE
        + 1
        + 2 * practice_bytes
        + 1
        + 4 * ((body + 2) // 3)
    )


def overhead(tenant: str) -> int:
    """Bytes a v2 value adds to its note in binary form (header and tag)."""
    return width(0, len(tenant.encode("utf-8")))


def text_length(tenant: str, note_bytes: int) -> int:
    """Characters of a v2 value in text form, for a note of ``note_bytes`` UTF-8 bytes."""
    return width(note_bytes, len(tenant.encode("utf-8")), text=True)


def head_key_id(blob: bytes) -> bytes | None:
    """The key id a binary value names in its head (v1 or v2), without checking the rest.

    A truncated or damaged value still names its key (for a key's usage
    count); None when the head is not carnet's.
    """
    if len(blob) > KEY_ID_SIZE and blob[0] in VERSIONS:
        return bytes(blob[KEY_ID])
    return None


def short_key_id(blob: bytes) -> str:
    """The first hex digits of a value's key id, for display ('?' when too short)."""
    return blob[1 : 1 + KEY_ID_SIZE].hex()[:12] if len(blob) > 1 + KEY_ID_SIZE else "?"


class Sealer:
    """Seals values for one data key, field label and practice: the product's hot path.

    Built once per (practice, label) by the KeyManager and kept until the data
    key's cache entry expires (``expires``, a ``time.monotonic()`` deadline).
    ``live`` True says that deadline is still ahead without reading the clock
    (the key cache's :class:`~carnet.cache.DeadlineWatch` ends it); False says
    nothing, and a caller then compares ``expires`` with the clock.
    Every :meth:`seal` draws a fresh random nonce; :meth:`_seal_with_nonce` is
    the seam the known-answer tests use.
    """

    __slots__ = ("_prefix", "_encrypt", "_aad", "expires", "live", "__weakref__")

    def __init__(
        self, key: Any, key_id: bytes, label: str, tenant: str, expires: float = float("inf")
    ) -> None:
        aead = key if hasattr(key, "encrypt") else cipher(key)
        self._prefix = VERSION_BYTE + key_id + label_tag(label) + practice_field(tenant)
        self._encrypt = aead.encrypt
        self._aad = associated_data(key_id, label, tenant)
        self.expires = expires
        # Set by the key cache's deadline watch while it vouches that ``expires``
        # is ahead (carnet.cache.DeadlineWatch); False: read the clock.
        self.live = False

    def seal(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return self._prefix + nonce + self._encrypt(nonce, plaintext, self._aad)

    def _seal_with_nonce(self, plaintext: bytes, nonce: bytes) -> bytes:
        return self._prefix + nonce + self._encrypt(nonce, plaintext, self._aad)

    def __repr__(self) -> str:
        return f"<carnet.envelope.Sealer key={self._prefix[1:17].hex()[:12]}…>"


class Opener:
    """Opens values of one data key sealed for one field label and practice.

    A v2 value names its practice in its header: one that names another
    practice raises :class:`TenantMismatch` before any decryption.
    """

    __slots__ = (
        "_decrypt",
        "_aad",
        "_aad_v1",
        "_head",
        "_body",
        "_nonce_end",
        "_min_size",
        "expires",
        "live",
        "label",
        "tenant",
        "__weakref__",
    )

    def __init__(
        self, key: Any, key_id: bytes, label: str, tenant: str, expires: float = float("inf")
    ) -> None:
        aead = key if hasattr(key, "decrypt") else cipher(key)
        self._decrypt = aead.decrypt
        self._aad = associated_data(key_id, label, tenant)
        self._aad_v1 = associated_data(key_id, label, tenant, V1)
        # The whole v2 header of a value of this key, label and practice: one
        # comparison checks the version, key id, label tag and practice.
        self._head = VERSION_BYTE + key_id + label_tag(label) + practice_field(tenant)
        self._body = len(self._head)  # where the nonce starts
        self._nonce_end = self._body + NONCE_SIZE
        self._min_size = self._nonce_end + TAG_SIZE
        self.expires = expires
        self.live = False  # as Sealer.live
        self.label = label
        self.tenant = tenant

    def open(self, blob: bytes) -> bytes:
        """Decrypt a value of this key; any other framing, practice or a failed tag raises."""
        at = self._body
        if blob[:at] == self._head:
            if len(blob) < self._min_size:
                raise InvalidCiphertext("value too short to be carnet ciphertext")
            nonce_end = self._nonce_end
            aad = self._aad
            nonce, body = blob[at:nonce_end], blob[nonce_end:]
        elif blob[:1] == VERSION_BYTE and blob[KEY_ID] != self._head[KEY_ID]:
            raise InvalidCiphertext("value sealed under another key", label=self.label)
        elif version_of(blob) == V1:
            aad = self._aad_v1
            nonce, body = blob[_V1_NONCE], blob[_V1_BODY]
        elif tenant_of(blob) == self.tenant:
            # A well-framed v2 value of this practice sealed for another field.
            raise InvalidCiphertext(
                "value sealed for another field", label=self.label, tenant=self.tenant
            )
        else:
            # A well-framed v2 value naming another practice.
            raise TenantMismatch(self.tenant, tenant_of(blob) or "?")
        try:
            return self._decrypt(nonce, body, aad)
        except AuthenticationFailed:
            raise InvalidCiphertext(label=self.label, tenant=self.tenant) from None

    def open_text(self, blob: bytes) -> str | None:
        """The read hot path: a text value of this opener's key, label and practice,
        decrypted and decoded in one frame; ``None`` when ``blob`` is not framed as
        one (a caller holding this opener for another value then looks up its own,
        or :meth:`open` says what is wrong with it). A failed tag raises."""
        at = self._body
        if blob[:at] != self._head or len(blob) < self._min_size:
            return None
        nonce_end = self._nonce_end
        try:
            plain = self._decrypt(blob[at:nonce_end], blob[nonce_end:], self._aad)
        except AuthenticationFailed:
            raise InvalidCiphertext(label=self.label, tenant=self.tenant) from None
        return plain.decode("utf-8")

    def parts(self) -> tuple[bytes, int, int, int, Any, bytes]:
        """What :meth:`open_text` uses, for a caller that inlines it on its hot path
        (the column type's result processor, the ORM's row getter): the whole v2
        header, where the nonce starts and ends, the shortest value, the AEAD's
        decrypt and the associated data. The caller must check the header as
        :meth:`open_text` does and that the opener is unexpired (:attr:`live`,
        else :attr:`expires` against the clock), and turn a failed tag into
        :class:`InvalidCiphertext`, and the length too: either compare it with
        the shortest value, or turn the AEAD's ``ValueError`` (a nonce cut short)
        into :class:`InvalidCiphertext` as a failed tag is."""
        return self._head, self._body, self._nonce_end, self._min_size, self._decrypt, self._aad

    def __repr__(self) -> str:
        return f"<carnet.envelope.Opener label={self.label!r} tenant={self.tenant!r}>"


def from_binary(value: object, label: str | None = None) -> bytes:
    """The bytes of a value read from a binary column. Raises InvalidCiphertext.

    Drivers hand back bytes (or a memoryview); anything else was written
    around carnet: SQLite's type affinity lets a BLOB column hold text, so
    plaintext inserted by hand comes back as ``str``. It is not carnet
    ciphertext, and is refused as such, never converted.
    """
    if type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InvalidCiphertext("value is not carnet ciphertext (not binary)", label=label)


def to_text(blob: bytes) -> str:
    """The text form of a binary value (v2 spells out its key id and practice in hex)."""
    if blob[:1] == VERSION_BYTE:
        at = PRACTICE_AT + _u16.unpack(blob[_LEN])[0]
        return (
            f"{TEXT_PREFIX_V2}{blob[KEY_ID].hex()}:{blob[LABEL_TAG].hex()}:"
            f"{blob[PRACTICE_AT:at].hex()}:" + base64.b64encode(blob[at:]).decode("ascii")
        )
    return TEXT_PREFIX + base64.b64encode(blob).decode("ascii")


def looks_like_text_ciphertext(value: str) -> bool:
    """True when a TEXT value carries carnet's prefix. Used only in mixed-read mode and plans."""
    return value.startswith(TEXT_PREFIX)


_HEX = frozenset("0123456789abcdef")


def _is_lower_hex(part: str) -> bool:
    return len(part) % 2 == 0 and _HEX.issuperset(part)


def from_text(value: str) -> bytes:
    """The binary value of a text form (v1 or v2). Raises InvalidCiphertext."""
    if value.startswith(TEXT_PREFIX_V2):
        parts = value.split(":")
        # Lowercase hex only: one spelling per value, the one the database compares.
        if (
            len(parts) != 6
            or len(parts[2]) != 2 * KEY_ID_SIZE
            or len(parts[3]) != 2 * LABEL_TAG_SIZE
            or not _is_lower_hex(parts[2])
            or not _is_lower_hex(parts[3])
            or not _is_lower_hex(parts[4])
        ):
            raise InvalidCiphertext("text value is not carnet's v2 text form")
        try:
            key_id = bytes.fromhex(parts[2])
            tag = bytes.fromhex(parts[3])
            tenant = bytes.fromhex(parts[4])
            body = base64.b64decode(parts[5], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidCiphertext("text value is not carnet's v2 text form") from None
        if not tenant or len(tenant) > MAX_PRACTICE_BYTES:
            raise InvalidCiphertext("text value names no valid practice")
        return VERSION_BYTE + key_id + tag + _u16.pack(len(tenant)) + tenant + body
    if not value.startswith(TEXT_PREFIX):
        raise InvalidCiphertext("text value lacks the carnet prefix")
    try:
        return base64.b64decode(value[len(TEXT_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidCiphertext("text value is not valid base64") from None


def text_key_id(value: str) -> bytes | None:
    """The key id of a text-form value, read from its head without decoding the rest."""
    try:
        if value.startswith(TEXT_PREFIX_V2):
            head = value[len(TEXT_PREFIX_V2) : len(TEXT_PREFIX_V2) + 2 * KEY_ID_SIZE]
            if len(head) != 2 * KEY_ID_SIZE or not _is_lower_hex(head):
                return None
            return bytes.fromhex(head)
        if value.startswith(TEXT_PREFIX):
            # 24 base64 characters: the first 18 bytes (version and key id).
            raw = base64.b64decode(value[len(TEXT_PREFIX) : len(TEXT_PREFIX) + 24], validate=True)
            return head_key_id(raw) if raw[:1] == V1_BYTE else None
    except (binascii.Error, ValueError):
        return None
    return None
