"""Fixtures shared by every test: fresh databases on each backend, a master key, a manager.

``db_url`` (and ``engine`` built on it) runs a test once per backend, with ids
``sqlite``, ``postgresql`` and ``mariadb``; each run gets its own new, empty
database, dropped afterwards. A test that only makes sense on some backends
overrides the parameter::

    @pytest.mark.parametrize("db_kind", ["postgresql"])
    def test_something(engine): ...

An unreachable PostgreSQL or MariaDB fails the test (a silently skipped
backend is how portability bugs ship) unless CARNET_TEST_ALLOW_SKIP=1.

``keys`` is the KeyManager most tests use, defined here only: on ``engine``,
with the tables of ``keys_metadata`` (support.models' by default; a module with
models of its own overrides ``keys_metadata``), carnet's default manager for the
test. ``unconfigured_keys`` is one that is not the default. A module that needs
anything else names its fixture for the difference (``sqlite_keys``,
``race_keys``...) rather than shadowing ``keys``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa

from support.dbutil import DatabaseUnavailable, drop_database, make_database, server_check

if TYPE_CHECKING:
    import carnet

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


@pytest.fixture
def keys_metadata() -> Sequence[sa.MetaData]:
    """The models whose tables ``keys`` creates: support.models' ``notes`` and ``comments``.

    A test module with models of its own overrides this fixture (returning its
    ``Base.metadata``, or nothing) instead of defining another ``keys``.
    """
    from support.models import Base, core_metadata

    return (Base.metadata, core_metadata)


@pytest.fixture
def keys(
    engine: sa.Engine, master_key_uri: str, keys_metadata: Sequence[sa.MetaData]
) -> Iterator[carnet.KeyManager]:
    """A KeyManager on ``engine``, with its key table and ``keys_metadata``'s tables.

    It is carnet's default manager for the test (``carnet.configure``), then
    unconfigured and closed.
    """
    from support.models import configured_keys

    with configured_keys(engine, master_key_uri, keys_metadata) as manager:
        yield manager


@pytest.fixture
def unconfigured_keys(engine: sa.Engine, master_key_uri: str) -> Iterator[carnet.KeyManager]:
    """A KeyManager on ``engine`` with its key table only, not carnet's default manager.

    For tests that hand the manager to every call themselves, so that code
    reaching for the default manager instead fails (there is none); closed
    afterwards.
    """
    import carnet

    manager = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        manager.create_schema()
        yield manager
    finally:
        manager.close()
