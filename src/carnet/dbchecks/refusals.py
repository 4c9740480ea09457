"""The database's refusal as carnet's error, named by the check that refused.

The pipeline's error hook (:mod:`carnet._hooks`) asks :func:`check_of` which
check a driver's error reports, raises :func:`error_for` it, and
:func:`scrub`\\ s the driver's error of the row it quotes.
"""

from __future__ import annotations

from ..errors import CarnetError, InvalidCiphertext, TenantMismatch, UnknownKey
from .columns import NAME_RE

_MESSAGES = {
    "f": "the database refused a value that is not carnet ciphertext of a format this column "
    "accepts",
    "p": "the database refused a value sealed for another practice than its row's",
    "k": "the database refused a value whose key is not a data key of its row's practice",
    "m": "the database refused to change a practice while rows hold values sealed for it",
}


def check_of(exc: BaseException) -> str | None:
    """The name of the carnet check a DBAPI error reports, else None.

    PostgreSQL names it in the error's diagnostics; SQLite and MariaDB in the
    message, which for carnet's checks is the name itself (a trigger's RAISE
    or SIGNAL) or names the constraint.
    """
    diag = getattr(exc, "diag", None)
    if diag is not None:
        name = getattr(diag, "constraint_name", None)
        return name if name and NAME_RE.fullmatch(name) else None
    args = getattr(exc, "args", ())
    for arg in args:
        if isinstance(arg, str):
            m = NAME_RE.search(arg)
            if m:
                return m.group(0)
    return None


def error_for(name: str) -> CarnetError:
    """carnet's error for a refusal by check ``name``."""
    kind = name.split("_", 2)[1]
    base = kind[0]
    message = f"{_MESSAGES[base]} ({name}); nothing of the statement was written"
    err: CarnetError
    if base == "f":
        err = InvalidCiphertext(f"not stored: {message}")
    elif base == "k":
        err = UnknownKey(b"", message)
    else:
        err = TenantMismatch("", "", message)
    err.constraint = name
    return err


def scrub(exc: BaseException, name: str) -> None:
    """Drop from a driver's error what it quotes of the refused row.

    PostgreSQL's CHECK error carries ``Failing row contains (...)``: the
    row, plaintext note included when plaintext was refused.
    """
    exc.args = (f"refused by {name}",)
