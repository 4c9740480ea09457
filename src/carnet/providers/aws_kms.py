"""``aws-kms://`` master keys: AWS KMS through boto3 (``pip install 'carnet[aws]'``).

A wrap is one KMS ``Encrypt`` of the DEK with the wrap context as the KMS
encryption context, an unwrap one ``Decrypt`` with the same context and the
key id, so KMS itself refuses a wrapped key moved to another tenant's row.
The stored blob is::

    0x01 | SHA-256(key ARN)[:8] | KMS CiphertextBlob

The ARN fingerprint lets an ``AccessDeniedException`` on ``Decrypt`` be told
apart: a blob made under another KMS key is a :class:`MasterKeyMismatch`, a
missing ``kms:Decrypt`` permission on our own key is not.

Endpoint, region and credentials come from the usual AWS settings (profiles,
``AWS_REGION``, ``AWS_ENDPOINT_URL_KMS`` ...), never from the URI, so the URI
stored next to each DEK names the key and nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from ..errors import ConfigurationError, MasterKeyMismatch, MasterKeyUnavailable, MissingDependency
from ._settings import parse_number, resolve_settings
from .base import MasterKey

T = TypeVar("T")

WRAP_VERSION = 1
FINGERPRINT_SIZE = 8
_HEADER_SIZE = 1 + FINGERPRINT_SIZE

_KEY_UUID = (
    r"(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|mrk-[0-9a-fA-F]{32})"
)
_ALIAS = r"alias/[A-Za-z0-9/_-]{1,250}"
_ARN = re.compile(
    r"arn:(?P<partition>aws[a-z-]*):kms:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):"
    rf"(?:key/{_KEY_UUID}|{_ALIAS})"
)
_BARE = re.compile(rf"{_KEY_UUID}|{_ALIAS}")

# KMS error codes worth another attempt: throttling and service-side faults.
_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "KMSInternalException",
        "InternalFailure",
        "InternalError",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_MISMATCH_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
_STATE_CODES = frozenset({"DisabledException", "KMSInvalidStateException"})
_CONFIG_CODES = frozenset(
    {
        "NotFoundException",
        "InvalidKeyUsageException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "IncompleteSignature",
        "InvalidClientTokenId",
    }
)

# Operational settings: from the URI query, else the environment, else these.
_SETTINGS: dict[str, tuple[str, float]] = {
    "connect_timeout": ("CARNET_KMS_CONNECT_TIMEOUT", 2.0),
    "read_timeout": ("CARNET_KMS_READ_TIMEOUT", 5.0),
    "max_attempts": ("CARNET_KMS_MAX_ATTEMPTS", 4),
    "total_timeout": ("CARNET_KMS_TOTAL_TIMEOUT", 20.0),
    "backoff": ("CARNET_KMS_BACKOFF", 0.1),
}
_BACKOFF_CAP = 2.0
_jitter = random.SystemRandom()


# True while carnet itself calls KMS: the filter below judges only those records.
_in_carnet_call: ContextVar[bool] = ContextVar("carnet_kms_call", default=False)


class _RedactPlaintext(logging.Filter):
    """Drop botocore debug records of carnet's KMS calls that carry request or response bodies.

    At DEBUG level botocore logs whole request parameters and response bodies,
    which for Encrypt and Decrypt hold the data key in base64. The threat
    model counts logs as leak paths, so such records never get out. Records
    of the application's own AWS calls pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not _in_carnet_call.get():
            return True
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record we cannot render is not worth the risk
            return False
        return "Plaintext" not in text


_FILTER = _RedactPlaintext()
_BOTOCORE_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.hooks",
    "botocore.httpsession",
    "botocore.awsrequest",
    "botocore.retryhandler",
    "botocore.regions",
)


def _install_log_filter() -> None:
    # When the first KMS master key is opened, not when this module is imported.
    for name in _BOTOCORE_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def _import_boto() -> tuple[Any, Any, Any]:
    try:
        import boto3.session
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise MissingDependency("aws-kms:// master keys", "aws", "boto3") from None
    return boto3.session, botocore.config, botocore.exceptions


def fingerprint(arn: str) -> bytes:
    return hashlib.sha256(arn.encode("utf-8")).digest()[:FINGERPRINT_SIZE]


def _parse(uri: str) -> tuple[str, str | None, dict[str, float]]:
    prefix = "aws-kms://"
    if not uri.lower().startswith(prefix):
        raise ConfigurationError("AWS KMS master key URI must start with aws-kms://")
    rest = uri[len(prefix) :]
    key_id, _, query = rest.partition("?")
    if "@" in key_id or "#" in rest:
        # Credentials never belong in a URI that is stored next to every DEK;
        # the URI is not echoed, since it may hold one.
        raise ConfigurationError(
            "aws-kms:// URI must not carry credentials or a fragment; "
            "credentials come from the usual AWS settings (profile, environment, role)"
        )
    region: str | None = None
    arn = _ARN.fullmatch(key_id)
    if arn is not None:
        region = arn.group("region")
    elif _BARE.fullmatch(key_id) is None:
        raise ConfigurationError(
            f"aws-kms:// needs a key ARN, key id or alias/<name>, got {key_id!r}"
        )
    settings: dict[str, float] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigurationError(f"aws-kms:// URI has a malformed query: {query!r}") from None
    for name, value in pairs:
        if name == "region":
            if not re.fullmatch(r"[a-z]{2}(?:-[a-z]+)+-\d+", value):
                raise ConfigurationError(f"aws-kms:// region {value!r} is not an AWS region name")
            if region is not None and region != value:
                raise ConfigurationError(
                    f"aws-kms:// region {value!r} contradicts the key ARN's region {region!r}"
                )
            region = value
        elif name in _SETTINGS:
            settings[name] = _number(name, value)
        else:
            raise ConfigurationError(
                f"unknown aws-kms:// option {name!r}; known: region, {', '.join(_SETTINGS)}"
            )
    return key_id, region, settings


def _number(name: str, raw: str) -> float:
    return parse_number(name, raw)


def _settings(explicit: Mapping[str, float]) -> dict[str, float]:
    return resolve_settings(_SETTINGS, explicit)


class AwsKmsMasterKey(MasterKey):
    """A symmetric AWS KMS key named by ARN, key id or alias.

    URI: ``aws-kms://<arn | key id | alias/name>[?region=..&connect_timeout=..
    &read_timeout=..&max_attempts=..&total_timeout=..&backoff=..]``. Only the
    key and an explicit region are part of :attr:`uri`; the time-outs are
    operational settings (also ``CARNET_KMS_*`` environment variables).
    """

    scheme = "aws-kms"

    def __init__(
        self, key_id: str, *, region: str | None = None, settings: Mapping[str, float] | None = None
    ) -> None:
        session_mod, config_mod, exc_mod = _import_boto()
        _install_log_filter()
        self._exc = exc_mod
        self._key_id = key_id
        self._explicit_region = region if _ARN.fullmatch(key_id) is None else None
        self._settings = _settings(settings or {})
        config = config_mod.Config(
            connect_timeout=self._settings["connect_timeout"],
            read_timeout=self._settings["read_timeout"],
            # Retries are ours (bounded, transient faults only), so botocore's are off.
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        # botocore reads only AWS_DEFAULT_REGION; the other AWS SDKs and the
        # Lambda/ECS runtimes set AWS_REGION, which users expect to work too.
        region = region or os.environ.get("AWS_REGION") or None
        try:
            session = session_mod.Session(region_name=region)
            self._client = session.client("kms", config=config)
        except exc_mod.NoRegionError:
            raise ConfigurationError(
                f"no AWS region for {self.uri}: set AWS_REGION, use a key ARN, or add ?region="
            ) from None
        except exc_mod.BotoCoreError as exc:
            raise ConfigurationError(
                f"cannot set up the AWS KMS client for {self.uri}: {type(exc).__name__}"
            ) from None

    @classmethod
    def from_uri(cls, uri: str) -> AwsKmsMasterKey:
        key_id, region, settings = _parse(uri)
        return cls(key_id, region=region, settings=settings)

    @property
    def uri(self) -> str:
        if self._explicit_region:
            return f"aws-kms://{self._key_id}?region={self._explicit_region}"
        return f"aws-kms://{self._key_id}"

    @property
    def settings(self) -> Mapping[str, float]:
        """Effective time-outs and retry bounds (no secrets)."""
        return dict(self._settings)

    def wrap(self, dek: bytes, context: Mapping[str, str]) -> bytes:
        ctx = _context(context)
        response = self._call(
            "Encrypt",
            lambda: self._client.encrypt(KeyId=self._key_id, Plaintext=dek, EncryptionContext=ctx),
        )
        blob: bytes = response["CiphertextBlob"]
        return bytes([WRAP_VERSION]) + fingerprint(response["KeyId"]) + blob

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        ctx = _context(context)
        if len(wrapped) <= _HEADER_SIZE or wrapped[0] != WRAP_VERSION:
            raise MasterKeyMismatch(f"wrapped key is not in a format {self.scheme}:// can open")
        expected = wrapped[1:_HEADER_SIZE]
        blob = wrapped[_HEADER_SIZE:]
        try:
            response = self._call(
                "Decrypt",
                lambda: self._client.decrypt(
                    CiphertextBlob=blob, KeyId=self._key_id, EncryptionContext=ctx
                ),
                unwrapping=True,
            )
        except _AccessDenied:
            if self._denial_is_about_blob(expected):
                raise self._mismatch() from None
            raise MasterKeyUnavailable(
                f"AWS KMS denied Decrypt with {self.uri} (AccessDeniedException): "
                "grant kms:Encrypt and kms:Decrypt on this key to the running principal"
            ) from None
        if response["KeyId"] and fingerprint(response["KeyId"]) != expected:
            raise self._mismatch()
        plaintext: bytes = response["Plaintext"]
        return plaintext

    def close(self) -> None:
        self._client.close()

    def _mismatch(self) -> MasterKeyMismatch:
        return MasterKeyMismatch(
            f"wrapped key does not open under master key {self.uri} "
            "(another master key, another tenant's key, or tampered)"
        )

    def _denial_is_about_blob(self, expected: bytes) -> bool:
        """After Decrypt was denied: is that about the blob or about our permissions?

        KMS answers AccessDeniedException both for a blob naming a key we may
        not use (another master key's wrap, or a damaged key reference) and
        for a principal lacking kms:Decrypt on our own key. A probe
        round trip under our key tells them apart; it runs only on this
        error path.
        """
        probe_context = {"carnet-probe": "access-check"}
        try:
            sealed = self._call(
                "Encrypt",
                lambda: self._client.encrypt(
                    KeyId=self._key_id, Plaintext=b"\0" * 32, EncryptionContext=probe_context
                ),
            )
            if fingerprint(sealed["KeyId"]) != expected:
                return True
            self._call(
                "Decrypt",
                lambda: self._client.decrypt(
                    CiphertextBlob=sealed["CiphertextBlob"],
                    KeyId=self._key_id,
                    EncryptionContext=probe_context,
                ),
                unwrapping=True,
            )
        except (_AccessDenied, MasterKeyUnavailable):
            return False
        return True

    def _call(self, operation: str, fn: Callable[[], T], *, unwrapping: bool = False) -> T:
        """Run one KMS call with bounded retries of transient faults only."""
        attempts = int(self._settings["max_attempts"])
        deadline = time.monotonic() + self._settings["total_timeout"]
        delay = self._settings["backoff"]
        attempt = 0
        while True:
            attempt += 1
            token = _in_carnet_call.set(True)
            try:
                return fn()
            except self._exc.ClientError as exc:
                reason = self._classify(operation, exc, unwrapping)
            except (self._exc.ConnectionError, self._exc.HTTPClientError) as exc:
                reason = type(exc).__name__
            except (self._exc.NoCredentialsError, self._exc.PartialCredentialsError):
                raise ConfigurationError(
                    f"no AWS credentials for {self.uri}: configure a profile, role or environment"
                ) from None
            except self._exc.BotoCoreError as exc:
                raise MasterKeyUnavailable(
                    f"AWS KMS {operation} with {self.uri} failed: {type(exc).__name__}"
                ) from None
            finally:
                _in_carnet_call.reset(token)
            # Full jitter keeps a fleet of clients from retrying in lockstep.
            pause = _jitter.uniform(0, min(_BACKOFF_CAP, delay * 2 ** (attempt - 1)))
            if attempt >= attempts or time.monotonic() + pause >= deadline:
                raise MasterKeyUnavailable(
                    f"AWS KMS {operation} with {self.uri} failed after {attempt} "
                    f"attempt(s): {reason}"
                )
            _log.debug("AWS KMS %s transient failure (%s), retry %d", operation, reason, attempt)
            time.sleep(pause)

    def _classify(self, operation: str, exc: Any, unwrapping: bool) -> str:
        """Return a reason if ``exc`` is transient, else raise the final error."""
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return f"{code or 'HTTP'} {status}".strip()
        if unwrapping and code in _MISMATCH_CODES:
            raise self._mismatch() from None
        if code == "AccessDeniedException":
            if unwrapping:
                raise _AccessDenied from None
            raise MasterKeyUnavailable(
                f"AWS KMS denied {operation} with {self.uri} (AccessDeniedException): "
                "check the key policy and IAM permissions of the running principal"
            ) from None
        if code in _STATE_CODES:
            raise MasterKeyUnavailable(
                f"KMS key {self.uri} is disabled or pending deletion ({code}); "
                "re-enable it or rewrap the data keys under another master key"
            ) from None
        if code in _CONFIG_CODES:
            raise ConfigurationError(
                f"AWS KMS {operation} with {self.uri} refused: {code} "
                "(check the key id, region, endpoint and credentials)"
            ) from None
        raise MasterKeyUnavailable(
            f"AWS KMS {operation} with {self.uri} failed: {code or status}"
        ) from None


class _AccessDenied(Exception):
    """Internal: Decrypt was denied; the caller decides between mismatch and permission."""


_log = logging.getLogger(__name__)


def _context(context: Mapping[str, str]) -> dict[str, str]:
    ctx = dict(context)
    if not ctx or not all(isinstance(k, str) and isinstance(v, str) for k, v in ctx.items()):
        raise TypeError("wrap context must be a non-empty mapping of str to str")
    return ctx
