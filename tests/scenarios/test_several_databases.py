"""One model on several databases, each with its own key table and master key, in one process.

The manager of a statement comes from the engine it runs on (``keys.bind(engine)``),
with ``carnet.configure()`` as the default; a read replica reads with its own
read-only manager, and a first key wanted there is a clear error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet.errors import ConfigurationError, UnknownKey
from carnet.providers import create_master_key
from support.models import Base, Note, comments, core_metadata


def _master(tmp_path: Path, name: str) -> str:
    uri = "file://" + str(tmp_path / name)
    create_master_key(uri).close()
    return uri


def _keyed(url: str, master: str) -> tuple[sa.Engine, carnet.KeyManager]:
    engine = sa.create_engine(url)
    keys = carnet.KeyManager(engine, master_key=master)
    keys.create_schema()
    Base.metadata.create_all(engine)
    core_metadata.create_all(engine)
    return engine, keys.bind(engine)


def test_one_model_on_two_databases_uses_each_databases_keys(
    fresh_db_url_factory: Callable[[], str], tmp_path: Path
) -> None:
    e1, k1 = _keyed(fresh_db_url_factory(), _master(tmp_path, "one.key"))
    e2, k2 = _keyed(fresh_db_url_factory(), _master(tmp_path, "two.key"))
    try:
        carnet.configure(None)  # no default: only the bindings may decide
        for engine, text in ((e1, "dans la base 1"), (e2, "dans la base 2")):
            with Session(engine) as s:
                s.add(Note(id=1, practice_id="cab", body=text, summary=text))
                s.commit()
            with carnet.tenant_scope("cab"), engine.begin() as conn:
                conn.execute(comments.insert(), {"id": 1, "text": text})
        # Each database holds its own practice key, under its own master key.
        assert [r.master_key_uri for r in k1.list_keys("cab")] == [k1.master_key.uri]
        assert [r.master_key_uri for r in k2.list_keys("cab")] == [k2.master_key.uri]
        assert k1.ensure_key("cab").key_id != k2.ensure_key("cab").key_id
        for engine, text in ((e1, "dans la base 1"), (e2, "dans la base 2")):
            with Session(engine) as s:
                n = s.get(Note, 1)
                assert n is not None and (n.body, n.summary) == (text, text)
            with engine.connect() as conn:
                sealed = conn.execute(sa.select(comments.c.text)).scalar_one()
            assert sealed.open("cab") == text  # a Sealed remembers its database's manager
            with carnet.tenant_scope("cab"), engine.connect() as conn:
                assert conn.execute(sa.select(comments.c.text)).scalar_one() == text
        # Without the binding the other database's manager cannot open the value.
        carnet.configure(k1)
        carnet.bind_manager(e2, None)
        with Session(e2) as s, pytest.raises(UnknownKey):
            s.get(Note, 1)
    finally:
        carnet.configure(None)
        for engine, keys in ((e1, k1), (e2, k2)):
            carnet.bind_manager(engine, None)
            keys.close()
            engine.dispose()


def test_read_replica_reads_and_refuses_a_first_key(db_url: str, master_key_uri: str) -> None:
    primary, keys = _keyed(db_url, master_key_uri)
    # A second engine on the same data stands for a replica that streams it.
    replica = sa.create_engine(db_url)
    reader = carnet.KeyManager(replica, master_key=master_key_uri, read_only=True).bind(replica)
    try:
        with Session(primary) as s:
            s.add(Note(id=1, practice_id="cab", body="note"))
            s.commit()
        with Session(replica) as s:
            n = s.get(Note, 1)
            assert n is not None and n.body == "note"
        with Session(replica) as s:
            s.add(Note(id=2, practice_id="new-practice", body="x"))
            with pytest.raises(ConfigurationError, match="read-only"):
                s.commit()
        with pytest.raises(ConfigurationError, match="read-only"):
            reader.rotate("cab")
    finally:
        for engine, manager in ((primary, keys), (replica, reader)):
            carnet.bind_manager(engine, None)
            manager.close()
            engine.dispose()
