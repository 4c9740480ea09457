"""The tenant invariant, checked by the database itself (docs/threat-model.md).

carnet's Python guard recognises the statements SQLAlchemy builds; SQL has
more shapes than any guard can recognise, and other clients (``psql``, a
service in another language, ``pandas.to_sql``) skip it altogether. So each
encrypted column also carries checks the database runs on every row it is
asked to write, whoever sends it, with no key and nothing secret:

``carnet_f2_<table>_<column>`` (format)
    a non-NULL value is a well-framed carnet value of format v2 (``f1``: v1
    is accepted too, until ``carnet reencrypt`` upgrades the column; ``fm``:
    a migration's mixed-read phase, where legacy plaintext is accepted until
    ``carnet migrate finish``). Refused: :class:`~carnet.errors.InvalidCiphertext`.
``carnet_p_<table>_<column>`` (practice)
    a v2 value names, in its header, exactly the practice its row holds:
    the row's practice column, or the parent row's (``tenant="patient.practice_id"``,
    joined inheritance), compared byte for byte on the UTF-8 of the practice
    rendered as text (no collation, no padding, no case folding; an integer
    practice is its decimal digits). Refused: :class:`~carnet.errors.TenantMismatch`.
``carnet_k_<table>_<column>`` (key)
    where the key table is in the same database: the value's key id is a data
    key of that practice. Refused: :class:`~carnet.errors.UnknownKey`.
``carnet_m_<parent>_<column>`` (move)
    a parent's practice does not change while a child row holds a value
    sealed for it. Refused: :class:`~carnet.errors.TenantMismatch`.

Where each lives: CHECK constraints for what is local to the row on
PostgreSQL and MariaDB; triggers for what needs another row, and for
everything on SQLite (which cannot add a CHECK to an existing table, and whose
``PRAGMA ignore_check_constraints`` would switch a CHECK off). Triggers read
the parent row with a locking read (on PostgreSQL a no-op write of it, at
every isolation level), so a parent moved by a concurrent transaction is seen
(module docs in docs/threat-model.md).

The database checks what a value *claims*: a forged header or a value cut
short that still looks well framed passes here and fails at read with
``InvalidCiphertext``; the AEAD is what authenticates. No check decodes
base64 or hex (PostgreSQL's ``decode()`` quotes its bad input in its error);
the practice is compared as hex or bytes.

The package, by job: :mod:`~carnet.dbchecks.columns` (which columns, and the
:class:`ColumnSpec` of each), :mod:`~carnet.dbchecks.ddl` (the SQL each
dialect gets), :mod:`~carnet.dbchecks.installing` (install, drop, find, and
with the table), :mod:`~carnet.dbchecks.ops` (census, modes, status: the
commands' side), :mod:`~carnet.dbchecks.refusals` (a refusal as carnet's
error). Callers import the names below from ``carnet.dbchecks``.
"""

from __future__ import annotations

# ``dbchecks.replace(spec, mode=...)``: the module re-exported it before it was a package.
from dataclasses import replace  # noqa: F401

from ..types import encrypted_type
from .columns import (
    MODES,
    NAME_RE,
    OPT_OUT,
    ColumnSpec,
    Mode,
    Parent,
    check_name,
    check_practice_type,
    column_spec,
    format_only,
    install_command,
    is_encrypted,
    specs_for,
    specs_for_metadata,
    storage_of,
)
from .ddl import VALUE_KEY_KINDS, DDLObject, ddl_objects
from .installing import (
    attach,
    disabled,
    drop,
    expected,
    install,
    installed,
    key_table_here,
    missing,
    mode_installed,
    set_format_mode,
)
from .ops import (
    Census,
    ColumnChecks,
    accept_labels,
    census,
    choose_mode,
    column_checks,
    install_chosen,
    status,
    tighten,
    tighten_after_reencrypt,
)
from .refusals import check_of, error_for, scrub

__all__ = [
    "MODES",
    "NAME_RE",
    "OPT_OUT",
    "VALUE_KEY_KINDS",
    "Census",
    "ColumnChecks",
    "ColumnSpec",
    "DDLObject",
    "Mode",
    "Parent",
    "accept_labels",
    "attach",
    "census",
    "check_name",
    "check_of",
    "check_practice_type",
    "choose_mode",
    "column_checks",
    "column_spec",
    "ddl_objects",
    "disabled",
    "drop",
    "encrypted_type",
    "error_for",
    "expected",
    "format_only",
    "install",
    "install_chosen",
    "install_command",
    "installed",
    "is_encrypted",
    "key_table_here",
    "missing",
    "mode_installed",
    "scrub",
    "set_format_mode",
    "specs_for",
    "specs_for_metadata",
    "status",
    "storage_of",
    "tighten",
    "tighten_after_reencrypt",
]
