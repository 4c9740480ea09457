"""``file:///path`` master keys, for development and single-server installs.

The file holds one line ``carnet-master-key-v1:<base64 of 32 random bytes>``.
A world-readable master key, or one that another user can replace, undoes the
whole point, so carnet refuses, with a clear error:

- a key file that group or others can read or write, or that a user other
  than the process's own or root owns;
- a key file in a directory, or below one, that such a user owns or that
  group or others can write (a sticky directory such as ``/tmp`` is fine:
  others cannot rename what they do not own there).

Links are followed, so the usual container secret mount works: there
``/run/secrets/x/master.key`` links to ``..data/master.key``, ``..data`` to a
timestamped directory, all owned by root (mount it with mode 0400). The
checks apply to the directory holding the link and to the real file and its
directories. The file is opened once, without following a last link
(``O_NOFOLLOW`` on the resolved path), and the checks on the file itself are
made on what was opened (``fstat``): a file swapped in between a check and the
open is caught.
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


def _trusted(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_directories(directory: str, path: str) -> None:
    """Each directory from ``directory`` to ``/``: ours or root's, not writable by others."""
    d = os.path.realpath(directory)
    while True:
        try:
            st = os.stat(d)
        except OSError as exc:
            raise MasterKeyUnavailable(
                f"cannot stat directory {d} of master key file {path}: {exc.strerror}"
            ) from None
        if not _trusted(st.st_uid):
            raise ConfigurationError(
                f"master key file {path}: directory {d} is owned by uid {st.st_uid}, neither "
                "this process's user nor root, who could replace the key"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ConfigurationError(
                f"master key file {path}: directory {d} is writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}), who could replace the key; "
                f"run: chmod go-w {d}"
            )
        parent = os.path.dirname(d)
        if parent == d:
            return
        d = parent


def _read_key_file(path: str) -> str:
    if not os.path.lexists(path):
        raise ConfigurationError(
            f"master key file {path} does not exist (create one: carnet master new file://{path})"
        )
    # The directory holding the name (and any link), then the real file's.
    _check_directories(os.path.dirname(os.path.abspath(path)), path)
    real = os.path.realpath(path)
    _check_directories(os.path.dirname(real), path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigurationError(
            f"master key file {path} does not exist (create one: carnet master new file://{path})"
        ) from None
    except OSError as exc:
        raise MasterKeyUnavailable(f"cannot open master key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        # Checked on the open file, not on the path: what is read is what was checked.
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"master key file {path} must be a regular file")
        if not _trusted(st.st_uid):
            raise ConfigurationError(
                f"master key file {path} is owned by uid {st.st_uid}, neither this process's "
                "user nor root"
            )
        if st.st_mode & 0o077:
            raise ConfigurationError(
                f"master key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {real}"
            )
        try:
            return fh.read(4096).decode("ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise MasterKeyUnavailable(f"cannot read master key file {path}") from None


class FileMasterKey(LocalMasterKey):
    scheme = "file"

    @classmethod
    def from_uri(cls, uri: str) -> FileMasterKey:
        path = _path_of(uri)
        text = _read_key_file(path)
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
