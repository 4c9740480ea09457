"""``op.carnet_install_checks`` / ``op.carnet_drop_checks``: the database checks, as Alembic ops.

Registered with :meth:`alembic.operations.Operations.register_operation` when
``carnet.migrate.alembic`` is imported (every migration that uses them
imports it). The operation carries what the checks compare (table, column,
practice column or parent join, storage, mode), not SQL: its implementation
builds a :class:`carnet.dbchecks.ColumnSpec` and calls
:func:`carnet.dbchecks.install` / :func:`~carnet.dbchecks.drop` at run time
on the migration's connection, so each database gets its own DDL. In offline
mode (``alembic upgrade --sql``) the DDL of the migration's dialect is
written out, without the key check (the key table cannot be looked up).

``mode="auto"`` picks, at run time, the strictest mode the rows allow
(:func:`carnet.dbchecks.choose_mode`) and refuses when none does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from alembic.operations import MigrateOperation, Operations

from .. import dbchecks
from ..errors import ConfigurationError

ParentArg = Sequence[str] | dict[str, str] | None


def _parent(parent: ParentArg, schema: str | None) -> dbchecks.Parent | None:
    """``(fk, parent_table, parent_key, parent_practice)`` or the same as a dict."""
    if parent is None:
        return None
    if isinstance(parent, dict):
        return dbchecks.Parent(
            fk=parent["fk"],
            table=parent["table"],
            schema=parent.get("schema", schema),
            key=parent["key"],
            practice=parent["practice"],
        )
    fk, table, key, practice = parent
    return dbchecks.Parent(fk=fk, table=table, schema=schema, key=key, practice=practice)


class _ChecksOp(MigrateOperation):
    def __init__(
        self,
        table_name: str,
        column_name: str,
        *,
        practice: str | None = None,
        parent: ParentArg = None,
        storage: str = "binary",
        mode: str = "v2",
        schema: str | None = None,
        label: str | None = None,
    ) -> None:
        if mode not in (*dbchecks.MODES, "auto"):
            raise ConfigurationError(f"mode must be v2, v1, mixed or auto, not {mode!r}")
        if storage not in ("binary", "text"):
            raise ConfigurationError(f"storage must be 'binary' or 'text', not {storage!r}")
        if practice is not None and parent is not None:
            raise ConfigurationError("give practice= (a column of the row) or parent=, not both")
        self.table_name = table_name
        self.column_name = column_name
        self.practice = practice
        self.parent = tuple(parent) if isinstance(parent, list | tuple) else parent
        self.storage = storage
        self.mode = mode
        self.schema = schema
        self.label = label

    def spec(self) -> dbchecks.ColumnSpec:
        return dbchecks.ColumnSpec(
            table=self.table_name,
            schema=self.schema,
            column=self.column_name,
            storage=self.storage,  # type: ignore[arg-type]
            practice=self.practice,
            parent=_parent(self.parent, self.schema),
            mode="v2" if self.mode == "auto" else self.mode,  # type: ignore[arg-type]
            label=self.label,
        )

    @classmethod
    def from_spec(cls, spec: dbchecks.ColumnSpec) -> Any:
        p = spec.parent
        return cls(
            spec.table,
            spec.column,
            practice=spec.practice,
            parent=None if p is None else (p.fk, p.table, p.key, p.practice),
            storage=spec.storage,
            mode=spec.mode,
            schema=spec.schema,
            label=spec.label,
        )

    def _args(self) -> dict[str, Any]:
        return {
            "practice": self.practice,
            "parent": self.parent,
            "storage": self.storage,
            "mode": self.mode,
            "schema": self.schema,
            "label": self.label,
        }


@Operations.register_operation("carnet_install_checks")
class InstallChecksOp(_ChecksOp):
    """Create (or replace) carnet's database checks of one encrypted column."""

    @classmethod
    def carnet_install_checks(
        cls, operations: Operations, table_name: str, column_name: str, **kw: Any
    ) -> Any:
        """``op.carnet_install_checks("notes", "body", practice="practice_id")``."""
        return operations.invoke(cls(table_name, column_name, **kw))

    def reverse(self) -> DropChecksOp:
        return DropChecksOp(self.table_name, self.column_name, **self._args())

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("carnet_install_checks", self.table_name, self.column_name, self.mode)


@Operations.register_operation("carnet_drop_checks")
class DropChecksOp(_ChecksOp):
    """Remove carnet's database checks of one encrypted column (every mode)."""

    @classmethod
    def carnet_drop_checks(
        cls, operations: Operations, table_name: str, column_name: str, **kw: Any
    ) -> Any:
        """``op.carnet_drop_checks("notes", "body", practice="practice_id")``."""
        return operations.invoke(cls(table_name, column_name, **kw))

    def reverse(self) -> InstallChecksOp:
        return InstallChecksOp(self.table_name, self.column_name, **self._args())

    def to_diff_tuple(self) -> tuple[Any, ...]:
        return ("carnet_drop_checks", self.table_name, self.column_name)


def _offline(operations: Operations) -> bool:
    return bool(operations.migration_context.as_sql)


@Operations.implementation_for(InstallChecksOp)
def _install(operations: Operations, op: InstallChecksOp) -> None:
    spec = op.spec()
    if _offline(operations):
        if op.mode == "auto":
            raise ConfigurationError(
                "mode='auto' reads the rows: not available in offline mode (--sql)"
            )
        dialect = operations.migration_context.dialect
        for sql in _drop_sql(spec, dialect):
            operations.execute(sa.DDL(sql.replace("%", "%%")))
        for obj in dbchecks.ddl_objects(spec, dialect, keys_table=None):
            for sql in obj.create:
                operations.execute(sa.DDL(sql.replace("%", "%%")))
        return
    conn = operations.get_bind()
    if op.mode == "auto":
        dbchecks.install_chosen(conn, [replace(spec, mode="v2")])
    else:
        dbchecks.install(conn, [spec])


@Operations.implementation_for(DropChecksOp)
def _drop(operations: Operations, op: DropChecksOp) -> None:
    spec = op.spec()
    if _offline(operations):
        for sql in _drop_sql(spec, operations.migration_context.dialect):
            operations.execute(sa.DDL(sql.replace("%", "%%")))
        return
    dbchecks.drop(operations.get_bind(), [spec])


def _drop_sql(spec: dbchecks.ColumnSpec, dialect: sa.Dialect) -> list[str]:
    out: list[str] = []
    for mode in dbchecks.MODES:
        for keys in (None, "carnet_keys"):
            objs = dbchecks.ddl_objects(replace(spec, mode=mode), dialect, keys_table=keys)
            for obj in reversed(objs):
                for sql in obj.drop:
                    if sql not in out:
                        out.append(sql)
    return out
