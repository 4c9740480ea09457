"""KeyManager.from_env reads the CARNET_* variables as the CLI does, after a master rotation too."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from carnet.errors import ConfigurationError
from carnet.manager import EnvSettings, env_settings, split_master_keys


def test_split_and_read_the_environment() -> None:
    assert split_master_keys(" file:///a , ,keyring://s/n,") == ("file:///a", "keyring://s/n")
    assert split_master_keys(None) == ()
    env = env_settings(
        {
            "CARNET_DATABASE_URL": "postgresql+psycopg://app:hunter2@db/clinic",
            "CARNET_MASTER_KEY": "file:///m",
            "CARNET_PREVIOUS_MASTER_KEYS": "file:///old1,file:///old2",
        }
    )
    assert env == EnvSettings(
        "postgresql+psycopg://app:hunter2@db/clinic", "file:///m", ("file:///old1", "file:///old2")
    )
    # The URL's password never reaches a repr (a log line of the settings).
    assert "hunter2" not in repr(env)
    # Empty counts as unset, as for the CLI's options.
    assert env_settings({"CARNET_MASTER_KEY": ""}).master_key is None


def test_missing_variables_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="CARNET_MASTER_KEY"):
        carnet.KeyManager.from_env(environ={"CARNET_DATABASE_URL": "sqlite://"})
    mk = "file://" + str(tmp_path / "m.key")
    carnet.create_master_key(mk).close()
    with pytest.raises(ConfigurationError, match="CARNET_DATABASE_URL"):
        carnet.KeyManager.from_env(environ={"CARNET_MASTER_KEY": mk})
    # Given the application's engine, the database variable is not needed.
    km = carnet.KeyManager.from_env(
        sa.create_engine("sqlite://"), environ={"CARNET_MASTER_KEY": mk}, cache_ttl=7
    )
    try:
        assert km.cache_ttl == 7 and km.master_key.uri == mk
    finally:
        km.close()
