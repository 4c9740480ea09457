"""Time-out and retry settings shared by the remote master-key providers (KMS, HSM).

Each setting comes from the URI query, else an environment variable, else a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import ConfigurationError

# name -> (environment variable, default)
SettingsTable = Mapping[str, tuple[str, float]]


def parse_number(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or value > 3600:
        raise ConfigurationError(f"{name} must be positive and at most 3600, got {raw!r}")
    if name == "max_attempts" and value != int(value):
        raise ConfigurationError(f"max_attempts must be a whole number, got {raw!r}")
    return value


def resolve_settings(table: SettingsTable, explicit: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, (env, default) in table.items():
        if name in explicit:
            out[name] = explicit[name]
        elif os.environ.get(env):
            out[name] = parse_number(env, os.environ[env])
        else:
            out[name] = float(default)
    return out
