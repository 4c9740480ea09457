"""carnet's own errors carry no note anywhere in their chain, not even in hidden links.

``raise X from None`` inside an ``except`` block only sets
``__suppress_context__``: the handled exception stays in ``__context__``, and
a ``UnicodeEncodeError`` keeps the whole string in ``.object``. Error
trackers and ``traceback.TracebackException`` walk that chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import carnet
from carnet.errors import CarnetError, InvalidPlaintext
from support.models import comments

SECRET = "PLANTED-idees-suicidaires-9c2"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _holds_secret(exc: BaseException) -> list[str]:
    found = []
    for e in _chain(exc):
        for name, value in (
            [("str", str(e)), ("repr", repr(e))]
            + list(vars(e).items())
            + [
                ("object", getattr(e, "object", None)),
                ("args", e.args),
            ]
        ):
            if SECRET in repr(value) or (isinstance(value, str) and SECRET in value):
                found.append(f"{type(e).__name__}.{name}")
    return found


def test_lone_surrogate_through_the_type(keys: carnet.KeyManager) -> None:
    typ = comments.c.text.type
    with carnet.tenant_scope("p1"), pytest.raises(InvalidPlaintext) as ei:
        typ.process_bind_param(SECRET + "\ud800", keys.engine.dialect)
    assert ei.value.__context__ is None
    assert _holds_secret(ei.value) == []


def test_lone_surrogate_through_core(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with (
        carnet.tenant_scope("p1"),
        engine.begin() as conn,
        pytest.raises(InvalidPlaintext) as ei,
    ):
        conn.execute(comments.insert(), {"id": 1, "text": SECRET + "\ud800"})
    assert _holds_secret(ei.value) == []


class _Failing(carnet.KeyManager):
    """A manager whose encryption fails with a foreign error quoting its input."""

    def encrypt(self, plaintext: bytes, *, tenant: str, label: str) -> bytes:
        raise RuntimeError(f"backend refused {plaintext!r}")


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_foreign_error_while_sealing(engine: sa.Engine, master_key_uri: str) -> None:
    keys: Any = _Failing(engine, master_key=master_key_uri)
    typ = carnet.EncryptedText(label="t.c", manager=keys)
    with carnet.tenant_scope("p1"), pytest.raises(CarnetError) as ei:
        typ.process_bind_param(SECRET, engine.dialect)
    assert "RuntimeError" in str(ei.value)
    assert ei.value.__context__ is None
    assert _holds_secret(ei.value) == []
