"""Autogenerate support that needs Alembic itself: imported only when Alembic is in use.

:func:`install` registers, once per process, a comparator that proposes
``carnet.migrate.alembic.upgrade_carnet_tables(op)`` while carnet's tables
are missing or outdated, and the renderer of that proposal. The comparator
acts only in environments configured with
``carnet.migrate.alembic.autogenerate_options()`` (it finds carnet's
``include_object`` filter there); any other Alembic environment in the same
process is left alone.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import comparators, renderers
from alembic.operations import ops

from .. import dbchecks
from ..schema import KEYS_TABLE
from .alembic_ops import DropChecksOp, InstallChecksOp
from .carnet_tables import CarnetObjects, plan_carnet_tables

_lock = threading.Lock()
_installed = False


class UpgradeCarnetTablesOp(ops.MigrateOperation):
    """Autogenerate's proposal: bring carnet's tables up to date (``steps`` say what is missing)."""

    def __init__(self, keys_table: str, steps: list[str]) -> None:
        self.keys_table = keys_table
        self.steps = steps

    def reverse(self) -> KeepCarnetTablesOp:
        return KeepCarnetTablesOp(self.keys_table, self.steps)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("upgrade_carnet_tables", self.keys_table, tuple(self.steps))


class KeepCarnetTablesOp(ops.MigrateOperation):
    """The downgrade of the above: nothing. Dropping the key table would destroy every key."""

    def __init__(self, keys_table: str, steps: list[str]) -> None:
        self.keys_table = keys_table
        self.steps = steps

    def reverse(self) -> UpgradeCarnetTablesOp:
        return UpgradeCarnetTablesOp(self.keys_table, self.steps)

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("keep_carnet_tables", self.keys_table)


def _render_upgrade(autogen_context: Any, op: UpgradeCarnetTablesOp) -> list[str]:
    autogen_context.imports.add("import carnet.migrate.alembic")
    args = "op" if op.keys_table == KEYS_TABLE else f"op, keys_table={op.keys_table!r}"
    return [f"# carnet: {step}" for step in op.steps] + [
        f"carnet.migrate.alembic.upgrade_carnet_tables({args})"
    ]


def _render_keep(autogen_context: Any, op: KeepCarnetTablesOp) -> list[str]:
    # A statement, not only a comment: it may be the whole downgrade() body.
    return [
        "# carnet's tables are kept: dropping the key table destroys every data key",
        "pass",
    ]


def _compare_carnet_tables(autogen_context: Any, upgrade_ops: Any, schemas: Any) -> None:
    flt = autogen_context.opts.get("include_object")
    if not isinstance(flt, CarnetObjects) or not flt.manage_tables or None not in schemas:
        return
    steps = plan_carnet_tables(autogen_context.connection, flt.keys_table)
    if steps:
        upgrade_ops.ops.insert(
            0, UpgradeCarnetTablesOp(flt.keys_table, [s.description for s in steps])
        )


# -- the database checks of encrypted columns on tables that exist already ----------------


def _compare_carnet_checks(autogen_context: Any, upgrade_ops: Any, schemas: Any) -> None:
    """Propose ``op.carnet_install_checks`` for each encrypted column lacking its checks.

    Only tables that exist in the database: a table created by the migration
    gets its checks from ``op.create_table`` (the ``after_create`` event).
    Appended last, so after any ``add_column`` of the same migration.
    """
    flt = autogen_context.opts.get("include_object")
    conn = autogen_context.connection
    if not isinstance(flt, CarnetObjects) or conn is None:
        return
    md = autogen_context.metadata
    metadatas = list(md) if isinstance(md, list | tuple) else [] if md is None else [md]
    insp = sa.inspect(conn)
    dialect = conn.dialect.name
    for metadata in metadatas:
        for table in metadata.sorted_tables:
            if table.schema not in schemas or flt.is_carnet_table(table):
                continue
            if not insp.has_table(table.name, schema=table.schema):
                continue
            for spec in dbchecks.specs_for(table, dialect):
                # Kept in the mode found (an f1 check is reencrypt's to tighten).
                found = dbchecks.mode_installed(conn, spec)
                want = replace(spec, mode=found or spec.mode)
                if dbchecks.missing(conn, want):
                    upgrade_ops.ops.append(InstallChecksOp.from_spec(want))


def _checks_args(op: Any) -> str:
    args = [repr(op.table_name), repr(op.column_name)]
    if op.practice is not None:
        args.append(f"practice={op.practice!r}")
    if op.parent is not None:
        args.append(f"parent={tuple(op.parent)!r}")
    args.append(f"storage={op.storage!r}")
    args.append(f"mode={op.mode!r}")
    if op.schema is not None:
        args.append(f"schema={op.schema!r}")
    if op.label is not None and op.label != f"{op.table_name}.{op.column_name}":
        args.append(f"label={op.label!r}")
    return ", ".join(args)


def _render_install_checks(autogen_context: Any, op: InstallChecksOp) -> str:
    # The import registers the operation with Alembic before op.carnet_* is called.
    autogen_context.imports.add("import carnet.migrate.alembic")
    return f"op.carnet_install_checks({_checks_args(op)})"


def _render_drop_checks(autogen_context: Any, op: DropChecksOp) -> str:
    autogen_context.imports.add("import carnet.migrate.alembic")
    return f"op.carnet_drop_checks({_checks_args(op)})"


def install() -> None:
    """Register the comparator and renderers with Alembic; later calls do nothing."""
    global _installed
    with _lock:
        if _installed:
            return
        # Alembic's global registry "for third party plugins", copied into
        # every autogenerate run; available in the releases before its
        # plugin system (1.18) too.
        comparators.dispatch_for("schema")(_compare_carnet_tables)
        renderers.dispatch_for(UpgradeCarnetTablesOp)(_render_upgrade)
        renderers.dispatch_for(KeepCarnetTablesOp)(_render_keep)
        comparators.dispatch_for("schema")(_compare_carnet_checks)
        renderers.dispatch_for(InstallChecksOp)(_render_install_checks)
        renderers.dispatch_for(DropChecksOp)(_render_drop_checks)
        _installed = True
