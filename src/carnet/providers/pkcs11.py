"""``pkcs11://`` master keys: an AES-256 key inside an HSM, through python-pkcs11.

URI: ``pkcs11://<token label>/<key label>?module=/path/to/module.so``, labels
percent-encoded. The PIN is never in the URI: it comes from the environment
variable ``CARNET_PKCS11_PIN``, or from the source named by
``pin-source=env:VARNAME`` or ``pin-source=file:/path``.

The wrap runs inside the HSM: CKM_AES_GCM with a fresh random 96-bit IV and
the wrap context as associated data, stored as::

    0x01 | iv (12) | ciphertext || tag (16)

The key never leaves the token: carnet refuses a key that is extractable or
not sensitive, and :meth:`Pkcs11MasterKey.create` makes one that is neither.

A PKCS#11 module is loaded and logged in once per process, and login state
is shared by every session of the process, so all keys on one module share
one session per token and one lock. A session or object handle that went
stale (token removed and reinserted, library re-initialised, network HSM
reconnected) is dropped and reopened on the next attempt.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote

from ..errors import (
    CarnetError,
    ConfigurationError,
    MasterKeyMismatch,
    MasterKeyUnavailable,
    MissingDependency,
)
from ._settings import parse_number, resolve_settings
from .base import MasterKey, context_aad

T = TypeVar("T")

WRAP_VERSION = 1
IV_SIZE = 12
TAG_SIZE = 16
KEY_BITS = 256
DEFAULT_PIN_ENV = "CARNET_PKCS11_PIN"
MODULE_ENV = "CARNET_PKCS11_MODULE"

_SETTINGS: dict[str, tuple[str, float]] = {
    "lock_timeout": ("CARNET_PKCS11_LOCK_TIMEOUT", 10.0),
    "max_attempts": ("CARNET_PKCS11_MAX_ATTEMPTS", 3),
    "backoff": ("CARNET_PKCS11_BACKOFF", 0.1),
}
_BACKOFF_CAP = 2.0
_jitter = random.SystemRandom()


def _import_pkcs11() -> Any:
    try:
        import pkcs11
        import pkcs11.exceptions
        import pkcs11.mechanisms
    except ImportError:
        raise MissingDependency("pkcs11:// master keys", "pkcs11", "python-pkcs11") from None
    return pkcs11


@dataclass(frozen=True)
class _Location:
    token: str
    key: str
    module: str
    pin_source: str
    settings: Mapping[str, float]

    @property
    def uri(self) -> str:
        return (
            f"pkcs11://{quote(self.token, safe='')}/{quote(self.key, safe='')}"
            f"?module={quote(self.module, safe='/')}"
        )


def _parse(uri: str) -> _Location:
    prefix = "pkcs11://"
    if not uri.lower().startswith(prefix):
        raise ConfigurationError("PKCS#11 master key URI must start with pkcs11://")
    rest, _, query = uri[len(prefix) :].partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigurationError("pkcs11:// URI has a malformed query") from None
    # Checked before anything echoes the URI: it may hold a PIN.
    if any(name.lower() in ("pin", "pin-value", "pin_value", "pinvalue") for name, _ in pairs):
        raise ConfigurationError(
            f"a PKCS#11 PIN must not be written in the URI (it is stored in the database); "
            f"set {DEFAULT_PIN_ENV} or use pin-source=env:VARNAME"
        )
    if "@" in rest or "#" in uri:
        raise ConfigurationError("pkcs11:// URI must not carry credentials or a fragment")
    token_raw, sep, key_raw = rest.partition("/")
    token, key = unquote(token_raw), unquote(key_raw)
    if not sep or not token or not key or "/" in key_raw:
        raise ConfigurationError(
            f"PKCS#11 master key URI must look like pkcs11://<token label>/<key label>"
            f"?module=/path/to/module.so, got {uri!r}"
        )
    module = os.environ.get(MODULE_ENV, "")
    pin_source = f"env:{DEFAULT_PIN_ENV}"
    explicit: dict[str, float] = {}
    for name, value in pairs:
        if name == "module":
            module = value
        elif name == "pin-source":
            pin_source = value
        elif name in _SETTINGS:
            explicit[name] = _number(name, value)
        else:
            raise ConfigurationError(
                f"unknown pkcs11:// option {name!r}; "
                f"known: module, pin-source, {', '.join(_SETTINGS)}"
            )
    if not module:
        raise ConfigurationError(
            f"pkcs11:// needs ?module=/path/to/module.so (or {MODULE_ENV}), got {uri!r}"
        )
    if not os.path.isabs(module) or not os.path.isfile(module):
        raise ConfigurationError(f"PKCS#11 module {module} is not an existing absolute path")
    kind, _, where = pin_source.partition(":")
    if kind not in ("env", "file") or not where:
        raise ConfigurationError("pin-source must be env:VARNAME or file:/path")
    return _Location(token, key, os.path.normpath(module), pin_source, _settings(explicit))


def _number(name: str, raw: str) -> float:
    return parse_number(name, raw)


def _settings(explicit: Mapping[str, float]) -> dict[str, float]:
    return resolve_settings(_SETTINGS, explicit)


def _read_pin(source: str) -> str:
    kind, _, where = source.partition(":")
    if kind == "env":
        pin = os.environ.get(where)
        if not pin:
            raise ConfigurationError(f"the PKCS#11 PIN is not set: export {where}")
        return pin
    try:
        with open(where, encoding="utf-8") as fh:
            pin = fh.read().rstrip("\r\n")
    except OSError:
        raise ConfigurationError(f"cannot read the PKCS#11 PIN file {where}") from None
    if not pin:
        raise ConfigurationError(f"the PKCS#11 PIN file {where} is empty")
    return pin


@dataclass
class _Module:
    """One loaded PKCS#11 library, its lock and one session per token."""

    path: str
    lib: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: dict[str, Any] = field(default_factory=dict)

    def session(self, token_label: str, pin_source: str) -> Any:
        """The token's logged-in session, opened on first use. Caller holds ``lock``."""
        session = self.sessions.get(token_label)
        if session is None:
            pkcs11 = _import_pkcs11()
            token = self.lib.get_token(token_label=token_label)
            try:
                session = token.open(rw=True, user_pin=_read_pin(pin_source))
            except pkcs11.exceptions.UserAlreadyLoggedIn:
                # Login is per process, not per session: someone in this
                # process logged in already, so a plain session is enough.
                session = token.open(rw=True)
            self.sessions[token_label] = session
        return session

    def drop(self, token_label: str) -> None:
        session = self.sessions.pop(token_label, None)
        if session is not None:
            try:
                session.close()
            except Exception:  # noqa: BLE001, S110 - a stale session may not even close
                pass

    def reset(self) -> None:
        """Forget every session and re-initialise the library (token gone and back)."""
        for label in list(self.sessions):
            self.drop(label)
        try:
            self.lib.reinitialize()
        except Exception:  # noqa: BLE001, S110 - the next open reports what is wrong
            pass


_MODULES: dict[str, _Module] = {}
_MODULES_LOCK = threading.Lock()


def _module(given: str) -> _Module:
    pkcs11 = _import_pkcs11()
    # Two spellings of one library (a symlink, say) must share the one
    # initialised instance: the library keeps per-process state. python-pkcs11
    # caches by the spelling, so it gets the first one, as other code would.
    real = os.path.realpath(given)
    with _MODULES_LOCK:
        mod = _MODULES.get(real)
        if mod is None:
            try:
                lib = pkcs11.lib(given)
            except pkcs11.exceptions.PKCS11Error as exc:
                raise MasterKeyUnavailable(
                    f"cannot load the PKCS#11 module {given}: {type(exc).__name__}"
                ) from None
            mod = _MODULES[real] = _Module(given, lib)
        return mod


class Pkcs11MasterKey(MasterKey):
    """An AES-256 secret key object on a PKCS#11 token, used for AES-GCM inside the HSM."""

    scheme = "pkcs11"

    def __init__(self, location: _Location) -> None:
        self._pkcs11 = _import_pkcs11()
        self._loc = location
        # Read even when this process is already logged in to the token, so a
        # missing PIN shows at start-up rather than after the next restart.
        _read_pin(location.pin_source)
        self._module = _module(location.module)
        self._key: Any = None
        self._key_session: Any = None
        # Fail now, not at the first note: token, PIN and key must all be right.
        self._run("open", lambda key: None, opening=True)

    @classmethod
    def from_uri(cls, uri: str) -> Pkcs11MasterKey:
        return cls(_parse(uri))

    @classmethod
    def create(cls, uri: str) -> Pkcs11MasterKey:
        """Generate a non-extractable, sensitive AES-256 key on the token."""
        loc = _parse(uri)
        pkcs11 = _import_pkcs11()
        from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

        mod = _module(loc.module)
        with _locked(mod, loc.settings["lock_timeout"]):
            try:
                session = mod.session(loc.token, loc.pin_source)
                existing = list(
                    session.get_objects(
                        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: loc.key}
                    )
                )
                if existing:
                    raise ConfigurationError(
                        f"token {loc.token!r} already holds a key labelled {loc.key!r}"
                    )
                session.generate_key(
                    KeyType.AES,
                    KEY_BITS,
                    label=loc.key,
                    id=os.urandom(16),
                    store=True,
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.MODIFIABLE: False,
                        Attribute.WRAP: False,
                        Attribute.UNWRAP: False,
                        Attribute.SIGN: False,
                        Attribute.VERIFY: False,
                        Attribute.DERIVE: False,
                    },
                )
            except CarnetError:
                raise
            except pkcs11.exceptions.PKCS11Error as exc:
                mod.drop(loc.token)
                raise _open_error(pkcs11, loc, exc) from None
        return cls(loc)

    @property
    def uri(self) -> str:
        return self._loc.uri

    @property
    def settings(self) -> Mapping[str, float]:
        """Effective lock time-out and retry bounds (no secrets)."""
        return dict(self._loc.settings)

    def key_attributes(self) -> dict[str, object]:
        """Security attributes of the key object as the token reports them."""
        from pkcs11 import Attribute

        names = {
            "extractable": Attribute.EXTRACTABLE,
            "sensitive": Attribute.SENSITIVE,
            "never_extractable": Attribute.NEVER_EXTRACTABLE,
            "always_sensitive": Attribute.ALWAYS_SENSITIVE,
            "value_len": Attribute.VALUE_LEN,
            "key_type": Attribute.KEY_TYPE,
        }
        return self._run(
            "read attributes", lambda key: {name: key[attr] for name, attr in names.items()}
        )

    def wrap(self, dek: bytes, context: Mapping[str, str]) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        aad = context_aad(_context(context))
        # A fresh IV per wrap; host randomness because many HSMs refuse to
        # generate GCM IVs themselves through PKCS#11 2.40.
        iv = os.urandom(IV_SIZE)
        sealed: bytes = self._run(
            "wrap",
            lambda key: key.encrypt(
                dek, mechanism=Mechanism.AES_GCM, mechanism_param=GCMParams(iv, aad, TAG_SIZE * 8)
            ),
        )
        return bytes([WRAP_VERSION]) + iv + sealed

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        from pkcs11 import Mechanism
        from pkcs11.mechanisms import GCMParams

        aad = context_aad(_context(context))
        if len(wrapped) <= 1 + IV_SIZE + TAG_SIZE or wrapped[0] != WRAP_VERSION:
            raise MasterKeyMismatch(f"wrapped key is not in a format {self.scheme}:// can open")
        iv, sealed = wrapped[1 : 1 + IV_SIZE], wrapped[1 + IV_SIZE :]
        plain: bytes = self._run(
            "unwrap",
            lambda key: key.decrypt(
                sealed,
                mechanism=Mechanism.AES_GCM,
                mechanism_param=GCMParams(iv, aad, TAG_SIZE * 8),
            ),
            unwrapping=True,
        )
        return plain

    def close(self) -> None:
        self._key = None

    def _bound_key(self) -> Any:
        """This key's object handle in the current session (handles die with sessions)."""
        from pkcs11 import Attribute, KeyType, ObjectClass

        session = self._module.session(self._loc.token, self._loc.pin_source)
        if self._key is None or self._key_session is not session:
            key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=self._loc.key)
            if key[Attribute.KEY_TYPE] != KeyType.AES or key[Attribute.VALUE_LEN] != KEY_BITS // 8:
                raise ConfigurationError(f"{self.uri} is not an AES-256 key")
            if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
                raise ConfigurationError(
                    f"{self.uri} is extractable or not sensitive; a master key must never "
                    "leave the HSM (create one with: carnet master new <uri>)"
                )
            self._key, self._key_session = key, session
        return self._key

    def _run(
        self,
        operation: str,
        fn: Callable[[Any], T],
        *,
        opening: bool = False,
        unwrapping: bool = False,
    ) -> T:
        """Run ``fn(key)`` under the module lock, reopening stale sessions, bounded retries."""
        exc_mod = self._pkcs11.exceptions
        attempts = int(self._loc.settings["max_attempts"])
        delay = self._loc.settings["backoff"]
        attempt = 0
        while True:
            attempt += 1
            with _locked(self._module, self._loc.settings["lock_timeout"]):
                try:
                    key = self._bound_key()
                except exc_mod.PKCS11Error as exc:
                    transient = _transient(self._pkcs11, exc, opened=not opening)
                    if transient:
                        self._forget(exc)
                    else:
                        self._module.drop(self._loc.token)
                        raise _open_error(self._pkcs11, self._loc, exc) from None
                    reason = type(exc).__name__
                else:
                    try:
                        return fn(key)
                    except exc_mod.PKCS11Error as exc:
                        reason = type(exc).__name__
                        failure = exc
                    if unwrapping and self._key_still_works(key):
                        # The session and key are fine, so the tag did not verify:
                        # some tokens say so with CKR_GENERAL_ERROR.
                        raise MasterKeyMismatch(
                            f"wrapped key does not open under master key {self.uri} "
                            "(another master key, another tenant's key, or tampered)"
                        ) from None
                    self._forget(failure)
                    if not _transient(self._pkcs11, failure, opened=True):
                        raise MasterKeyUnavailable(
                            f"PKCS#11 {operation} with {self.uri} failed: {reason}"
                        ) from None
            pause = _jitter.uniform(0, min(_BACKOFF_CAP, delay * 2 ** (attempt - 1)))
            if attempt >= attempts:
                raise MasterKeyUnavailable(
                    f"PKCS#11 {operation} with {self.uri} failed after {attempt} "
                    f"attempt(s): {reason}"
                )
            time.sleep(pause)

    def _key_still_works(self, key: Any) -> bool:
        from pkcs11 import Attribute

        try:
            key[Attribute.LABEL]
        except self._pkcs11.exceptions.PKCS11Error:
            return False
        return True

    def _forget(self, exc: Exception) -> None:
        """Drop handles after a failure. Caller holds the module lock."""
        self._key = None
        exc_mod = self._pkcs11.exceptions
        if isinstance(
            exc,
            exc_mod.SessionHandleInvalid
            | exc_mod.SessionClosed
            | exc_mod.ObjectHandleInvalid
            | exc_mod.KeyHandleInvalid
            | exc_mod.UserNotLoggedIn,
        ):
            self._module.drop(self._loc.token)
        elif isinstance(
            exc,
            exc_mod.DeviceRemoved
            | exc_mod.DeviceError
            | exc_mod.TokenNotPresent
            | exc_mod.TokenNotRecognised
            | exc_mod.NoSuchToken
            | exc_mod.NoSuchKey
            | exc_mod.GeneralError,
        ):
            # The slot list is read at initialisation: a token that went away
            # and came back is only seen again after re-initialising.
            self._module.reset()


class _locked:  # noqa: N801 - used like a function
    def __init__(self, module: _Module, timeout: float) -> None:
        self._module = module
        self._timeout = timeout

    def __enter__(self) -> None:
        if not self._module.lock.acquire(timeout=self._timeout):
            raise MasterKeyUnavailable(
                f"timed out after {self._timeout:g}s waiting for the PKCS#11 session "
                f"of {self._module.path}"
            )

    def __exit__(self, *exc: object) -> None:
        self._module.lock.release()


def _transient(pkcs11: Any, exc: Exception, *, opened: bool) -> bool:
    """Whether another attempt (on a fresh session) may succeed."""
    e = pkcs11.exceptions
    transient: tuple[type[Exception], ...] = (
        e.SessionHandleInvalid,
        e.SessionClosed,
        e.ObjectHandleInvalid,
        e.KeyHandleInvalid,
        e.DeviceRemoved,
        e.DeviceError,
        e.DeviceMemory,
        e.TokenNotPresent,
        e.TokenNotRecognised,
        e.UserNotLoggedIn,
        e.GeneralError,
        e.FunctionFailed,
        e.SessionCount,
        e.HostMemory,
    )
    if opened:
        # The key was there when this provider was opened: now missing means
        # the token is away, not that the URI is wrong.
        transient += (e.NoSuchToken, e.NoSuchKey)
    return isinstance(exc, transient)


def _open_error(pkcs11: Any, loc: _Location, exc: Exception) -> CarnetError:
    e = pkcs11.exceptions
    where = loc.uri
    if isinstance(exc, e.NoSuchToken):
        return ConfigurationError(f"no PKCS#11 token labelled {loc.token!r} in {loc.module}")
    if isinstance(exc, e.MultipleTokensReturned):
        return ConfigurationError(f"several PKCS#11 tokens are labelled {loc.token!r}")
    if isinstance(exc, e.NoSuchKey):
        return ConfigurationError(
            f"no AES key labelled {loc.key!r} on token {loc.token!r} "
            f"(create one with: carnet master new {where})"
        )
    if isinstance(exc, e.MultipleObjectsReturned):
        return ConfigurationError(f"several keys are labelled {loc.key!r} on token {loc.token!r}")
    if isinstance(exc, e.PinIncorrect | e.PinInvalid | e.PinLenRange):
        return ConfigurationError(f"the token {loc.token!r} rejected the PIN")
    if isinstance(exc, e.PinLocked | e.PinExpired | e.UserPinNotInitialized):
        return ConfigurationError(f"the PIN of token {loc.token!r} is locked, expired or unset")
    return MasterKeyUnavailable(f"cannot open {where}: {type(exc).__name__}")


def _context(context: Mapping[str, str]) -> Mapping[str, str]:
    if not context or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in context.items()
    ):
        raise TypeError("wrap context must be a non-empty mapping of str to str")
    return context
