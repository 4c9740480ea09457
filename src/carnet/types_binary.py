"""``EncryptedBytes`` and ``EncryptedJSON``: documents and structured values.

Both are :class:`~carnet.types.EncryptedText` subclasses whose plaintext
encoding differs, as ``EncryptedDate``'s does: every path of a text column
(the ORM flush, Core ``executemany``, the write guard's per-row practice
binding, the SQL guard, the database checks, ``carnet reencrypt``, ``carnet
verify``) works on the sealed value, which has carnet's one format; only the
plaintext inside differs.

- :class:`EncryptedBytes`: raw bytes (a scanned letter, a PDF, an image),
  sealed as one AES-256-GCM value of at most :data:`MAX_BYTES`. It is opened
  whole: ``cryptography`` checks the tag before it returns any plaintext, so
  no byte of a forged or truncated document ever reaches the application.
- :class:`EncryptedJSON`: a ``dict`` or ``list``, sealed as its canonical
  JSON (:func:`canonical_json`). Declare it with SQLAlchemy's mutation
  tracking (``MutableDict.as_mutable(EncryptedJSON(...))``) for in-place
  changes to be saved.

Inside carnet's pipeline a value travels as text, the form a row's practice
is bound to (:class:`~carnet.values.BoundText`): for bytes, their Latin-1
reading (one character per byte, so the bytes come back exactly); for JSON,
its canonical text. ``plaintext()`` gives that form, and refuses a plain
``str``: a string is neither a document nor a JSON object.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.sql.elements import ClauseElement

from .context import get_manager
from .errors import ConfigurationError, InvalidCiphertext, InvalidPlaintext
from .types import EncryptedText, Storage
from .values import Sealed

if TYPE_CHECKING:
    from .manager import KeyManager

MAX_BYTES = 7 * 1024 * 1024 + 512 * 1024
"""Largest document :class:`EncryptedBytes` stores: 7.5 MiB (7,864,320 bytes).

MariaDB refuses a statement larger than ``max_allowed_packet``, 16 MiB by
default (MariaDB 10.11). A sealed document is its plaintext plus at most
1,081 bytes of header and tag, and PyMySQL (carnet's MariaDB driver) sends
binary values inside the statement in hexadecimal (``_binary X'...'``), two
characters per byte: 15.0 MiB for the largest document. That leaves about
1 MiB for the rest of the statement and the row's other values. PostgreSQL
and SQLite take far larger values; the limit is the same everywhere, so an
application moved between databases keeps working.
"""

_BYTES_TYPES = (bytes, bytearray, memoryview)


def _passes(value: Any) -> bool:
    # What the write guard's own checks name better: NULL, a Sealed value
    # written back, an SQL expression.
    return value is None or isinstance(value, Sealed | ClauseElement)


class EncryptedBytes(EncryptedText):
    """Raw bytes (documents, images) sealed as one AES-256-GCM value.

    ``max_bytes`` (default and ceiling :data:`MAX_BYTES`, 7.5 MiB): a larger
    value raises :class:`~carnet.errors.InvalidPlaintext` before anything is
    encrypted or sent. The column is ``LONGBLOB`` on MariaDB, ``BYTEA`` on
    PostgreSQL, ``BLOB`` on SQLite; binary storage only (a text form would
    be a third larger). A value reads back as ``bytes``, opened whole after
    its tag is checked.
    """

    cache_ok = True
    text_values = False

    def __init__(
        self,
        tenant: str | None = None,
        *,
        label: str | None = None,
        max_bytes: int = MAX_BYTES,
        manager: KeyManager | None = None,
    ) -> None:
        if (
            not isinstance(max_bytes, int)
            or isinstance(max_bytes, bool)
            or not 1 <= max_bytes <= MAX_BYTES
        ):
            raise ConfigurationError(f"EncryptedBytes: max_bytes must be from 1 to {MAX_BYTES}")
        super().__init__(tenant, label=label, manager=manager)
        self.max_bytes = max_bytes

    @property
    def python_type(self) -> type:
        return bytes

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.LONGBLOB())
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        return dialect.type_descriptor(sa.LargeBinary())

    def _checked(self, value: Any) -> bytes | memoryview:
        if isinstance(value, str):
            # The pipeline's own form of a document (see the module docstring).
            if len(value) > self.max_bytes:
                raise InvalidPlaintext(f"{self.field_label}: document over {self.max_bytes} bytes")
            try:
                return value.encode("latin-1")
            except UnicodeEncodeError:
                raise InvalidPlaintext(f"{self.field_label}: not a document's bytes") from None
        data: bytes | memoryview = value
        if not isinstance(value, bytes):
            try:
                data = memoryview(value).cast("B")
            except (TypeError, ValueError):  # a non-contiguous or multi-dimensional view
                data = bytes(memoryview(value).tobytes())
        if len(data) > self.max_bytes:
            # The size only: a document's content never enters an error.
            raise InvalidPlaintext(
                f"{self.field_label}: document of {len(data)} bytes over the "
                f"{self.max_bytes}-byte limit; nothing was written"
            )
        return data

    def plaintext(self, value: Any) -> Any:
        """The pipeline's form of a document: its bytes read as Latin-1 (checked for size)."""
        if _passes(value):
            return value
        if isinstance(value, _BYTES_TYPES):
            return bytes(self._checked(value)).decode("latin-1")
        raise InvalidPlaintext(
            f"{self.field_label} stores bytes, not {type(value).__name__}; nothing was written"
        )

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if isinstance(value, _BYTES_TYPES):
            value = self.plaintext(value)
        elif type(value) is str:
            raise InvalidPlaintext(f"{self.field_label} stores bytes, not str")
        return super().process_bind_param(value, dialect)

    def encrypt(self, value: Any, tenant: str, manager: KeyManager | None = None) -> bytes:
        data = self._checked(value)
        if manager is None:
            manager = self._manager if self._manager is not None else get_manager()
        return manager.encrypt(bytes(data), tenant=tenant, label=self._label_or_fail())

    def decrypt(  # type: ignore[override]
        self, blob: bytes, tenant: str, manager: KeyManager | None = None
    ) -> bytes:
        if manager is None:
            manager = self._manager if self._manager is not None else get_manager()
        # AESGCM.decrypt checks the tag over the whole value before it
        # returns: nothing of a forged or cut document is ever released.
        return manager.decrypt(blob, tenant=tenant, label=self._label_or_fail())

    def __repr__(self) -> str:
        return (
            f"EncryptedBytes(tenant={self.tenant!r}, label={self.field_label!r}, "
            f"max_bytes={self.max_bytes})"
        )


def canonical_json(value: Any) -> str:
    """The canonical JSON text of a ``dict`` or ``list``, as :class:`EncryptedJSON` seals it.

    Canonical here means: object keys sorted (by code point), no whitespace
    between tokens (``","`` and ``":"``), non-ASCII characters as themselves
    (UTF-8 once sealed) rather than ``\\u`` escapes, and no ``NaN`` or
    ``Infinity`` (not JSON). Keys must be strings and containers dicts and
    lists: a value that would not read back equal (a tuple, an integer key
    JSON would turn into a string) is refused rather than changed.

    One value thus has one plaintext, whoever wrote it: its sealed length
    depends on its content alone, migrated rows compare equal to rows the
    application wrote, and the known-answer vectors are reproducible. It is
    not RFC 8785 (JCS), whose key order (UTF-16 code units) and number forms
    differ for some values.
    """
    if not isinstance(value, dict | list):
        raise InvalidPlaintext(f"EncryptedJSON stores a dict or a list, not {type(value).__name__}")
    failure: InvalidPlaintext | None = None
    try:
        text = json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        if json.loads(text) != value:
            failure = InvalidPlaintext(
                "value does not read back equal from JSON (a tuple, or a key that is not a str)"
            )
    except (TypeError, ValueError, RecursionError) as exc:
        # The exception's text may quote a key or a value: its class only.
        failure = InvalidPlaintext(f"value is not JSON ({type(exc).__name__})")
    if failure is not None:
        raise failure  # outside the except block: no chained message
    return text


class EncryptedJSON(EncryptedText):
    """A ``dict`` or ``list`` sealed as its canonical JSON (:func:`canonical_json`).

    Declare it with mutation tracking so that an in-place change (``row.data
    ["k"] = v``, ``row.items.append(v)``) marks the row dirty and is saved::

        from sqlalchemy.ext.mutable import MutableDict
        data = mapped_column(MutableDict.as_mutable(EncryptedJSON(tenant="practice_id")))

    (``MutableList`` for a list; nested containers are not tracked: assign
    the top-level value again after changing one.) The column is ``LONGBLOB``
    / ``BYTEA`` / ``BLOB`` (``storage="binary"``) or, for an in-place
    migration, the text form (``storage="text"``).
    """

    cache_ok = True
    text_values = False

    def __init__(
        self,
        tenant: str | None = None,
        *,
        label: str | None = None,
        storage: Storage = "binary",
        mixed_read: bool = False,
        manager: KeyManager | None = None,
    ) -> None:
        if mixed_read:
            # A legacy value would come back as its raw text, not a dict or list.
            raise ConfigurationError(
                "EncryptedJSON takes no mixed_read: migrate a JSON column with "
                "carnet migrate --into (expand/contract)"
            )
        super().__init__(tenant, label=label, storage=storage, manager=manager)

    @property
    def python_type(self) -> type:
        return dict

    def plaintext(self, value: Any) -> Any:
        """The pipeline's form of a value: its canonical JSON text."""
        if _passes(value):
            return value
        if isinstance(value, dict | list):
            return canonical_json(value)
        raise InvalidPlaintext(
            f"{self.field_label} stores a dict or a list, not {type(value).__name__}; "
            "nothing was written"
        )

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if isinstance(value, dict | list):
            value = canonical_json(value)
        elif type(value) is str:
            raise InvalidPlaintext(f"{self.field_label} stores a dict or a list, not str")
        return super().process_bind_param(value, dialect)

    def encrypt(self, value: Any, tenant: str, manager: KeyManager | None = None) -> bytes:
        if isinstance(value, dict | list):
            value = canonical_json(value)
        elif not (isinstance(value, str) and value[:1] in ("{", "[")):
            # Only this type's own canonical text travels as a str (module docstring).
            raise InvalidPlaintext(f"{self.field_label} stores a dict or a list")
        return super().encrypt(value, tenant, manager)

    def decrypt(  # type: ignore[override]
        self, blob: bytes, tenant: str, manager: KeyManager | None = None
    ) -> dict[str, Any] | list[Any]:
        text = super().decrypt(blob, tenant, manager)
        value: Any = None
        try:
            value = json.loads(text)
        except ValueError:
            pass
        if not isinstance(value, dict | list):
            # Authentic, yet not JSON: written by another type under this label.
            # Raised outside the except block, whose error quotes the text.
            raise InvalidCiphertext("value is not a JSON object or array", label=self.field_label)
        return value

    def __repr__(self) -> str:
        return (
            f"EncryptedJSON(tenant={self.tenant!r}, label={self.field_label!r}, "
            f"storage={self.storage!r})"
        )
