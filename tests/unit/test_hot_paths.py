"""The column types' per-value fast paths: what a processor remembers never outlives a key.

A column's result processor keeps the opener of the last value it opened, and
its bind processor the sealer of the last value it sealed (carnet.types), so
a Core read or write of one practice skips the manager's cache lookup. Each
test below makes the remembered opener or sealer wrong (a shredded practice,
a rotation, another manager, a hook installed later, another practice, an
older format) and shows that the next value takes the full path.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
import carnet.cache as cache_module
from carnet import envelope
from carnet.errors import InvalidCiphertext, KeyDestroyed, TenantMismatch
from support.dbutil import drop_checks
from support.models import Note, comments


def _write(engine: sa.Engine, practice: str, texts: list[str]) -> list[int]:
    with carnet.tenant_scope(practice), engine.begin() as conn:
        start = conn.execute(sa.select(sa.func.count()).select_from(comments)).scalar_one()
        conn.execute(
            comments.insert(), [{"id": start + i + 1, "text": t} for i, t in enumerate(texts)]
        )
    return [start + i + 1 for i in range(len(texts))]


def _read(engine: sa.Engine, practice: str, ids: list[int]) -> list[str]:
    with carnet.tenant_scope(practice), engine.connect() as conn:
        rows = conn.execute(
            sa.select(comments.c.text).where(comments.c.id.in_(ids)).order_by(comments.c.id)
        ).all()
    return [r.text for r in rows]


def _stored(engine: sa.Engine, pk: int) -> bytes:
    with engine.connect() as conn:
        raw = conn.execute(
            sa.text("SELECT text FROM comments WHERE id = :i"), {"i": pk}
        ).scalar_one()
    return bytes(raw)


def test_a_shredded_practice_stops_the_remembered_opener(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    ids = _write(engine, "p1", ["one", "two", "three"])
    assert _read(engine, "p1", ids) == ["one", "two", "three"]  # the processor remembers p1's key
    keys.destroy("p1")
    with pytest.raises(KeyDestroyed):
        _read(engine, "p1", ids)


def test_a_rotation_stops_the_remembered_sealer(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    first = _write(engine, "p1", ["a", "b"])
    old = {envelope.key_id_of(_stored(engine, pk)) for pk in first}
    keys.rotate("p1")
    second = _write(engine, "p1", ["c", "d"])
    new = {envelope.key_id_of(_stored(engine, pk)) for pk in second}
    assert len(old) == 1 and len(new) == 1 and old != new
    active = [r.key_id for r in keys.list_keys("p1") if r.state == "active"]
    assert new == set(active)
    assert _read(engine, "p1", first + second) == ["a", "b", "c", "d"]


def test_a_hook_installed_later_sees_every_value(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    ids = _write(engine, "p1", [f"note {i}" for i in range(5)])
    assert len(_read(engine, "p1", ids)) == 5  # remembered, no hook yet
    opened: list[str] = []
    keys.decrypt_hook = lambda tenant, _label, n: opened.extend([tenant] * n)
    try:
        assert len(_read(engine, "p1", ids)) == 5
    finally:
        keys.decrypt_hook = None
    assert opened == ["p1"] * 5


def test_another_practice_or_a_value_of_another_key_is_not_opened_with_the_remembered_one(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    p1 = _write(engine, "p1", ["mine"])
    p2 = _write(engine, "p2", ["theirs"])
    assert _read(engine, "p1", p1) == ["mine"]
    # p2's value under p1's scope, right after p1's opener was remembered.
    with pytest.raises(TenantMismatch):
        _read(engine, "p1", p1 + p2)
    keys.rotate("p1")
    p1_new = _write(engine, "p1", ["newer"])
    # Old and new keys of one practice, interleaved: each value finds its own opener.
    assert _read(engine, "p1", p1 + p1_new) == ["mine", "newer"]


@pytest.mark.parametrize("cut", [3, 10, envelope.NONCE_SIZE + 5])
def test_a_value_cut_short_after_a_warm_one_is_refused(
    keys: carnet.KeyManager, engine: sa.Engine, cut: int
) -> None:
    ids = _write(engine, "p1", ["warm", "cut short"])
    raw = _stored(engine, ids[1])
    head = len(raw) - envelope.NONCE_SIZE - envelope.TAG_SIZE - len(b"cut short")
    assert raw[:head].endswith(b"\x02p1")  # the header ends with the practice
    with engine.begin() as conn:
        drop_checks(conn, comments)  # the value the database would refuse, there anyway
        conn.execute(
            sa.text("UPDATE comments SET text = :v WHERE id = :i"),
            {"v": raw[: head + cut], "i": ids[1]},
        )
    with pytest.raises(InvalidCiphertext) as err:
        _read(engine, "p1", ids)
    assert "cut short" not in str(err.value)


def test_a_v1_value_is_read_after_a_v2_one(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    # Through the column's result processor itself: the database's format
    # check refuses a v1 value written now (v1 values are rows from before it).
    ids = _write(engine, "p1", ["current"])
    blob = _stored(engine, ids[0])
    key_id = envelope.key_id_of(blob)
    dek = keys.cache.keys.get(key_id)
    assert dek is not None
    label = comments.c.text.type.field_label
    nonce = b"\x00" * 12
    aad = envelope.associated_data(key_id, label, "p1", envelope.V1)
    # docs/format.md's v1 framing: version 1, key id, nonce, body and tag.
    legacy = b"\x01" + key_id + nonce + dek.cipher.encrypt(nonce, b"legacy", aad)
    process = comments.c.text.type.dialect_impl(engine.dialect).result_processor(
        engine.dialect, None
    )
    with carnet.tenant_scope("p1"):
        assert [process(blob), process(legacy), process(blob)] == ["current", "legacy", "current"]


def test_two_managers_on_one_column_each_use_their_own_keys(
    keys: carnet.KeyManager, engine: sa.Engine, master_key_uri: str
) -> None:
    ids = _write(engine, "p1", ["shared"])
    other = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        assert _read(engine, "p1", ids) == ["shared"]  # remembered with the default manager
        other.destroy("p1")  # shredded through the other manager: the table says so
        keys.clear_cache()
        with pytest.raises(KeyDestroyed):
            _read(engine, "p1", ids)
    finally:
        other.close()


def test_a_manager_made_default_later_is_not_served_by_anothers_remembered_opener(
    keys: carnet.KeyManager, engine: sa.Engine, master_key_uri: str
) -> None:
    # Both managers read one key table, so the values' headers match either's
    # openers: only the manager itself tells them apart.
    ids = _write(engine, "p1", ["shared"])
    other = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        assert _read(engine, "p1", ids) == ["shared"]  # remembered with `keys`
        other.destroy("p1")  # `keys` has not noticed yet (its cache is warm)
        carnet.configure(other)
        with pytest.raises(KeyDestroyed):
            _read(engine, "p1", ids)
    finally:
        carnet.configure(keys)
        other.close()


def test_a_manager_bound_later_to_the_engine_serves_its_next_read_and_write(
    keys: carnet.KeyManager, engine: sa.Engine, master_key_uri: str
) -> None:
    # A processor keeps the manager it resolved for its engine only until a
    # binding or the default changes.
    ids = _write(engine, "p1", ["shared"])
    other = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        assert _read(engine, "p1", ids) == ["shared"]  # resolved: the default, `keys`
        other.destroy("p1")  # `keys` has not noticed yet (its cache is warm)
        other.bind(engine)
        with pytest.raises(KeyDestroyed):
            _read(engine, "p1", ids)
        with pytest.raises(KeyDestroyed):
            _write(engine, "p1", ["after"])
        carnet.bind_manager(engine, None)
        assert _read(engine, "p1", ids) == ["shared"]  # `keys` again, still warm
    finally:
        carnet.bind_manager(engine, None)
        other.close()


def test_threads_reading_other_practices_through_one_processor_each_get_their_own(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    # One engine, so one result processor shared by every thread; each thread
    # reads its own practice in its own scope. A thread switch between two
    # updates of the remembered opener must never pair one practice's header
    # with another's key (a spurious failure) or open a value for the wrong one.
    practices = ["p1", "p2", "p3", "p4"]
    ids = {p: _write(engine, p, [f"{p} note {i}" for i in range(20)]) for p in practices}
    errors: list[BaseException] = []

    def reader(practice: str) -> None:
        try:
            for _ in range(40):
                got = _read(engine, practice, ids[practice])
                assert got == [f"{practice} note {i}" for i in range(20)]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=reader, args=(p,)) for p in practices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []


def test_the_openers_text_path_refuses_a_tampered_value_and_passes_on_another_framing() -> None:
    key = bytes(range(32))
    key_id = bytes(16)
    sealer = envelope.Sealer(key, key_id, "notes.body", "p1")
    opener = envelope.Opener(key, key_id, "notes.body", "p1")
    blob = sealer.seal(b"note")
    assert opener.open_text(blob) == "note"
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(InvalidCiphertext):
        opener.open_text(tampered)
    # Framed for another practice or field: not this opener's value (None), and
    # open() then says what is wrong with it.
    other = envelope.Sealer(key, key_id, "notes.body", "p2").seal(b"note")
    assert opener.open_text(other) is None
    with pytest.raises(TenantMismatch):
        opener.open(other)
    assert opener.open_text(blob[:40]) is None


def test_a_rotation_stops_the_sealer_of_a_flush_of_several_practices(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    # One ORM flush, rows of two practices in turn: each value is sealed with its
    # practice's sealer, found in the manager for each row; after p1's rotation the
    # next flush seals p1's values with the new key, p2's with its own.
    from sqlalchemy.orm import Session

    from support.models import Note

    def flush(start: int) -> list[int]:
        with Session(engine) as s:
            s.add_all(
                Note(id=start + i, practice_id=("p1", "p2")[i % 2], body=f"note {start + i}")
                for i in range(6)
            )
            s.commit()
        return list(range(start, start + 6))

    def key_ids(ids: list[int]) -> dict[str, set[bytes]]:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT practice_id, body FROM notes WHERE id BETWEEN :a AND :b"),
                {"a": ids[0], "b": ids[-1]},
            ).all()
        out: dict[str, set[bytes]] = {}
        for practice, body in rows:
            out.setdefault(practice, set()).add(envelope.key_id_of(bytes(body)))
        return out

    first = key_ids(flush(1))
    keys.rotate("p1")
    second = key_ids(flush(101))
    active = {p: {r.key_id for r in keys.list_keys(p) if r.state == "active"} for p in ("p1", "p2")}
    assert second == active and first["p2"] == second["p2"] and first["p1"] != second["p1"]
    with Session(engine) as s:
        bodies = {n.id: n.body for n in s.scalars(sa.select(Note))}
    assert bodies == {i: f"note {i}" for i in [*range(1, 7), *range(101, 107)]}


@pytest.mark.parametrize("watch", ["thread", "no thread"])
def test_a_destroy_elsewhere_stops_every_warm_path_within_the_ttl(
    engine: sa.Engine,
    master_key_uri: str,
    keys: carnet.KeyManager,
    watch: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The warm paths (the Core processors' remembered opener and sealer, the
    # ORM getter's, the manager's) end with the key's time-to-live: by the
    # cache's deadline watch, or without its thread by the clock.
    if watch == "no thread":

        class NoThread(cache_module.DeadlineWatch):
            def watch(self, entry: object) -> None:  # never vouches: the clock decides
                return

        monkeypatch.setattr(cache_module, "WATCH", NoThread())
    ttl = 0.4
    reader = carnet.KeyManager(engine, master_key=master_key_uri, cache_ttl=ttl)
    ids = _write(engine, "p1", ["one", "two"])
    with Session(engine) as s:
        s.add_all([Note(practice_id="p1", body=f"note {i}") for i in range(3)])
        s.commit()
    carnet.configure(reader)
    try:
        # Warm every path under `reader`, then destroy the practice through
        # another manager (another process): `reader` does not hear of it.
        assert _read(engine, "p1", ids) == ["one", "two"]
        ids += _write(engine, "p1", ["three"])
        with Session(engine) as s:
            assert len([n.body for n in s.scalars(sa.select(Note))]) == 3
        blob = _stored(engine, ids[0])
        assert reader.decrypt(blob, tenant="p1", label="comments.text") == b"one"
        keys.destroy("p1")
        time.sleep(ttl + 0.3)
        with pytest.raises(KeyDestroyed):
            _read(engine, "p1", ids)
        with pytest.raises(KeyDestroyed):
            _write(engine, "p1", ["after"])
        with Session(engine) as s, pytest.raises(KeyDestroyed):
            [n.body for n in s.scalars(sa.select(Note))]
        with pytest.raises(KeyDestroyed):
            reader.decrypt(blob, tenant="p1", label="comments.text")
    finally:
        carnet.configure(keys)
        reader.close()
