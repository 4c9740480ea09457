"""Searchable encrypted identifiers, gathered for applications that import them from here.

Each job lives in its own module:

- :mod:`carnet.types`: the column types, :class:`EncryptedString`,
  :class:`EncryptedDate` and :func:`BlindIndex` beside ``EncryptedText``;
- :mod:`carnet.indexing`: the index values computed on every write path
  (the third step of the statement pipeline, and the ORM flush);
- :mod:`carnet.lookup`: :func:`search` and :func:`candidates`;
- :mod:`carnet.batchops`: re-indexing after an index root rotation, through
  the batch engine (imported on first use: ``import carnet`` does not load
  the batch engine).

docs/searchable.md explains the threat model and how to size ``bits``.
"""

from __future__ import annotations

from typing import Any

from .lookup import candidates, index_spec, index_tenants, search
from .types import (
    BlindIndex,
    BlindIndexAttribute,
    BlindIndexColumn,
    BlindIndexType,
    EncryptedDate,
    EncryptedString,
    ciphertext_width,
)

__all__ = [  # noqa: F822 - reindex is loaded on first use (module __getattr__)
    "BlindIndex",
    "BlindIndexAttribute",
    "BlindIndexColumn",
    "BlindIndexType",
    "EncryptedDate",
    "EncryptedString",
    "candidates",
    "ciphertext_width",
    "index_spec",
    "index_tenants",
    "reindex",
    "search",
]


def __getattr__(name: str) -> Any:
    # reindex runs on the batch engine, loaded only when asked for.
    if name == "reindex":
        from .batchops import reindex

        return reindex
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
