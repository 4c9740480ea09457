"""The migration's target: moved to :mod:`carnet.reflect`, where carnet resolves every table."""

from ..reflect import (
    BYTES,
    DATE,
    EXPAND,
    IN_PLACE,
    JSON,
    TEXT,
    JoinStep,
    Target,
    TenantPath,
    discover_path,
    parse_via,
    resolve,
)

__all__ = [
    "BYTES",
    "DATE",
    "EXPAND",
    "IN_PLACE",
    "JSON",
    "TEXT",
    "JoinStep",
    "Target",
    "TenantPath",
    "discover_path",
    "parse_via",
    "resolve",
]
