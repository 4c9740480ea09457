"""``EncryptedText``: the SQLAlchemy column type.

The type sees only a value and a dialect. The tenant that picks the data key
comes from the row (ORM events in :mod:`carnet.orm` bind it to the value
before a flush, and open loaded values with the row's tenant) or from
:func:`carnet.tenant_scope` (Core). A value read with no tenant at hand is
returned as an opaque :class:`Sealed`, never as bytes that look like text.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.sql import operators
from sqlalchemy.sql.base import SchemaEventTarget
from sqlalchemy.sql.elements import BindParameter, ColumnElement, Null
from sqlalchemy.types import TypeDecorator

from . import _sa, envelope
from ._aead import AuthenticationFailed
from .context import EPOCH as _EPOCH
from .context import SCOPE as _tenant
from .context import get_manager, manager_for
from .envelope import NONCE_SIZE
from .errors import (
    CarnetError,
    ConfigurationError,
    InvalidCiphertext,
    InvalidPlaintext,
    TenantMismatch,
    TenantRequired,
    UnsupportedOperation,
)
from .values import BoundText, ParentPractice, Sealed

_KEY_ID = envelope.KEY_ID

if TYPE_CHECKING:
    from .manager import KeyManager

Storage = Literal["binary", "text"]


def encrypted_type(obj: Any, dialect: str | None = None) -> EncryptedText | None:
    """The :class:`EncryptedText` behind a column, SQL expression or type, else None.

    The one answer to "is this column encrypted?", used by the SQL guard,
    the write guard, the ORM setup, the redaction of failed statements and
    the database checks: it sees through ``TypeDecorator(impl=EncryptedText)``,
    ``with_variant`` (for ``dialect``, a dialect name; without one, the type
    every other dialect gets), ``type_coerce`` to a carnet type and the
    searchable types, on a column of any ``Table`` object.
    """
    typ = getattr(obj, "type", obj)
    for _ in range(16):  # types nest a few levels at most; a cycle must not hang
        if not isinstance(typ, sa.types.TypeEngine):
            return None
        # A variant for this dialect comes first, even on an EncryptedText.
        if dialect is not None:
            variants = _sa.variant_mapping(typ)
            if variants and dialect in variants:
                typ = variants[dialect]
                continue
        if isinstance(typ, EncryptedText):
            return typ
        if isinstance(typ, TypeDecorator):
            typ = typ.impl_instance
            continue
        return None
    raise ConfigurationError("a column type nests more than 16 levels: cannot tell if encrypted")


def encrypted_anywhere(obj: Any) -> EncryptedText | None:
    """The encrypted type of ``obj`` on the default dialect or on any ``with_variant`` one."""
    typ = getattr(obj, "type", obj)
    found = encrypted_type(typ)
    if found is not None or not isinstance(typ, sa.types.TypeEngine):
        return found
    for variant in (_sa.variant_mapping(typ) or {}).values():
        found = encrypted_anywhere(variant)
        if found is not None:
            return found
    if isinstance(typ, TypeDecorator):
        return encrypted_anywhere(typ.impl_instance)
    return None


_ALLOWED_OPS = {operators.is_, operators.is_not}


def _legacy_read(hook: Any, tenant: str | None, label: str | None) -> None:
    # An auditor tells legacy plaintext reads apart (``legacy_read``); any
    # other decrypt hook sees them as decryptions. The tenant is the scope's,
    # when there is one: in an ORM read the row's is not known here.
    getattr(hook, "legacy_read", hook)(tenant or "<unknown>", label or "<unknown>", 1)


def _is_column(other: Any) -> bool:
    # ORM attributes (Note.body, aliased(Note).body) stand for their column.
    clause_element = getattr(other, "__clause_element__", None)
    if clause_element is not None and not isinstance(other, ColumnElement):
        other = clause_element()
    return isinstance(other, ColumnElement) and not isinstance(other, BindParameter | Null)


class EncryptedText(TypeDecorator["str | Sealed"], SchemaEventTarget):
    """A text column stored encrypted with AES-256-GCM under a per-tenant data key.

    ``tenant``: name of the mapped attribute holding the row's tenant id (ORM).
    ``label``: the field label bound into every value (default ``table.column``);
    set it explicitly to keep values readable across a table or column rename.
    ``storage``: ``"binary"`` (BYTEA / BLOB / LONGBLOB, default) or ``"text"``
    (prefixed base64 in a TEXT column, for in-place migration).
    ``mixed_read``: during a migration only, return values that lack carnet's
    prefix as legacy plaintext (counted in ``KeyManager.stats()``) instead of
    raising. ``manager``: a KeyManager; default: the one given to
    :func:`carnet.configure`, looked up at use, not at import.

    A Core read outside a :func:`carnet.tenant_scope` returns
    :class:`Sealed` placeholders, never text: the column's Python type is
    ``str | Sealed``, so a type checker makes the caller handle both.
    """

    impl = sa.LargeBinary
    cache_ok = True
    # Whether a plain str is a value of this type. False for EncryptedBytes
    # and EncryptedJSON: the write guard then hands every value not yet bound
    # to a practice to plaintext(), which refuses a str.
    text_values: ClassVar[bool] = True

    def __init__(
        self,
        tenant: str | None = None,
        *,
        label: str | None = None,
        storage: Storage = "binary",
        mixed_read: bool = False,
        manager: KeyManager | None = None,
    ) -> None:
        super().__init__()
        if storage not in ("binary", "text"):
            raise ConfigurationError("storage must be 'binary' or 'text'")
        if mixed_read and storage != "text":
            raise ConfigurationError("mixed_read applies to storage='text' columns only")
        # These names match __init__ parameters and so enter SQLAlchemy's
        # statement cache key: only immutable strings/bools here. The manager
        # (mutable, holds keys) lives on a private attribute.
        self.tenant = tenant
        self.label = label
        self.storage = storage
        self.mixed_read = mixed_read
        self._manager = manager
        self._auto_label: str | None = None
        self._resolved_label: str | None = label
        self._from_copy = False
        # The practice column's key when the ORM attribute named by ``tenant``
        # maps to a column of another name (set at mapper configuration).
        self._tenant_column: str | None = None
        # For a practice on a parent row (``tenant="patient.practice_id"``).
        self._tenant_path: ParentPractice | None = None

    # -- schema attachment: learn table.column for the default label ----------------

    def _set_parent(self, parent: Any, outer: bool = False, **kw: Any) -> None:
        # SQLAlchemy's SchemaEventTarget protocol: told of the column, then of its table.
        _sa.on_table_attach(parent, self._set_table)

    def _set_table(self, column: sa.Column[Any], table: sa.Table) -> None:
        # carnet's hooks are installed when an encrypted column meets a table,
        # before any mapper of that table can be configured; and the database
        # checks of the tenant invariant come with the table (created right
        # after CREATE TABLE: carnet.dbchecks).
        from . import _hooks, dbchecks

        _hooks.install()
        dbchecks.attach(table)
        if column.server_default is not None or column.server_onupdate is not None:
            # The database would fill it in clear, never through carnet.
            raise ConfigurationError(
                f"{table.name}.{column.name}: an encrypted column cannot have a server_default "
                "or server_onupdate (the database would store it in clear); use default= "
                "(sealed for the row's practice like any value) or leave it NULL"
            )
        auto = f"{table.name}.{column.name}"
        if self._from_copy:
            # Column._copy() (mixins, to_metadata) attaches a copy to another table.
            self._from_copy = False
        elif self._auto_label is not None and self._auto_label != auto and self.label is None:
            raise ConfigurationError(
                f"one EncryptedText instance is shared by {self._auto_label} and {auto}: "
                "give each column its own EncryptedText(), or an explicit label="
            )
        self._auto_label = auto
        if self.label is None:
            self._resolved_label = auto

    def copy(self, **kw: Any) -> EncryptedText:
        # The one copy path of every carnet column type (SQLAlchemy copies a
        # type for the per-dialect implementation, and with Column._copy for
        # mixins and to_metadata): the instance's own settings, the label
        # learnt at attachment and where the row's practice is, all kept.
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        new._from_copy = True
        return new

    @property
    def tenant_column_name(self) -> str | None:
        """Key of the column holding the row's practice, or None (the scope decides)."""
        return self._tenant_column if self._tenant_column is not None else self.tenant

    @property
    def own_manager(self) -> KeyManager | None:
        """The manager given to this column (``EncryptedText(manager=...)``), else None."""
        return self._manager

    @property
    def tenant_path(self) -> ParentPractice | None:
        """Set by the ORM for ``tenant="parent.column"``: where the row's practice is."""
        return self._tenant_path

    def resolve_tenant(
        self, *, column: str | None = None, path: ParentPractice | None = None
    ) -> None:
        """Record where the row's practice is, as the ORM resolved it at mapper configuration."""
        if column is not None:
            self._tenant_column = column
        if path is not None:
            self._tenant_path = path

    @property
    def field_label(self) -> str | None:
        return self.label if self.label is not None else self._auto_label

    def _label_or_fail(self) -> str:
        label = self.label if self.label is not None else self._auto_label
        if label is None:
            raise ConfigurationError(
                "EncryptedText is not attached to a table column: give it label='table.column'"
            )
        return label

    @property
    def manager(self) -> KeyManager:
        """This column's manager, else the process default (see :meth:`manager_for`)."""
        return self._manager if self._manager is not None else get_manager()

    def manager_for(self, dialect: sa.Dialect | None) -> KeyManager:
        """The manager for a statement on an engine: the column's own, the one bound to
        that engine (``keys.bind(engine)``), or the process default."""
        return self._manager if self._manager is not None else manager_for(dialect)

    def __repr__(self) -> str:
        return (
            f"EncryptedText(tenant={self.tenant!r}, label={self.field_label!r}, "
            f"storage={self.storage!r})"
        )

    # -- storage per dialect ----------------------------------------------------------

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if self.storage == "text":
            if dialect.name in ("mysql", "mariadb"):
                return dialect.type_descriptor(mysql.LONGTEXT())
            return dialect.type_descriptor(sa.Text())
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.LONGBLOB())
        return dialect.type_descriptor(sa.LargeBinary())

    # -- values ---------------------------------------------------------------------------

    # Hot paths: per value, no property lookups beyond the two attributes below.

    def plaintext(self, value: Any) -> Any:
        """The text this type seals for ``value`` (subclasses: a date's ISO form)."""
        return value

    def check_scope(self, tenant: str, manager: KeyManager | None = None) -> None:
        """In strict mode (``require_scope``), an application read needs a scope of ``tenant``."""
        if manager is None:
            manager = self.manager
        if manager.require_scope:
            scope = _tenant.get()
            if scope is None:
                raise TenantRequired(
                    f"reading {self.field_label}: require_scope is on and no tenant_scope is "
                    "active (a scope entered in another context, such as a sync dependency "
                    "run in a thread pool, is lost)"
                )
            if scope != tenant:
                raise TenantMismatch(scope, tenant)

    def encrypt(self, value: str, tenant: str, manager: KeyManager | None = None) -> bytes:
        label = self._resolved_label
        if label is None:
            label = self._label_or_fail()
        if manager is None:
            manager = self._manager if self._manager is not None else get_manager()
        return manager._seal_text(value, tenant, label)

    def decrypt(self, blob: bytes, tenant: str, manager: KeyManager | None = None) -> str:
        label = self._resolved_label
        if label is None:
            label = self._label_or_fail()
        if manager is None:
            manager = self._manager if self._manager is not None else get_manager()
        return manager._open_text(blob, tenant, label)

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        scope = _tenant.get()
        if type(value) is BoundText:
            tenant = value.carnet_tenant
            if scope is not None and scope != tenant and value.carnet_moved_from != scope:
                raise TenantMismatch(scope, tenant)
        elif isinstance(value, str):
            if scope is None:
                raise TenantRequired(
                    f"writing {self.field_label}: no tenant. With the ORM set the row's "
                    f"tenant column; in Core use carnet.tenant_scope(...)"
                )
            tenant = scope
        elif isinstance(value, Sealed):
            raise ConfigurationError("a Sealed value cannot be written back: open it first")
        else:
            raise InvalidPlaintext(f"EncryptedText stores str values, not {type(value).__name__}")
        failure: CarnetError | None = None
        try:
            blob = self.encrypt(value, tenant, self.manager_for(dialect))
        except CarnetError:
            raise
        except UnicodeEncodeError:
            # The exception object holds the whole string (``.object``).
            failure = InvalidPlaintext("value is not valid Unicode (lone surrogate)")
        except Exception as exc:  # noqa: BLE001 - a foreign error here may carry the note
            failure = CarnetError(f"encryption failed: {type(exc).__name__}")
        if failure is not None:
            # Raised outside the except blocks: ``raise ... from None`` inside
            # them only hides the original, still kept as ``__context__``.
            raise failure
        return envelope.to_text(blob) if self.storage == "text" else blob

    def bind_processor(self, dialect: sa.Dialect) -> Any:
        # One closure per value instead of SQLAlchemy's process_bind_param +
        # impl-processor chain, with the common case inline: a plain str
        # under a tenant scope, sealed for the scope. Everything else, and
        # any failure, goes through process_bind_param (outside the except
        # block, so a failed attempt's exception is not chained to its error).
        cls = type(self)
        if (
            self.storage != "binary"
            or cls.process_bind_param is not EncryptedText.process_bind_param
            or cls.encrypt is not EncryptedText.encrypt
        ):
            return super().bind_processor(dialect)
        impl_processor = self.impl_instance.bind_processor(dialect)
        slow = self.process_bind_param
        get_scope = _tenant.get
        own = self._manager
        manager_of = self.manager_for
        # The manager resolved for this dialect, with the EPOCH it was resolved
        # at: one tuple, assigned at once, so that a thread never pairs one
        # thread's manager with another's epoch.
        epoch = _EPOCH
        resolved: tuple[Any, Any] = (None, None)

        # The sealer of the last value this processor sealed, as the result
        # processor keeps its opener: consecutive values of one practice skip the
        # manager's cache lookup while it is unexpired (the cache expires every
        # sealer it drops: a rotation, a first key rolled back, a shredding).
        last: tuple[Any, Any, Any, Any] = (None, None, None, None)
        monotonic = time.monotonic
        urandom = os.urandom

        def process(value: Any) -> Any:
            nonlocal last, resolved
            tenant = None
            cls_ = value.__class__
            if cls_ is str:
                tenant = get_scope()  # a plain str is sealed for the scope
            elif cls_ is BoundText:
                # Bound by the write guard to its row's practice (an ORM flush,
                # a Core write with the practice in it): sealed for that practice,
                # unless a scope of another practice forbids it (the slow path
                # raises, as process_bind_param does).
                scope = get_scope()
                tenant = value.carnet_tenant
                if not (scope is None or scope == tenant or value.carnet_moved_from == scope):
                    tenant = None
            label = self._resolved_label
            blob = None
            if tenant is not None and label is not None:
                if own is not None:
                    manager = own
                else:
                    seen, manager = resolved
                    if seen != epoch[0]:
                        now = epoch[0]
                        manager = manager_of(dialect)
                        resolved = (now, manager)
                held, of, practice, of_label = last
                try:
                    sealer = held
                    if not (of is manager and practice == tenant and of_label is label):
                        # Rows of several practices (an ORM flush): the manager's
                        # sealer of this one.
                        sealer = manager._sealers.get((tenant, label))
                    if sealer is not None and (sealer.live or sealer.expires > monotonic()):
                        # Sealer.seal, in this frame: a fresh nonce for every value.
                        nonce = urandom(NONCE_SIZE)
                        blob = (
                            sealer._prefix
                            + nonce
                            + sealer._encrypt(nonce, value.encode("utf-8"), sealer._aad)
                        )
                        manager._fast_hits += 1
                    else:
                        # Cold or expired: the manager's full path, then its new sealer.
                        blob = manager._seal_text(value, tenant, label)
                        sealer = manager._sealers.get((tenant, label))
                    if sealer is not held and sealer is not None:
                        last = (sealer, manager, tenant, label)
                except Exception:  # noqa: BLE001 - redone below, with its clear error
                    blob = None
            if blob is None:
                blob = slow(value, dialect)
            return impl_processor(blob) if impl_processor is not None else blob

        return process

    def result_processor(self, dialect: sa.Dialect, coltype: Any) -> Any:
        if self.storage == "text":
            return super().result_processor(dialect, coltype)
        # Binary storage: one closure per value instead of SQLAlchemy's
        # impl-processor + process_result_value chain; drivers return bytes
        # (or a memoryview, copied).
        get_tenant = _tenant.get
        decrypt = self.decrypt
        own = self._manager
        manager_of = self.manager_for
        # EncryptedText's own text: straight into the manager's hot path
        # (subclasses decode their plaintext their own way).
        label = self._resolved_label if type(self).decrypt is EncryptedText.decrypt else None
        # The opener of the last value this processor opened, with its manager:
        # consecutive values of one practice and key (a Core read in a scope)
        # skip the manager's cache lookup and the opener's frame. Used only while
        # it is unexpired (the cache expires every opener it drops: a rotation, a
        # destroyed practice), for the same manager and scope, and only for a
        # value framed for it (the whole v2 header: version, key id, label tag
        # and practice); the manager's decrypt hook is called first, as on the
        # manager's own path. Anything else takes that path, which checks
        # everything.
        # The manager resolved for this dialect, with the EPOCH it was resolved
        # at: one tuple, assigned at once, so that a thread never pairs one
        # thread's manager with another's epoch.
        epoch = _EPOCH
        resolved: tuple[Any, Any] = (None, None)
        # The remembered opener: its manager, practice, the opener and its parts,
        # one tuple assigned at once (the processor is shared by every thread
        # reading through the engine: no thread may pair one opener's header
        # with another's key or associated data).
        last: tuple[Any, ...] = (None, None, None, b"", 0, 0, 0, None, b"")
        monotonic = time.monotonic
        # The length is not compared before opening: a value cut short after its
        # header leaves the AEAD a nonce too short (ValueError) or no whole tag
        # (a failed tag), and both are refused as the manager's path refuses it.
        cut_or_failed = (AuthenticationFailed, ValueError)

        def process(value: Any) -> Any:
            nonlocal last, resolved
            if value is None:
                return None
            if value.__class__ is not bytes:
                # psycopg2 hands back a memoryview: copied, as from_binary would.
                if value.__class__ is memoryview:
                    value = bytes(value)
                else:
                    value = envelope.from_binary(value, self.field_label)
            # Not fixed when the processor is built: processors are cached per
            # dialect, and the manager bound to an engine may change (EPOCH says so).
            if own is not None:
                manager = own
            else:
                seen, manager = resolved
                if seen != epoch[0]:
                    now = epoch[0]
                    manager = manager_of(dialect)
                    resolved = (now, manager)
            tenant = get_tenant()
            if tenant is None:
                return Sealed(value, self, manager)
            if label is None:
                return decrypt(value, tenant, manager)
            of, practice, opener, head, at, end, _size, open_, aad = last
            if (
                manager is of
                and tenant == practice
                and value[:at] == head
                and (opener.live or opener.expires > monotonic())
            ):
                hook = manager.decrypt_hook
                if hook is not None:
                    # Charged before the value opens, as in KeyManager.decrypt: a
                    # refused read (a budget, a trail that cannot record) never
                    # has its text here.
                    hook(tenant, label, 1)
                try:
                    plain = open_(value[at:end], value[end:], aad)
                except cut_or_failed:
                    raise InvalidCiphertext(label=label, tenant=tenant) from None
                manager._fast_hits += 1
                return plain.decode("utf-8")
            text = manager._open_text(value, tenant, label)
            opener = manager._openers.get((value[_KEY_ID], label, tenant))
            if opener is not None:
                last = (manager, tenant, opener, *opener.parts())
            return text

        return process

    def process_result_value(self, value: Any, dialect: sa.Dialect) -> Any:
        if value is None:
            return None
        if self.storage == "text":
            if not value.startswith(envelope.TEXT_PREFIX):
                if self.mixed_read:
                    manager = self.manager_for(dialect)
                    manager.legacy_plaintext_reads += 1
                    if manager.decrypt_hook is not None:  # audit and budget: a note is disclosed
                        _legacy_read(manager.decrypt_hook, _tenant.get(), self.field_label)
                    return value
                raise InvalidCiphertext("value is not carnet ciphertext", label=self.field_label)
            blob = envelope.from_text(value)
        else:
            blob = envelope.from_binary(value, self.field_label)
        manager = self.manager_for(dialect)
        tenant = _tenant.get()
        if tenant is None:
            return Sealed(blob, self, manager)
        return self.decrypt(blob, tenant, manager)

    # -- SQL operators ----------------------------------------------------------------------

    class comparator_factory(TypeDecorator.Comparator["str | Sealed"]):  # noqa: N801 - SQLAlchemy's name
        def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
            if op in _ALLOWED_OPS or (
                op in (operators.eq, operators.ne)
                and len(other) == 1
                and (other[0] is None or _is_column(other[0]))
            ):
                # Column-to-column equality stays: SQLAlchemy itself compares
                # column objects with == (result keymaps, cached statements).
                # In SQL it compares stored ciphertexts; carnet.guard refuses
                # it in a JOIN condition at execution.
                return super().operate(op, *other, **kwargs)
            raise self._refuse(op)

        def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
            raise self._refuse(op)

        def _refuse(self, op: Any) -> UnsupportedOperation:
            # The operator and the field label only: never the operand (a value).
            label = getattr(self.type, "field_label", None) or "?"
            name = getattr(op, "__name__", None) or str(op)
            return UnsupportedOperation(
                f"{name} on encrypted column {label!r} cannot work: each value is ciphertext "
                "under a random nonce. Filter on other columns and compare in Python."
            )


# -- typed encrypted columns ----------------------------------------------------------


def ciphertext_width(max_bytes: int, storage: Storage = "binary") -> int:
    """Stored width of a value whose UTF-8 plaintext is at most ``max_bytes`` bytes.

    A v2 value carries its practice id in its header, so the width is sized
    for the longest one: 255 characters (the key table's practice column), at
    most 1020 UTF-8 bytes (``envelope.PRACTICE_BOUND_BYTES``).
    """
    return envelope.width(max_bytes, envelope.PRACTICE_BOUND_BYTES, text=storage == "text")


class EncryptedString(EncryptedText):
    """:class:`EncryptedText` for a plaintext of at most ``length`` characters.

    The column is sized for the worst case, 4 UTF-8 bytes per character, and
    the longest practice id (255 characters, 1020 UTF-8 bytes, carried in the
    value's header): ``1071 + 4 * length`` bytes (``VARBINARY`` on MariaDB,
    ``BYTEA`` on PostgreSQL, ``BLOB`` on SQLite), or with ``storage="text"`` a
    ``VARCHAR(2092 + 4 * ceil((28 + 4 * length) / 3))`` of the text form (see
    :func:`ciphertext_width`). A longer value raises
    :class:`~carnet.errors.InvalidPlaintext`.
    """

    cache_ok = True

    def __init__(
        self,
        length: int,
        tenant: str | None = None,
        *,
        label: str | None = None,
        storage: Storage = "binary",
        mixed_read: bool = False,
        manager: KeyManager | None = None,
    ) -> None:
        if not isinstance(length, int) or isinstance(length, bool) or length < 1:
            raise ConfigurationError("EncryptedString needs a positive length in characters")
        super().__init__(
            tenant, label=label, storage=storage, mixed_read=mixed_read, manager=manager
        )
        self.length = length

    @property
    def width(self) -> int:
        """Bytes (binary storage) or characters (text storage) of the column."""
        return ciphertext_width(4 * self.length, self.storage)

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if self.storage == "text":
            return dialect.type_descriptor(sa.String(self.width))
        if dialect.name in ("mysql", "mariadb"):
            # Inline VARBINARY instead of LONGBLOB: short values, kept in the row.
            return dialect.type_descriptor(mysql.VARBINARY(self.width))
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        return dialect.type_descriptor(sa.LargeBinary(self.width))

    def plaintext(self, value: Any) -> Any:
        """The text sealed for ``value``: checked against the length (no echo of the value)."""
        if isinstance(value, str) and len(value) > self.length:
            raise InvalidPlaintext(
                f"{self.field_label}: value longer than {self.length} characters"
            )
        return value

    # Extra arguments (a per-engine manager) pass through untouched: only
    # the plaintext encoding is this type's own.
    def encrypt(self, value: str, tenant: str, *args: Any, **kwargs: Any) -> bytes:
        return super().encrypt(self.plaintext(value), tenant, *args, **kwargs)

    def __repr__(self) -> str:
        return (
            f"EncryptedString({self.length}, tenant={self.tenant!r}, "
            f"label={self.field_label!r}, storage={self.storage!r})"
        )


_ISO_LEN = 10  # YYYY-MM-DD


def _iso(value: Any) -> str:
    if isinstance(value, dt.datetime):
        raise InvalidPlaintext("EncryptedDate stores datetime.date values, not datetime")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str) and len(value) == _ISO_LEN:
        # The ORM flush hands the value over as text (BoundText of the date).
        try:
            return dt.date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    raise InvalidPlaintext(f"EncryptedDate stores datetime.date values, not {type(value).__name__}")


class EncryptedDate(EncryptedText):
    """:class:`EncryptedText` whose plaintext is a ``datetime.date``.

    The plaintext sealed is the ISO 8601 calendar date ``YYYY-MM-DD`` (10
    ASCII bytes, docs/format.md), so every value of one practice has the same
    length, ``61 + p`` bytes (binary storage) or ``104 + 2p`` characters (text
    storage) for a practice id of ``p`` UTF-8 bytes: the length leaks nothing
    but the practice, which the row holds anyway.
    """

    cache_ok = True

    @property
    def python_type(self) -> type:
        return dt.date

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        width = ciphertext_width(_ISO_LEN, self.storage)
        if self.storage == "text":
            return dialect.type_descriptor(sa.String(width))
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(width))
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.BYTEA())
        return dialect.type_descriptor(sa.LargeBinary(width))

    def plaintext(self, value: Any) -> Any:
        """The text sealed for ``value``: a date's ISO form (None stays None)."""
        return None if value is None else _iso(value)

    def process_bind_param(self, value: Any, dialect: sa.Dialect) -> Any:
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            value = value.isoformat()  # Core: a date in, its ISO text sealed
        return super().process_bind_param(value, dialect)

    def encrypt(self, value: Any, tenant: str, *args: Any, **kwargs: Any) -> bytes:
        return super().encrypt(_iso(value), tenant, *args, **kwargs)

    def decrypt(  # type: ignore[override]
        self, blob: bytes, tenant: str, *args: Any, **kwargs: Any
    ) -> dt.date:
        text = super().decrypt(blob, tenant, *args, **kwargs)
        if len(text) == _ISO_LEN:
            try:
                return dt.date.fromisoformat(text)
            except ValueError:
                pass
        # Authentic, yet not a date: written by another type under this label.
        # Raised outside the except block, whose error quotes the text.
        raise InvalidCiphertext("value is not an ISO date", label=self.field_label)

    def __repr__(self) -> str:
        return (
            f"EncryptedDate(tenant={self.tenant!r}, label={self.field_label!r}, "
            f"storage={self.storage!r})"
        )


# The blind index column, in its own module (re-exported here).
# Documents and JSON, in their own module (re-exported here: every column type
# is importable from carnet.types).
from .types_binary import EncryptedBytes as EncryptedBytes  # noqa: E402
from .types_binary import EncryptedJSON as EncryptedJSON  # noqa: E402
from .types_index import BlindIndex as BlindIndex  # noqa: E402
from .types_index import BlindIndexAttribute as BlindIndexAttribute  # noqa: E402
from .types_index import BlindIndexColumn as BlindIndexColumn  # noqa: E402
from .types_index import BlindIndexType as BlindIndexType  # noqa: E402
from .types_index import IndexSpec as IndexSpec  # noqa: E402
