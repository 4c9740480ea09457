"""Engine-wide hooks.

- Keep plaintext out of SQLAlchemy's own error messages. When a bind
  processor raises inside statement execution (a missing tenant, an
  unreachable master key), SQLAlchemy wraps the error in ``StatementError``,
  whose text lists the statement's parameters: the note in clear. This hook
  re-raises carnet's own error instead, whose message carries no plaintext.

The write guard (practice binding, first keys) lives in :mod:`carnet.tenancy`.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

from . import guard
from .errors import CarnetError

_installed = False


def _handle_error(ctx: Any) -> BaseException | None:
    orig = ctx.original_exception
    if isinstance(orig, CarnetError):
        return orig
    # Any other failure: strip the notes SQLAlchemy's error would show (see
    # carnet._redact). Imported on the first failed statement only.
    from ._redact import redact

    redact(ctx)
    return None


def install() -> None:
    global _installed
    if not _installed:
        event.listen(sa.Engine, "handle_error", _handle_error)
        guard.install()  # refuse SQL that would compute on ciphertext (carnet.guard)
        _installed = True
