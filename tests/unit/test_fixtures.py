"""The database fixtures give what they promise: the right backend, empty, isolated, dropped."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from support.dbutil import ADMIN_URLS, drop_database, kind_of, make_database

EXPECTED_DIALECT = {"sqlite": "sqlite", "postgresql": "postgresql", "mariadb": "mysql"}


def _table_names(url: str) -> list[str]:
    eng = sa.create_engine(url)
    try:
        return sa.inspect(eng).get_table_names()
    finally:
        eng.dispose()


def _database_exists(url: str) -> bool:
    parsed = sa.engine.make_url(url)
    kind = kind_of(parsed)
    if kind == "sqlite":
        return Path(parsed.database or "").exists()
    admin = sa.create_engine(ADMIN_URLS[kind], poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            if kind == "postgresql":
                query = "SELECT count(*) FROM pg_database WHERE datname = :n"
            else:
                query = "SELECT count(*) FROM information_schema.schemata WHERE schema_name = :n"
            return bool(conn.execute(sa.text(query), {"n": parsed.database}).scalar_one())
    finally:
        admin.dispose()


def test_backend_matches_parameter(db_kind: str, engine: sa.Engine) -> None:
    assert engine.dialect.name == EXPECTED_DIALECT[db_kind]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
        if db_kind == "mariadb":
            # The test servers are MariaDB, not MySQL: some behaviour differs.
            version = conn.execute(sa.text("SELECT VERSION()")).scalar_one()
            assert "mariadb" in version.lower()


def test_parameter_ids(request: pytest.FixtureRequest, db_kind: str) -> None:
    assert request.node.callspec.id == db_kind


def test_database_is_fresh_and_empty(db_url: str, engine: sa.Engine) -> None:
    name = sa.engine.make_url(db_url).database or ""
    assert Path(name).name.startswith("carnet_t_")
    assert sa.inspect(engine).get_table_names() == []


def test_databases_are_isolated(engine: sa.Engine, fresh_db_url_factory: Callable[[], str]) -> None:
    other_url = fresh_db_url_factory()
    assert other_url != str(engine.url)
    table = sa.Table("notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    table.create(engine)

    assert sa.inspect(engine).get_table_names() == ["notes"]
    assert _table_names(other_url) == []


@pytest.mark.parametrize("db_kind", ["mariadb"])
def test_mariadb_database_uses_utf8mb4(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        charset = conn.execute(
            sa.text(
                "SELECT default_character_set_name FROM information_schema.schemata "
                "WHERE schema_name = DATABASE()"
            )
        ).scalar_one()
    assert charset == "utf8mb4"


def test_non_ascii_round_trip(engine: sa.Engine) -> None:
    table = sa.Table(
        "t",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("body", sa.Text),
    )
    table.create(engine)
    text = "Pénélope — état dépressif 🩺"
    with engine.begin() as conn:
        conn.execute(table.insert(), {"id": 1, "body": text})
    with engine.connect() as conn:
        assert conn.execute(sa.select(table.c.body)).scalar_one() == text


def test_make_and_drop_database(db_kind: str, tmp_path: Path) -> None:
    url = make_database(db_kind, directory=tmp_path)
    try:
        assert kind_of(url) == db_kind
        assert _table_names(url) == []
        assert _database_exists(url)
    finally:
        drop_database(url)
    assert not _database_exists(url)


def test_drop_database_with_open_connection(db_kind: str, tmp_path: Path) -> None:
    url = make_database(db_kind, directory=tmp_path)
    eng = sa.create_engine(url)
    conn = eng.connect()
    try:
        conn.execute(sa.text("CREATE TABLE held (id INTEGER PRIMARY KEY)"))
        conn.commit()
        conn.execute(sa.text("SELECT * FROM held")).all()
        # A test that forgets to close a connection must not leave its database behind.
        drop_database(url)
        assert not _database_exists(url)
    finally:
        conn.invalidate()
        eng.dispose()


def test_drop_refuses_foreign_database() -> None:
    with pytest.raises(ValueError, match="refusing"):
        drop_database(sa.engine.make_url(ADMIN_URLS["postgresql"]))


def test_master_key_uri(master_key_uri: str) -> None:
    assert master_key_uri.startswith("file:///")
    path = Path(master_key_uri[len("file://") :])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    from carnet.providers import open_master_key

    key = open_master_key(master_key_uri)
    context = {"tenant": "p1", "key_id": "00" * 16}
    dek = os.urandom(32)
    assert key.unwrap(key.wrap(dek, context), context) == dek
