"""Models shared by the core tests: the quickstart's Note, and a Core table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import carnet


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str | None] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    summary: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text")
    )


core_metadata = sa.MetaData()
comments = sa.Table(
    "comments",
    core_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("text", carnet.EncryptedText()),
)


@contextmanager
def configured_keys(
    engine: sa.Engine,
    master_key_uri: str,
    metadata: Sequence[sa.MetaData] = (Base.metadata, core_metadata),
) -> Iterator[carnet.KeyManager]:
    """A KeyManager with its schema and ``metadata``'s tables, as the default manager.

    ``metadata`` defaults to these models (Note and the ``comments`` table); the
    manager is unconfigured and closed on the way out.
    """
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        keys.create_schema()
        for md in metadata:
            md.create_all(engine)
        carnet.configure(keys)
        try:
            yield keys
        finally:
            carnet.configure(None)
    finally:
        keys.close()
