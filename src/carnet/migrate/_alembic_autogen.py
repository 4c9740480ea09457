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
from typing import Any

from alembic.autogenerate import comparators, renderers
from alembic.operations import ops

from ..schema import KEYS_TABLE
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
        _installed = True
