"""``carnet_migrations``: one row per migrated column, ``running`` then ``strict``.

``finish`` writes ``strict`` only after reading back every value and opening
it; the Alembic contract helper refuses to drop a legacy column that is not
``strict``, so a schema change cannot outrun the data.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .keystore import utcnow

RUNNING = "running"
STRICT = "strict"

_md = sa.MetaData()
MIGRATIONS = sa.Table(
    "carnet_migrations",
    _md,
    sa.Column("table_name", sa.String(255), primary_key=True),
    sa.Column("column_name", sa.String(255), primary_key=True),
    sa.Column("source_column", sa.String(255), nullable=False),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("label", sa.String(1024), nullable=False),
    sa.Column("tenant", sa.String(1024), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("rows_sealed", sa.BigInteger, nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
)


def ensure(engine: sa.Engine) -> None:
    try:
        MIGRATIONS.create(engine, checkfirst=True)
    except sa.exc.DatabaseError:
        if not sa.inspect(engine).has_table(MIGRATIONS.name):
            raise


def get(bind: sa.Engine | sa.Connection, table: str, column: str) -> dict[str, Any] | None:
    conn_ctx = bind.connect() if isinstance(bind, sa.Engine) else None
    conn = conn_ctx if conn_ctx is not None else bind
    assert isinstance(conn, sa.Connection)  # noqa: S101 - narrowed above
    try:
        if not sa.inspect(conn).has_table(MIGRATIONS.name):
            return None
        t = MIGRATIONS
        row = conn.execute(
            sa.select(t).where(t.c.table_name == table, t.c.column_name == column)
        ).first()
        return dict(row._mapping) if row is not None else None
    finally:
        if conn_ctx is not None:
            conn_ctx.close()


def record(engine: sa.Engine, desc: dict[str, Any], state: str, rows: int | None = None) -> None:
    ensure(engine)
    t = MIGRATIONS
    now = utcnow()
    values = {
        "source_column": desc["source"],
        "mode": desc["mode"],
        "label": desc["label"],
        "tenant": desc["tenant"],
        "state": state,
        "rows_sealed": rows,
        "finished_at": now if state == STRICT else None,
    }
    with engine.begin() as conn:
        n = conn.execute(
            t.update()
            .where(t.c.table_name == desc["table"], t.c.column_name == desc["column"])
            .values(values)
        ).rowcount
        if n == 0:
            try:
                conn.execute(
                    t.insert().values(
                        table_name=desc["table"],
                        column_name=desc["column"],
                        started_at=now,
                        **values,
                    )
                )
            except sa.exc.IntegrityError:
                # Another worker inserted it between our UPDATE and INSERT.
                conn.execute(
                    t.update()
                    .where(t.c.table_name == desc["table"], t.c.column_name == desc["column"])
                    .values(values)
                )
