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

from . import dbchecks, guard
from .errors import CarnetError

_installed = False


def _handle_error(ctx: Any) -> BaseException | None:
    orig = ctx.original_exception
    if isinstance(orig, CarnetError):
        return orig
    # A refusal by one of carnet's database checks: carnet's error, chosen by
    # the check's name, and the driver's error stripped of the row it quotes.
    name = dbchecks.check_of(orig)
    if name is not None:
        dbchecks.scrub(orig, name)
        sa_exc = ctx.sqlalchemy_exception
        if sa_exc is not None:
            sa_exc.hide_parameters = True
            sa_exc.params = None
            sa_exc.args = (f"refused by {name}",)
        return dbchecks.error_for(name)
    # Any other failure: strip the notes SQLAlchemy's error would show (see
    # carnet._redact). Imported on the first failed statement only.
    from ._redact import redact

    redact(ctx)
    return None


def install() -> None:
    """Attach carnet's SQLAlchemy listeners; idempotent, and never at import.

    Called when a :class:`~carnet.KeyManager` is made or configured, or a
    manager is bound to an engine: an application that imports carnet without
    using it keeps SQLAlchemy untouched. Mappers configured before that are
    set up here too.
    """
    global _installed
    if _installed:
        return
    from . import orm, searchable, tenancy

    event.listen(sa.Engine, "handle_error", _handle_error)
    guard.install()  # refuse SQL that would compute on ciphertext (carnet.guard)
    orm.install()
    tenancy.install()  # the write guard of the tenant invariant
    searchable.install()
    _installed = True
    # Models mapped and configured before carnet was: set them up now.
    from sqlalchemy.orm import mapperlib

    for registry in list(mapperlib._mapper_registries):
        for mapper in list(registry.mappers):
            if mapper.configured:
                orm.setup_mapper(mapper, mapper.class_)
                searchable.setup_mapper(mapper, mapper.class_)
