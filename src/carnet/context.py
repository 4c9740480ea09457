"""Process-wide configuration and the tenant in scope.

``configure(keys)`` names the default :class:`KeyManager` for every
``EncryptedText`` column that was not given one: model modules can then be
imported before any key configuration exists, and resolve the manager only
when a value is written or read.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .manager import KeyManager

_default_manager: KeyManager | None = None
_tenant: ContextVar[str | None] = ContextVar("carnet_tenant", default=None)
# The scope's context variable itself, for carnet's hot paths (``SCOPE.get``
# costs no extra call); everyone else uses current_tenant() / tenant_scope().
SCOPE = _tenant
# Managers bound to an engine, by the engine's Dialect: a type's bind and
# result processors see only the dialect, and every Engine has its own.
_bound: weakref.WeakKeyDictionary[Any, KeyManager] = weakref.WeakKeyDictionary()
# Bumped whenever a binding or the default manager changes. A column type's
# processors keep the manager they resolved for their dialect while this is
# unchanged: resolving it per value (a weak-key lookup and three calls) cost
# about 0.3 µs a value, as much as the rest of a warm open.
EPOCH = [0]


# What carnet attaches to SQLAlchemy when first used (set by the package,
# carnet._hooks.install): this low layer calls up into it without importing it.
_activators: list[Callable[[], None]] = []


def on_first_use(fn: Callable[[], None]) -> None:
    """Register ``fn`` to run (once per process, idempotently) when carnet is first used."""
    if fn not in _activators:
        _activators.append(fn)


def activate() -> None:
    """Attach carnet's hooks: called when a KeyManager is made, configured or bound."""
    for fn in _activators:
        fn()


def bind_manager(bind: Any, manager: KeyManager | None) -> None:
    """Make ``manager`` the one for statements run on ``bind`` (an Engine or AsyncEngine).

    ``None`` removes the binding. A column's own ``manager=`` still wins; the
    process default of :func:`configure` serves every engine not bound.
    """
    engine = getattr(bind, "sync_engine", bind)
    dialect = getattr(engine, "dialect", None)
    if dialect is None:
        raise ConfigurationError("bind() takes an Engine or an AsyncEngine")
    if manager is None:
        _bound.pop(dialect, None)
    else:
        activate()
        _bound[dialect] = manager
    EPOCH[0] += 1


def manager_for(dialect: Any) -> KeyManager:
    """The manager for statements on ``dialect``: bound to its engine, else the default."""
    manager = _bound.get(dialect) if dialect is not None else None
    return manager if manager is not None else get_manager()


def configure(manager: KeyManager | None, *, require_scope: bool | None = None) -> None:
    """Set (or with ``None`` clear) the default KeyManager of EncryptedText columns.

    ``require_scope=True`` turns on strict mode for that manager: every
    application seal and open, ORM included, then needs a
    :func:`tenant_scope` that matches the row's practice, so a scope lost on
    the way (a web framework running a dependency in another context) raises
    ``TenantRequired`` instead of returning a note. carnet's own re-seal of a
    row moved to another practice stays allowed under a scope of the
    practice it leaves.
    """
    global _default_manager
    if manager is not None:
        activate()
    if manager is not None and require_scope is not None:
        manager.require_scope = require_scope
    _default_manager = manager
    EPOCH[0] += 1


def default_manager() -> KeyManager | None:
    """The manager given to :func:`configure`, or None."""
    return _default_manager


def get_manager() -> KeyManager:
    if _default_manager is None:
        raise ConfigurationError(
            "no KeyManager configured: call carnet.configure(KeyManager(...)) at start-up, "
            "or pass manager= to EncryptedText"
        )
    return _default_manager


@contextmanager
def tenant_scope(tenant: str) -> Iterator[str]:
    """Run a block with ``tenant`` choosing the data key of Core reads and writes.

    With the ORM the row's own tenant column decides; a scope then acts as a
    guard: a row of another tenant raises ``TenantMismatch``.
    """
    if not isinstance(tenant, str) or not tenant:
        raise ConfigurationError("tenant_scope needs a non-empty tenant id string")
    token = _tenant.set(tenant)
    try:
        yield tenant
    finally:
        try:
            _tenant.reset(token)
        except ValueError:
            # Left in another context than it was entered in (a generator
            # dependency finalised elsewhere): reset does not apply there, so
            # restore the value this scope replaced instead of masking the
            # application's own exception with ContextVar's.
            before = token.old_value
            _tenant.set(None if before is Token.MISSING else before)


@contextmanager
def without_scope() -> Iterator[None]:
    """Run a block with no tenant scope: carnet's own reads of stored values,
    which come back Sealed and are opened under the practice they belong to."""
    token = _tenant.set(None)
    try:
        yield
    finally:
        _tenant.reset(token)


def current_tenant() -> str | None:
    """The tenant of the innermost ``tenant_scope``, or None."""
    return _tenant.get()
