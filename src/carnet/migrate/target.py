"""The migration's target: moved to :mod:`carnet.reflect`, where carnet resolves every table."""

from ..reflect import (
    DATE,
    EXPAND,
    IN_PLACE,
    TEXT,
    JoinStep,
    Target,
    TenantPath,
    discover_path,
    parse_via,
    resolve,
)

__all__ = [
    "DATE",
    "EXPAND",
    "IN_PLACE",
    "TEXT",
    "JoinStep",
    "Target",
    "TenantPath",
    "discover_path",
    "parse_via",
    "resolve",
]
