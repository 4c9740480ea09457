"""Fixtures shared by every test: fresh databases on each backend, a master key.

``db_url`` (and ``engine`` built on it) runs a test once per backend, with ids
``sqlite``, ``postgresql`` and ``mariadb``; each run gets its own new, empty
database, dropped afterwards. A test that only makes sense on some backends
overrides the parameter::

    @pytest.mark.parametrize("db_kind", ["postgresql"])
    def test_something(engine): ...

An unreachable PostgreSQL or MariaDB fails the test (a silently skipped
backend is how portability bugs ship) unless CARNET_TEST_ALLOW_SKIP=1.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from support.dbutil import DatabaseUnavailable, drop_database, make_database, server_check

# Fixtures of the real components (moto's KMS server, SoftHSM2, a private
# Secret Service), declared once here: each starts only when a test asks for it.
pytest_plugins = ("support.kms_server", "support.softhsm", "support.secret_service")

_ALLOW_SKIP = os.environ.get("CARNET_TEST_ALLOW_SKIP") == "1"

# One connection attempt per server per session: when a server is down every
# test would otherwise spend the connect timeout finding out again.
_server_state: dict[str, DatabaseUnavailable | None] = {}


def _require_server(kind: str) -> None:
    if kind not in _server_state:
        try:
            server_check(kind)
        except DatabaseUnavailable as exc:
            _server_state[kind] = exc
        else:
            _server_state[kind] = None
    problem = _server_state[kind]
    if problem is not None:
        if _ALLOW_SKIP:
            pytest.skip(str(problem))
        pytest.fail(str(problem), pytrace=False)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.db),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.db),
    ]
)
def db_kind(request: pytest.FixtureRequest) -> str:
    """The backend under test: ``sqlite``, ``postgresql`` or ``mariadb``."""
    kind: str = request.param
    _require_server(kind)
    return kind


@pytest.fixture
def fresh_db_url_factory(db_kind: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Call it to get another fresh, empty database of the same backend as ``db_url``.

    Every database it hands out is dropped when the test ends.
    """
    created: list[str] = []

    def factory() -> str:
        try:
            url = make_database(db_kind, directory=tmp_path)
        except DatabaseUnavailable as exc:
            if _ALLOW_SKIP:
                pytest.skip(str(exc))
            pytest.fail(str(exc), pytrace=False)
        created.append(url)
        return url

    yield factory
    errors: list[BaseException] = []
    for url in reversed(created):
        try:
            drop_database(url)
        except Exception as exc:  # noqa: BLE001 - drop the others before reporting
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def db_url(fresh_db_url_factory: Callable[[], str]) -> str:
    """SQLAlchemy URL of a new, empty database for this test alone, dropped afterwards."""
    return fresh_db_url_factory()


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """An engine on ``db_url``; disposed before the database is dropped."""
    eng = sa.create_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def master_key_uri(tmp_path: Path) -> str:
    """URI of a new file master key in this test's temporary directory."""
    from carnet.providers import create_master_key

    uri = "file://" + str(tmp_path / "master.key")
    create_master_key(uri).close()
    return uri
