"""Fresh, empty, isolated databases for tests, on SQLite, PostgreSQL and MariaDB.

Plain functions (no pytest) so that tests which need several databases, or
which hand a URL to a subprocess, can use them directly::

    url = make_database("postgresql")
    try:
        ...
    finally:
        drop_database(url)

Server addresses can be overridden with ``CARNET_TEST_POSTGRESQL_URL`` and
``CARNET_TEST_MARIADB_URL`` (an administrative URL: any existing database the
user may connect to, with the right to create and drop databases).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

KINDS = ("sqlite", "postgresql", "mariadb")

# Prefix of every database this module creates; nothing else is ever dropped.
NAME_PREFIX = "carnet_t_"

ADMIN_URLS = {
    "postgresql": os.environ.get(
        "CARNET_TEST_POSTGRESQL_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get(
        "CARNET_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"
    ),
}

# A server that is down should fail the run within seconds, not hang it.
_CONNECT_TIMEOUT = 5

_START_HINTS = {
    "postgresql": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "mariadb": "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
}


class DatabaseUnavailable(RuntimeError):
    """The server for a database kind cannot be reached or refuses to create a database."""


def kind_of(url: str | URL) -> str:
    """``sqlite``, ``postgresql`` or ``mariadb`` for a URL made by :func:`make_database`."""
    backend = make_url(url).get_backend_name()
    if backend == "mysql" or backend == "mariadb":
        return "mariadb"
    if backend in ("sqlite", "postgresql"):
        return backend
    raise ValueError(f"not a test database URL: {backend}")


def _admin_engine(kind: str) -> sa.Engine:
    return sa.create_engine(
        ADMIN_URLS[kind],
        isolation_level="AUTOCOMMIT",
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": _CONNECT_TIMEOUT},
    )


def _new_name() -> str:
    return NAME_PREFIX + secrets.token_hex(6)


def _checked_name(url: URL) -> str:
    name = url.database or ""
    # Names are interpolated into DDL, so only accept what _new_name produces.
    if not (name.startswith(NAME_PREFIX) and name[len(NAME_PREFIX) :].isalnum()):
        raise ValueError(f"refusing to drop a database not made by make_database: {name!r}")
    return name


def server_check(kind: str) -> None:
    """Raise :class:`DatabaseUnavailable` unless the server for ``kind`` accepts connections."""
    if kind == "sqlite":
        return
    engine = _admin_engine(kind)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        raise _unavailable(kind, exc) from exc
    finally:
        engine.dispose()


def _unavailable(kind: str, exc: BaseException) -> DatabaseUnavailable:
    where = make_url(ADMIN_URLS[kind]).render_as_string(hide_password=True)
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    return DatabaseUnavailable(
        f"{kind} server unreachable at {where}: {reason}\n"
        f"Start it with: {_START_HINTS[kind]}\n"
        "(or set CARNET_TEST_ALLOW_SKIP=1 to skip these tests instead of failing)"
    )


def make_database(kind: str, directory: str | Path | None = None) -> str:
    """Create a fresh, empty database of ``kind`` and return its SQLAlchemy URL.

    For SQLite the file goes in ``directory`` (a new temporary directory if
    none). The caller owns the database and drops it with :func:`drop_database`.
    """
    if kind == "sqlite":
        base = (
            Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix=NAME_PREFIX))
        )
        path = (base / f"{_new_name()}.db").resolve()
        return f"sqlite:///{path}"
    if kind not in ADMIN_URLS:
        raise ValueError(f"unknown database kind {kind!r}; known: {', '.join(KINDS)}")

    name = _new_name()
    if kind == "postgresql":
        # template0 rather than template1: whatever someone added to template1
        # would otherwise appear in every "empty" test database.
        ddl = f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'"
    else:
        ddl = f"CREATE DATABASE {name} CHARACTER SET utf8mb4"
    engine = _admin_engine(kind)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(ddl))
    except sa.exc.OperationalError as exc:
        raise _unavailable(kind, exc) from exc
    finally:
        engine.dispose()
    return make_url(ADMIN_URLS[kind]).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str | URL) -> None:
    """Drop a database made by :func:`make_database`, even if connections are still open."""
    parsed = make_url(url)
    kind = kind_of(parsed)
    if kind == "sqlite":
        path = Path(parsed.database or "")
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        if path.parent.name.startswith(NAME_PREFIX):
            shutil.rmtree(path.parent, ignore_errors=True)
        return

    name = _checked_name(parsed)
    engine = _admin_engine(kind)
    try:
        with engine.connect() as conn:
            if kind == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                # MariaDB has no FORCE: a leaked connection holding a metadata
                # lock would make DROP wait forever, so end those first.
                ids = (
                    conn.execute(
                        sa.text(
                            "SELECT id FROM information_schema.processlist "
                            "WHERE db = :db AND id <> CONNECTION_ID()"
                        ),
                        {"db": name},
                    )
                    .scalars()
                    .all()
                )
                for conn_id in ids:
                    try:
                        conn.execute(sa.text(f"KILL {int(conn_id)}"))
                    except sa.exc.DatabaseError:
                        pass  # already gone between the SELECT and the KILL
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
    finally:
        engine.dispose()


def drop_checks(bind: sa.Engine | sa.Connection, table: sa.Table | type) -> list[object]:
    """Remove carnet's database checks from ``table`` (a ``Table`` or a mapped class).

    For tests that plant, on purpose, a value the database would refuse (a
    tampered ciphertext, plaintext, another practice's value, a key id the key
    table does not hold) to check what carnet does when such a value is there
    anyway: a database whose checks a DBA dropped, or rows written before them.
    The checks stay off for the rest of the test: on PostgreSQL and MariaDB
    they could not be put back over the planted row. Returns the specs dropped.
    """
    from carnet import dbchecks

    tbl: sa.Table = getattr(table, "__table__", table)  # type: ignore[assignment]

    def run(conn: sa.Connection) -> list[object]:
        specs = dbchecks.specs_for(tbl, conn.dialect.name)
        dbchecks.drop(conn, specs)
        return list(specs)

    if isinstance(bind, sa.Connection):
        return run(bind)
    with bind.begin() as conn:
        return run(conn)
