"""carnet's exception tree.

Every error carnet raises on purpose derives from :class:`CarnetError`.
Messages and ``repr`` carry identifiers (key id, tenant id, field label,
primary keys) and never plaintext or key material: tenant ids and labels are
metadata the threat model already concedes.
"""

from __future__ import annotations


class CarnetError(Exception):
    """Base class of every error carnet raises on purpose."""

    #: The name of the database check that refused the write, when one did
    #: (see :mod:`carnet.dbchecks`); None otherwise.
    constraint: str | None = None


class ConfigurationError(CarnetError, ValueError):
    """carnet was set up wrongly: bad URI, missing manager, bad option."""


class MissingDependency(ConfigurationError):
    """An optional provider needs an extra that is not installed."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        self.feature = feature
        self.extra = extra
        self.package = package
        super().__init__(f"{feature} needs the '{package}' package: pip install 'carnet[{extra}]'")


class InvalidCiphertext(CarnetError):
    """A stored value does not open: tampered, truncated, foreign or unknown version.

    One opaque error for every way a value can be bad, as with Fernet's
    ``InvalidToken``: AES-GCM cannot tell a flipped bit from a value moved to
    another tenant's row or column, and saying which would help an attacker.
    """

    def __init__(
        self,
        reason: str = "value does not authenticate",
        *,
        label: str | None = None,
        tenant: str | None = None,
    ) -> None:
        self.reason = reason
        self.label = label
        self.tenant = tenant
        where = []
        if label is not None:
            where.append(f"field {label!r}")
        if tenant is not None:
            where.append(f"tenant {tenant!r}")
        suffix = f" ({', '.join(where)})" if where else ""
        super().__init__(f"invalid ciphertext: {reason}{suffix}")


class UnknownKey(CarnetError):
    """The key id in a value is not in the key store."""

    def __init__(self, key_id: bytes, message: str | None = None) -> None:
        self.key_id = key_id.hex()
        super().__init__(message or f"unknown data key {self.key_id}")


class KeyDestroyed(CarnetError):
    """The data key was crypto-shredded: the value can never be read again."""

    def __init__(self, key_id: bytes | None, tenant: str | None = None) -> None:
        self.key_id = key_id.hex() if key_id is not None else None
        self.tenant = tenant
        if key_id is None:
            super().__init__(f"the data keys of tenant {tenant!r} were destroyed")
        else:
            who = f" of tenant {tenant!r}" if tenant is not None else ""
            super().__init__(f"data key {self.key_id}{who} was destroyed")


class KeyRetired(KeyDestroyed):
    """The data key version was retired (its material erased) after re-encryption."""

    def __init__(self, key_id: bytes, tenant: str | None = None) -> None:
        super().__init__(key_id, tenant)
        self.args = (f"data key {self.key_id} was retired",)


class KeyInUse(CarnetError):
    """A key cannot be retired while rows still use it."""


class KeyUsageUnknown(KeyInUse):
    """A key cannot be retired: some table or column that could hold it was not readable."""


class UnknownTenant(CarnetError):
    """The practice has no data key at all (never created: often a typo in its id)."""

    def __init__(self, tenant: str, hint: str = "") -> None:
        self.tenant = tenant
        super().__init__(f"practice {tenant!r} has no data key{hint}")


class KeyStoreInconsistent(CarnetError):
    """A row of the key table contradicts itself or the lookup; carnet will not use it.

    E.g. an active marker naming another practice, an unknown state, or a key
    table whose collation folds practice ids (case, trailing spaces).
    """


class MasterKeyUnavailable(CarnetError):
    """The master key could not be reached (network, time-out, HSM down, keyring locked)."""


class MasterKeyMismatch(CarnetError):
    """A wrapped data key does not open under this master key (wrong key or tampered wrap)."""


class TenantRequired(CarnetError):
    """An encrypted value was written or read with no tenant to choose its key."""


class TenantMismatch(CarnetError):
    """The tenant in scope disagrees with the row's own tenant."""

    def __init__(self, expected: str, actual: str, message: str | None = None) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(message or f"value belongs to tenant {actual!r}, not {expected!r}")


class InvalidPlaintext(CarnetError, ValueError):
    """A value given to an encrypted column cannot be sealed (not a str, bad Unicode)."""


class UnsupportedOperation(CarnetError, TypeError):
    """A SQL operator that cannot work on ciphertext (==, LIKE, IN, ORDER BY ...)."""


class DecryptBudgetExceeded(CarnetError):
    """A principal decrypted more values than its budget allows in the window."""


class DatabaseError(CarnetError):
    """carnet's own batch work (a migration, a re-encryption) failed in the database.

    The message names the table, the column and the primary keys of the rows
    concerned, the driver's error class and code; never a stored value. The
    driver's exception is not chained (no ``__cause__`` or ``__context__``):
    its message or its parameters may quote a legacy note.
    """

    def __init__(
        self,
        message: str,
        *,
        table: str | None = None,
        column: str | None = None,
        pks: tuple[object, ...] = (),
        code: str | None = None,
    ) -> None:
        self.table = table
        self.column = column
        self.pks = pks
        self.code = code
        super().__init__(message)


class AuditStoreUnavailable(DatabaseError):
    """The audit trail's store could not record a disclosure (``required`` mode: the read
    is refused and nothing is disclosed). The message names the store, never a value."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class DecoyOpened(CarnetError):
    """A decoy note was about to be opened (carnet.decoys): no legitimate screen opens
    one, so the read is refused and the alarm raised. The message names the
    principal, the practice and the field, never a value."""


class BudgetStoreUnavailable(CarnetError):
    """The shared decrypt budget's store (SQL or Redis) could not be reached to reserve
    reads (``required`` mode: the read is refused and nothing is disclosed). The
    message names the store, never a password or a value."""


# Driver errors whose first line is about reaching the server, never about a
# row: PostgreSQL SQLSTATE classes 08 (connection), 28 (authentication), 3D
# (no such database), 57P (shutdown); MySQL/MariaDB server errors 1040-1049
# (connections, access, unknown database) and client errors 2000-2999.
_PG_CONNECTION_CLASSES = ("08", "28", "3D", "57P")
_SQLITE_SAFE_PREFIX = "SQLITE_"

# Known row-level errors: a hint instead of the driver's text, which may quote
# the value (MariaDB "Incorrect string value: '...'", PostgreSQL DETAIL lines,
# pysqlite "Could not decode to UTF-8 column 'c' with text '...'").
_HINTS = {
    "22001": "a value is too long for its column",
    "1406": "a value is too long for its column",
    "1366": "a value is not valid in the column's character set",
    "22021": "a value is not valid in the database encoding",
    "23505": "a unique constraint refused a value",
    "1062": "a unique constraint refused a value",
}


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's exception inside a SQLAlchemy wrapper, or ``exc`` itself."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def db_error_code(exc: BaseException) -> str | None:
    """SQLSTATE (PostgreSQL), error number (MySQL/MariaDB) or SQLite error name, if any."""
    orig = _driver_error(exc)
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str):
        return name
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return str(args[0])
    return None


def _text_is_safe(orig: BaseException, code: str | None) -> bool:
    module = type(orig).__module__
    if module.startswith("psycopg"):
        if code is None:  # raised by libpq itself: connection set-up and loss
            return type(orig).__name__ in ("OperationalError", "InterfaceError")
        return code.startswith(_PG_CONNECTION_CLASSES)
    if module.startswith(("pymysql", "MySQLdb", "mariadb")):
        return (
            code is not None
            and code.isdigit()
            and (1040 <= int(code) <= 1049 or 2000 <= int(code) <= 2999)
        )
    if module.startswith("sqlite3"):
        # Messages of the SQLite library name files, tables and columns; only
        # pysqlite's own messages (no error name) quote stored text.
        return code is not None and code.startswith(_SQLITE_SAFE_PREFIX)
    return False


def describe_db_error(exc: BaseException) -> str:
    """One line about a driver or SQLAlchemy database error that quotes no stored value.

    The driver's own text is kept only for errors about reaching the server
    (host, port, authentication, missing database file); for everything else
    the error class, its code and a hint.
    """
    orig = _driver_error(exc)
    code = db_error_code(exc)
    kind = type(orig).__name__ + (f" {code}" if code else "")
    if _text_is_safe(orig, code):
        first = (str(orig).strip().splitlines() or [""])[0][:200]
        return f"{kind}: {first}"
    hint = _HINTS.get(code or "")
    if hint is None and str(orig).startswith("Could not decode to UTF-8 column"):
        hint = "a stored text value is not valid UTF-8 (a Latin-1 legacy value?)"
    return f"{kind}: {hint}" if hint else kind
