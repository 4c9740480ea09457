"""Plant a secret note, drive every failure path, and look for it everywhere it could surface."""

from __future__ import annotations

import logging
import traceback
import warnings
from collections.abc import Mapping

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet.errors import CarnetError, MasterKeyUnavailable
from carnet.providers.base import MasterKey
from support.models import Base, Note, comments

SECRET = "PLANTED-abus-sexuel-7f3a9"


def _everything(exc: BaseException) -> str:
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), repr(getattr(e, "args", ""))]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    return caplog


class _Unreachable(MasterKey):
    """A master key whose service is down: every call fails as a real outage does."""

    scheme = "down"

    def __init__(self, inner: MasterKey) -> None:
        self._inner = inner

    @property
    def uri(self) -> str:
        return self._inner.uri

    def wrap(self, dek: bytes, context: Mapping[str, str]) -> bytes:
        raise MasterKeyUnavailable("master key service unreachable")

    def unwrap(self, wrapped: bytes, context: Mapping[str, str]) -> bytes:
        raise MasterKeyUnavailable("master key service unreachable")

    @classmethod
    def from_uri(cls, uri: str) -> MasterKey:
        raise NotImplementedError


def _assert_clean(exc: BaseException, logs: pytest.LogCaptureFixture) -> None:
    assert isinstance(exc, CarnetError), type(exc)
    assert SECRET not in _everything(exc)
    assert SECRET not in logs.text


def test_orm_write_without_tenant(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    with Session(engine) as s:
        s.add(Note(practice_id=None, body=SECRET))
        with pytest.raises(CarnetError) as ei:
            s.commit()
    _assert_clean(ei.value, logs)


def test_core_write_without_tenant(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    with engine.begin() as conn, pytest.raises(CarnetError) as ei:
        conn.execute(
            comments.insert(), [{"id": 1, "text": SECRET}, {"id": 2, "text": SECRET + "2"}]
        )
    _assert_clean(ei.value, logs)


@pytest.mark.parametrize("bad", [b"PLANTED-abus-sexuel-7f3a9", "PLANTED-abus-sexuel-7f3a9\ud800"])
def test_unsealable_values(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture, bad: object
) -> None:
    with carnet.tenant_scope("p1"), engine.begin() as conn, pytest.raises(CarnetError) as ei:
        conn.execute(comments.insert(), {"id": 1, "text": bad})
    _assert_clean(ei.value, logs)


def test_master_key_unreachable_on_write(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    down = carnet.KeyManager(engine, master_key=_Unreachable(keys.master_key))
    carnet.configure(down)
    with Session(engine) as s:
        s.add(Note(practice_id="new-practice", body=SECRET))
        with pytest.raises(MasterKeyUnavailable) as ei:
            s.commit()
    _assert_clean(ei.value, logs)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM notes")).scalar_one() == 0


def test_database_error_shows_only_ciphertext(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(comments.insert(), {"id": 1, "text": "first"})
    with (
        carnet.tenant_scope("p1"),
        engine.begin() as conn,
        pytest.raises(sa.exc.IntegrityError) as ei,
    ):
        conn.execute(comments.insert(), {"id": 1, "text": SECRET})  # duplicate primary key
    assert SECRET not in _everything(ei.value) and SECRET not in logs.text


def test_tampered_read_and_reprs(
    keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    with Session(engine) as s:
        n = Note(practice_id="p1", body=SECRET)
        s.add(n)
        s.commit()
        nid = n.id
    with engine.begin() as conn:
        blob = bytearray(conn.execute(sa.text("SELECT body FROM notes")).scalar_one())
        blob[40] ^= 4
        conn.execute(sa.text("UPDATE notes SET body=:b"), {"b": bytes(blob)})
    with Session(engine) as s, pytest.raises(CarnetError) as ei:
        s.get(Note, nid)
    _assert_clean(ei.value, logs)
    with engine.connect() as conn:
        sealed = conn.execute(sa.select(Note.__table__.c.body)).scalar_one()
    dek = keys.cache.keys.get(keys.ensure_key("p1").key_id)
    rec = keys.list_keys()[0]
    master_secret = (
        open(keys.master_key.uri.removeprefix("file://")).read().split(":", 1)[1].strip()
    )
    assert rec.wrapped_key is not None
    for obj in (
        keys,
        sealed,
        dek,
        rec,
        keys.cache,
        keys.cache.keys,
        keys.store,
        keys.master_key,
        Note.__table__.c.body.type,
    ):
        text = repr(obj) + str(obj)
        assert SECRET not in text
        assert master_secret not in text
        assert rec.wrapped_key.hex() not in text and repr(rec.wrapped_key) not in text


def test_echo_logs_hold_no_plaintext(
    engine: sa.Engine, master_key_uri: str, logs: pytest.LogCaptureFixture
) -> None:
    eng = sa.create_engine(engine.url, echo=True)
    keys = carnet.KeyManager(eng, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(eng)
    carnet.configure(keys)
    try:
        with Session(eng) as s:
            s.add(Note(practice_id="p1", body=SECRET))
            s.commit()
        with Session(eng) as s:
            assert s.scalars(sa.select(Note)).one().body == SECRET
    finally:
        carnet.configure(None)
        eng.dispose()
    assert "INSERT INTO notes" in logs.text  # the log was really captured
    assert SECRET not in logs.text


def test_echo_debug_is_warned_about(engine: sa.Engine, master_key_uri: str) -> None:
    eng = sa.create_engine(engine.url, echo="debug")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        carnet.KeyManager(eng, master_key=master_key_uri)
    assert any("echo='debug'" in str(x.message) for x in w)
    eng.dispose()
