"""``file:///path`` master keys, for development and single-server installs.

The file holds one line ``carnet-master-key-v1:<base64 of 32 random bytes>``.
carnet refuses a key file that group or others can read or write, and a
symlinked or missing one, with a clear error: a world-readable master key
undoes the whole point.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from urllib.parse import unquote, urlsplit

from ..errors import ConfigurationError, MasterKeyUnavailable
from ._local import SECRET_SIZE, LocalMasterKey

HEADER = "carnet-master-key-v1:"


def _path_of(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path:
        raise ConfigurationError(
            f"file master key URI must look like file:///abs/path, got {uri!r}"
        )
    return unquote(parts.path)


class FileMasterKey(LocalMasterKey):
    scheme = "file"

    @classmethod
    def from_uri(cls, uri: str) -> FileMasterKey:
        path = _path_of(uri)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise ConfigurationError(
                f"master key file {path} does not exist (create one: carnet master new file://{path})"
            ) from None
        except OSError as exc:
            raise MasterKeyUnavailable(
                f"cannot stat master key file {path}: {exc.strerror}"
            ) from None
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"master key file {path} must be a regular file, not a link")
        if st.st_mode & 0o077:
            raise ConfigurationError(
                f"master key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        try:
            with open(path, encoding="ascii") as fh:
                text = fh.read().strip()
        except (OSError, UnicodeDecodeError):
            raise MasterKeyUnavailable(f"cannot read master key file {path}") from None
        if not text.startswith(HEADER):
            raise ConfigurationError(f"{path} is not a carnet master key file")
        try:
            secret = base64.b64decode(text[len(HEADER) :], validate=True)
        except (binascii.Error, ValueError):
            raise ConfigurationError(f"{path} is not a carnet master key file") from None
        if len(secret) != SECRET_SIZE:
            raise ConfigurationError(f"{path} is not a carnet master key file")
        return cls(f"file://{path}", secret)

    @classmethod
    def create(cls, uri: str) -> FileMasterKey:
        path = _path_of(uri)
        secret = os.urandom(SECRET_SIZE)
        # O_EXCL: never overwrite an existing master key, which would orphan every DEK.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"master key file {path} already exists; not overwriting"
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(HEADER + base64.b64encode(secret).decode("ascii") + "\n")
        return cls(f"file://{path}", secret)
