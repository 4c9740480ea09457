"""Alembic environment of the example: online migrations against CARNET_DATABASE_URL."""

from __future__ import annotations

import os

import sqlalchemy as sa
from alembic import context

config = context.config
url = config.get_main_option("sqlalchemy.url") or os.environ["CARNET_DATABASE_URL"]
engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
