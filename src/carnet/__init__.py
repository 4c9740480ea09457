"""carnet: field-level envelope encryption of medical notes in SQL databases."""

import logging as _logging
from typing import Any

from . import audit, errors
from .context import bind_manager, configure, current_tenant, get_manager, tenant_scope
from .manager import KeyManager
from .providers import MasterKey, create_master_key, open_master_key
from .types import EncryptedBytes, EncryptedJSON, EncryptedText, Sealed

__version__ = "0.1.0"

# A library logs; the application decides where to: no output unless configured.
_logging.getLogger("carnet").addHandler(_logging.NullHandler())

# Nothing is attached to SQLAlchemy at import: carnet._hooks.install() runs
# when a KeyManager is made, configured or bound.
from . import _hooks, context  # noqa: E402

context.on_first_use(_hooks.install)

__all__ = [
    "audit",
    "bind_manager",
    "EncryptedBytes",
    "EncryptedJSON",
    "EncryptedText",
    "KeyManager",
    "MasterKey",
    "Sealed",
    "configure",
    "create_master_key",
    "current_tenant",
    "errors",
    "get_manager",
    "open_master_key",
    "tenant_scope",
]

# Searchable encrypted identifiers (docs/searchable.md).
from . import searchable as searchable  # noqa: E402
from . import transforms  # noqa: E402
from .lookup import search  # noqa: E402
from .types import BlindIndex, EncryptedDate, EncryptedString  # noqa: E402

__all__ += ["BlindIndex", "EncryptedDate", "EncryptedString", "reindex", "search", "transforms"]
from .planner import plan_bits, print_bits_plan  # noqa: E402

__all__ += ["plan_bits", "print_bits_plan"]


def __getattr__(name: str) -> Any:
    # carnet.reindex runs on the batch engine, loaded only when asked for.
    if name == "reindex":
        from .batchops import reindex

        return reindex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
