"""``module:attribute`` to an object: the one way carnet imports code it is named.

The application's models (``--app myapp.models:Base``), a blind index
(``--index myapp.models:Patient.phone_bidx``) and master-key providers (the
built-ins by name, plug-ins by their entry point's ``module:attr``) are all
found here. A malformed spec, a module that cannot be imported and a missing
attribute are each a :class:`~carnet.errors.ConfigurationError` naming the
spec, so that the command line reports them as configuration (exit 2). An
error the module itself raises while it is imported, other than an
``ImportError``, is the module's own and propagates.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConfigurationError

__all__ = ["load"]


def load(spec: str, *, what: str, example: str = "package.module:name") -> Any:
    """The object ``spec`` names: ``package.module:attribute`` (``attribute`` may be
    dotted, ``Class.attribute``).

    ``what`` names the spec in errors (an option such as ``--app``, or "master
    key scheme 'x'"); ``example`` shows a well-formed one.
    """
    module_name, sep, path = spec.partition(":")
    parts = path.split(".")
    if not sep or not module_name or module_name.startswith(".") or not all(parts):
        raise ConfigurationError(f"{what} {spec!r}: expected MODULE:ATTRIBUTE, e.g. {example}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            f"{what} {spec!r}: cannot import {module_name!r} ({exc})"
        ) from None
    for i, part in enumerate(parts):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = ":".join([module_name, ".".join(parts[:i])]) if i else module_name
            raise ConfigurationError(
                f"{what} {spec!r}: {where!r} has no attribute {part!r}"
            ) from None
    return obj
