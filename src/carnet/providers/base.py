"""The master-key provider interface and the URI registry.

A master key wraps and unwraps data keys (DEKs). It never leaves its home
(a file, the OS keyring, a KMS, an HSM) through carnet, and never enters the
database. Providers are chosen by URI scheme::

    file:///path/to/master.key
    keyring://service/name
    aws-kms://arn:aws:kms:eu-west-3:111122223333:key/...   or  aws-kms://alias/name
    pkcs11://<token label>/<key label>?module=/usr/lib/softhsm/libsofthsm2.so

Third-party providers register a class under the entry-point group
``carnet.master_keys`` with the scheme as the entry-point name.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import ClassVar

from .._loader import load
from ..errors import ConfigurationError

ENTRY_POINT_GROUP = "carnet.master_keys"

# Built-ins are imported lazily so that a missing optional extra (boto3,
# python-pkcs11) only matters to the user who names that scheme.
_BUILTIN: dict[str, str] = {
    "file": "carnet.providers.file:FileMasterKey",
    "keyring": "carnet.providers.keyring:KeyringMasterKey",
    "aws-kms": "carnet.providers.aws_kms:AwsKmsMasterKey",
    "pkcs11": "carnet.providers.pkcs11:Pkcs11MasterKey",
}


class MasterKey(abc.ABC):
    """A key-encryption key that wraps data keys, bound to a context.

    ``context`` always holds ``tenant`` and ``key_id`` (hex). Implementations
    must authenticate it (AES-GCM associated data, KMS encryption context):
    a wrapped key copied to another tenant's row must not unwrap.

    Errors: :class:`~carnet.errors.MasterKeyUnavailable` when the key cannot
    be reached (after bounded retries of transient faults only);
    :class:`~carnet.errors.MasterKeyMismatch` when the wrapped key does not
    open under this master key and context. Messages never hold key material.
    """

    #: URI scheme served by this class, e.g. ``"file"``.
    scheme: ClassVar[str]

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """Canonical URI naming this key; stored next to each wrapped DEK. No secrets."""

    @abc.abstractmethod
    def wrap(self, dek: bytes, context: Mapping[str, str]) -> bytes:
        """Encrypt a data key under this master key, binding ``context``."""

    @abc.abstractmethod
    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        """Decrypt a wrapped data key; the context must equal the one used to wrap."""

    @classmethod
    @abc.abstractmethod
    def from_uri(cls, uri: str) -> MasterKey:
        """Open an existing master key named by ``uri``; fail at once if misconfigured."""

    @classmethod
    def create(cls, uri: str) -> MasterKey:
        """Create a new master key at ``uri`` (``carnet master new``)."""
        raise ConfigurationError(f"{cls.scheme}:// master keys cannot be created by carnet")

    def close(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release sessions or connections held by the provider."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"


def context_aad(context: Mapping[str, str]) -> bytes:
    """Canonical bytes of a wrap context, for providers that use AEAD associated data."""
    return json.dumps(
        dict(sorted(context.items())), separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def scheme_of(uri: str) -> str:
    scheme, sep, _ = uri.partition("://")
    if not sep or not scheme:
        raise ConfigurationError(
            f"master key must be a URI such as file:///path or keyring://service/name, got {uri!r}"
        )
    return scheme.lower()


def provider_class(scheme: str) -> type[MasterKey]:
    """The class serving ``scheme``: built-ins first, then entry points."""
    target = _BUILTIN.get(scheme)
    if target is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == scheme:
                cls = load(f"{ep.module}:{ep.attr}", what=f"master key scheme {scheme!r}")
                break
        else:
            known = sorted(
                set(_BUILTIN) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
            )
            raise ConfigurationError(
                f"unknown master key scheme {scheme!r}; known: {', '.join(known)}"
            )
    else:
        cls = load(target, what=f"master key scheme {scheme!r}")
    if not (isinstance(cls, type) and issubclass(cls, MasterKey)):
        raise ConfigurationError(f"provider for {scheme!r} is not a carnet MasterKey")
    return cls


def open_master_key(uri_or_key: str | MasterKey) -> MasterKey:
    """Resolve a URI (or pass through an instance) to a :class:`MasterKey`."""
    if isinstance(uri_or_key, MasterKey):
        return uri_or_key
    if not isinstance(uri_or_key, str):
        raise TypeError("master_key must be a URI string or a carnet MasterKey")
    return provider_class(scheme_of(uri_or_key)).from_uri(uri_or_key)


def create_master_key(uri: str) -> MasterKey:
    """Create a new master key at ``uri`` (file, keyring; KMS/HSM keys are made by their admins)."""
    return provider_class(scheme_of(uri)).create(uri)
