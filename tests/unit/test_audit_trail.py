"""The durable audit trail on real databases: the chain, the two modes, rows, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.orm import Session

import carnet
from carnet.audit import Auditor, AuditTrail, audit_context, principal_scope
from carnet.audit_store import AuditStore, Head
from carnet.cli import cli
from carnet.errors import AuditStoreUnavailable
from support.models import Note, comments

SECRET = "PLANTED-trail-secret-77d"


@pytest.fixture
def notes(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    """Twelve notes, six in each of the practices p0 and p1."""
    with Session(engine) as s:
        s.add_all([Note(practice_id=f"p{i % 2}", body=f"{SECRET} {i}") for i in range(12)])
        s.commit()


def _trail(keys: carnet.KeyManager, **kw: object) -> AuditTrail:
    kw.setdefault("background", False)
    trail = AuditTrail(keys, **kw)  # type: ignore[arg-type]
    Auditor(trail=trail).install(keys)
    return trail


def _read(engine: sa.Engine, principal: str = "dr.martin") -> list[str]:
    with principal_scope(principal), Session(engine) as s:
        return [n.body or "" for n in s.scalars(sa.select(Note).order_by(Note.id))]


def _records(store: AuditStore) -> list[dict[str, object]]:
    return list(store.walk())


# -- the record ---------------------------------------------------------------------------


def test_reads_are_recorded_per_principal_practice_field(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carnet.audit")
    trail = _trail(keys)
    with audit_context(request_id="req-1", route="/patients/{id}"):
        assert len(_read(engine)) == 12
    _read(engine, "dr.other")
    assert trail.flush()
    recs = [r for r in _records(trail.store) if r["kind"] == "read"]
    got = {(r["principal"], r["practice"], r["field"], r["count"], r["request_id"]) for r in recs}
    assert got == {
        ("dr.martin", "p0", "notes.body", 6, "req-1"),
        ("dr.martin", "p1", "notes.body", 6, "req-1"),
        ("dr.other", "p0", "notes.body", 6, None),
        ("dr.other", "p1", "notes.body", 6, None),
    }
    for r in recs:
        assert str(r["first_at"]).endswith("Z") and r["first_at"] <= r["last_at"]
        assert r["process"] and r["host"]
    dump = json.dumps(_records(trail.store), default=str)
    assert SECRET not in dump and SECRET not in caplog.text
    assert trail.counters()["carnet_audit_reads_total"] == 24


def test_record_survives_the_application_rollback(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, tmp_path: Path
) -> None:
    # SQLite: the application's write lock keeps a second connection to the same
    # file from writing (see the test below); the trail lives in a file of its own.
    url = f"sqlite:///{tmp_path}/audit.db" if engine.dialect.name == "sqlite" else None
    trail = _trail(keys, url=url)
    with principal_scope("dr.rollback"), Session(engine) as s:
        note = s.scalars(sa.select(Note).where(Note.practice_id == "p0").limit(1)).one()
        assert note.body is not None
        note.practice_id = "p0"
        s.add(Note(practice_id="p1", body="written then rolled back"))
        s.flush()
        assert trail.flush()
        s.rollback()
    recs = [r for r in _records(trail.store) if r["principal"] == "dr.rollback"]
    assert sum(int(r["count"]) for r in recs) == 1  # type: ignore[call-overload]


# -- the chain ----------------------------------------------------------------------------


def _tamper(store: AuditStore, how: str) -> int:
    """Change the stored chain as someone with SQL access would; return the seq expected bad."""
    t = store.table
    with store.engine.begin() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.select(t).order_by(t.c.seq))]
        if how == "deleted":
            conn.execute(t.delete().where(t.c.seq == 3))
            return 3
        if how == "altered":
            conn.execute(t.update().where(t.c.seq == 3).values(count=0))
            return 3
        if how == "swapped":
            a, b = rows[2], rows[3]
            for src, dst in ((a, b["seq"]), (b, a["seq"])):
                vals = {k: v for k, v in src.items() if k != "seq"}
                conn.execute(t.update().where(t.c.seq == dst).values(**vals))
            return 3
        if how == "inserted":
            # Shift every later record up by one and slip a forged one in at 3.
            for r in reversed(rows[2:]):
                conn.execute(t.update().where(t.c.seq == r["seq"]).values(seq=r["seq"] + 1))
            forged = {**rows[2], "seq": 3, "principal": "nobody", "count": 1}
            conn.execute(t.insert().values(**forged))
            return 3
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["deleted", "altered", "swapped", "inserted"])
def test_verify_finds_the_first_bad_record(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, how: str
) -> None:
    trail = _trail(keys)
    for i in range(6):
        _read(engine, f"user{i}")
        assert trail.flush()
    store = trail.store
    assert store.verify().ok
    bad = _tamper(store, how)
    rep = store.verify()
    assert not rep.ok and rep.first_bad == bad, rep


def test_verify_cli_exit_code_and_json(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    trail = _trail(keys)
    _read(engine)
    trail.flush()
    _read(engine, "b")
    trail.flush()
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    ok = CliRunner().invoke(cli, ["audit", "verify", "--json"], env=env)
    assert ok.exit_code == 0 and json.loads(ok.output)["ok"] is True
    _tamper(trail.store, "altered")
    bad = CliRunner().invoke(cli, ["audit", "verify", "--json"], env=env)
    assert bad.exit_code == 1
    assert json.loads(bad.output)["first_bad"] == 3


def test_removed_newest_records_are_found_only_with_a_head(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine
) -> None:
    heads: list[Head] = []
    trail = _trail(keys, head_every=0.0, head_sink=heads.append)
    for i in range(3):
        _read(engine, f"user{i}")
        assert trail.flush()
    seen = heads[-1]
    store = trail.store
    with store.engine.begin() as conn:
        conn.execute(store.table.delete().where(store.table.c.seq == seen.seq))
    assert store.verify().ok  # a truncated chain is still a chain
    rep = store.verify(head=seen)
    assert not rep.ok and rep.first_bad == seen.seq


def test_prune_leaves_a_verifiable_chain(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    trail = _trail(keys)
    for i in range(4):
        _read(engine, f"user{i}")
        assert trail.flush()
    total = len(_records(trail.store))
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(
        cli, ["audit", "prune", "--before", "2999-01-01", "--yes", "--json"], env=env
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["removed"] == total
    _read(engine, "after")
    assert trail.flush()
    rep = trail.store.verify()
    assert rep.ok and rep.checkpoints == 1 and rep.first_seq == total + 1
    # The checkpoint is record total + 1; deleting the first record after it is found.
    t = trail.store.table
    with trail.store.engine.begin() as conn:
        conn.execute(t.delete().where(t.c.seq == total + 2))
    rep = trail.store.verify()
    assert not rep.ok and rep.first_bad == total + 2
    # And deleting the checkpoint leaves a chain no checkpoint accounts for.
    with trail.store.engine.begin() as conn:
        conn.execute(t.delete().where(t.c.seq == total + 1))
    assert not trail.store.verify().ok


def test_concurrent_writers_append_to_one_chain(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine
) -> None:
    import threading

    trails = [AuditTrail(keys, background=False) for _ in range(3)]
    errors: list[BaseException] = []

    def work(trail: AuditTrail, n: int) -> None:
        try:
            for _ in range(15):
                trail.disclosed(f"w{n}", "p0", "notes.body", 1, 0)
                assert trail.flush()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t, n)) for n, t in enumerate(trails)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    rep = trails[0].store.verify()
    assert rep.ok and rep.records == 45


# -- modes --------------------------------------------------------------------------------


def test_required_mode_with_the_store_down_discloses_nothing(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    # A real PostgreSQL URL on a port where nothing listens: the store is down.
    down = "postgresql+psycopg://postgres@127.0.0.1:9/carnet_audit_down"
    with pytest.raises(AuditStoreUnavailable) as err:
        AuditTrail(keys, down, mode="required", background=False, timeout=1)
    assert "127.0.0.1:9" in str(err.value)
    trail = AuditTrail(keys, down, mode="required", background=False, timeout=1, create=False)
    Auditor(trail=trail).install(keys)
    got: list[str] = []
    with pytest.raises(AuditStoreUnavailable) as err:
        with principal_scope("dr.down"), Session(engine) as s:
            got.extend(n.body or "" for n in s.scalars(sa.select(Note)))
    assert got == []
    text = f"{err.value!r} {err.value} {caplog.text}"
    assert SECRET not in text and "carnet_audit" in str(err.value)
    assert trail.counters()["carnet_audit_store_failures_total"] >= 1
    assert trail.counters()["carnet_audit_reads_total"] == 0


def test_required_mode_reserves_blocks_ahead(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, mode="required", block=5)
    _read(engine)
    reserved = [r for r in _records(trail.store) if r["kind"] == "reserve"]
    # 6 notes of each practice: two blocks of 5 each, committed before the reads.
    assert sorted((r["practice"], r["count"]) for r in reserved) == [
        ("p0", 5),
        ("p0", 5),
        ("p1", 5),
        ("p1", 5),
    ]


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_best_effort_survives_a_stopped_store_and_catches_up(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, fresh_db_url_factory: object
) -> None:
    url = fresh_db_url_factory()  # type: ignore[operator]
    name = sa.engine.make_url(url).database
    trail = _trail(keys, url=url)
    trail.store.engine.dispose()
    admin = sa.create_engine(url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            c.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
        assert len(_read(engine)) == 12  # the read is not blocked
        assert not trail.flush()
        c1 = trail.counters()
        assert (
            c1["carnet_audit_store_failures_total"] >= 1 and c1["carnet_audit_pending_records"] == 2
        )
        _read(engine)
        assert not trail.flush()
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert trail.flush()
        recs = [r for r in _records(trail.store) if r["kind"] == "read"]
        assert sum(int(r["count"]) for r in recs) == 24  # type: ignore[call-overload]
        assert trail.store.verify().ok
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.dispose()
        trail.store.engine.dispose()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_sqlite_read_inside_the_application_write_transaction(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, tmp_path: Path
) -> None:
    """SQLite has one writer: the application's write transaction holds it.

    required mode, trail in the same file: the reservation cannot commit, the
    read fails closed. Trail in another file: it works. best_effort: the read
    passes and the record is written once the application commits.
    """
    same = AuditTrail(keys, mode="required", background=False, timeout=0.2)
    Auditor(trail=same).install(keys)
    with principal_scope("dr.w"), Session(engine) as s:
        s.add(Note(practice_id="p0", body="new"))
        s.flush()  # the application now holds SQLite's write lock
        with pytest.raises(AuditStoreUnavailable):
            [n.body for n in s.scalars(sa.select(Note).where(Note.practice_id == "p1"))]
        s.rollback()
    other = AuditTrail(keys, f"sqlite:///{tmp_path}/audit.db", mode="required", background=False)
    Auditor(trail=other).install(keys)
    with principal_scope("dr.w"), Session(engine) as s:
        s.add(Note(practice_id="p0", body="new"))
        s.flush()
        assert (
            len([n.body for n in s.scalars(sa.select(Note).where(Note.practice_id == "p1"))]) == 6
        )
        s.commit()
    lazy = AuditTrail(keys, mode="best_effort", background=False, timeout=0.2)
    Auditor(trail=lazy).install(keys)
    with principal_scope("dr.w"), Session(engine) as s:
        s.add(Note(practice_id="p0", body="new"))
        s.flush()
        assert (
            len([n.body for n in s.scalars(sa.select(Note).where(Note.practice_id == "p1"))]) == 6
        )
        assert not lazy.flush()  # the write lock is the application's
        s.commit()
    assert lazy.flush()
    assert sum(int(r["count"]) for r in _records(lazy.store) if r["kind"] == "read") == 6  # type: ignore[call-overload]


# -- rows ---------------------------------------------------------------------------------


def test_row_answers_who_opened_a_patient_file(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    trail = _trail(keys, rows=True)
    with principal_scope("dr.orm"), Session(engine) as s:
        assert s.get(Note, 5) is not None and s.get(Note, 5).body  # type: ignore[union-attr]
    with principal_scope("dr.scope"), carnet.tenant_scope("p0"), Session(engine) as s:
        [n.body for n in s.scalars(sa.select(Note).where(Note.id.in_([5, 7])))]
    assert trail.flush()
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "5", "--json"], env=env)
    assert res.exit_code == 0, res.output
    readers = json.loads(res.output)["readers"]
    assert {r["principal"] for r in readers} == {"dr.orm", "dr.scope"}
    res = CliRunner().invoke(cli, ["audit", "report", "--row", "9", "--json"], env=env)
    assert json.loads(res.output)["readers"] == []
    res = CliRunner().invoke(cli, ["audit", "report", "--json"], env=env)
    assert res.exit_code == 0 and SECRET not in res.output


def test_core_reads_record_their_rows(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine
) -> None:
    # More in test_audit_trail_core.py: a Core read records the row of each note it opens,
    # "?" when the Row does not hold the row's key.
    trail = _trail(keys, rows=True)
    with carnet.tenant_scope("p9"), engine.begin() as conn:
        conn.execute(comments.insert(), [{"id": 1, "text": "core note"}])
    with principal_scope("dr.core"), carnet.tenant_scope("p9"), engine.connect() as conn:
        assert conn.execute(sa.select(comments.c.text)).scalar() == "core note"
        assert conn.execute(sa.select(comments)).one().text == "core note"
    assert trail.flush()
    recs = [r for r in _records(trail.store) if r["principal"] == "dr.core"]
    assert sorted((r["kind"], r["practice"], r["count"], r["detail"]) for r in recs) == [
        ("read", "p9", 2, None),
        ("rows", "p9", 2, json.dumps({"rows": ["?", "1"]})),
    ]


def test_init_creates_the_audit_table(engine: sa.Engine, db_url: str, master_key_uri: str) -> None:
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["init", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert "carnet_audit" in json.loads(res.output)["tables"]
    assert sa.inspect(engine).has_table("carnet_audit")


def test_audit_key_is_a_wrapped_key_of_its_own_kind(keys: carnet.KeyManager, notes: None) -> None:
    trail = _trail(keys)
    trail.store.keys()
    recs = keys.store.audit_keys()
    assert len(recs) == 1 and recs[0].kind == "audit" and recs[0].tenant == ""
    assert recs[0].wrapped_key is not None
    assert trail.store.keys().secrets[recs[0].key_id.hex()] not in recs[0].wrapped_key
    assert "" not in keys.store.tenants()  # the audit key is no practice


def test_a_key_table_from_before_the_trail_is_upgraded(
    engine: sa.Engine, master_key_uri: str
) -> None:
    from carnet.keystore import keys_table
    from carnet.migrate.carnet_tables import plan_carnet_tables

    old = keys_table(sa.MetaData())
    for ck in old.constraints:
        if ck.name == "ck_carnet_keys_kind":
            ck.sqltext = sa.text("kind IN ('data', 'index')")  # type: ignore[attr-defined]
    old.create(engine)
    assert any("audit key" in s.description for s in plan_carnet_tables(engine))
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        # The old kind check refuses the audit key.
        assert not keys.store.insert_audit_key(b"\x01" * 16, b"x", keys.master_key.uri)
        keys.create_schema()
        assert not any("audit key" in s.description for s in plan_carnet_tables(engine))
        trail = AuditTrail(keys, background=False)
        trail.disclosed("u", "p1", "notes.body", 1, 0)
        assert trail.flush() and trail.store.verify().ok
        trail.store.engine.dispose()
    finally:
        keys.close()


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_cli_contract_of_audit_commands(db_url: str, master_key_uri: str, tmp_path: Path) -> None:
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    # No trail table yet: a clear configuration error, exit 2, JSON error object.
    res = CliRunner().invoke(cli, ["audit", "report", "--json"], env=env)
    assert res.exit_code == 2 and "carnet init" in res.output
    assert json.loads(res.output[res.output.index("{") :])["error"]["code"] == 2
    assert CliRunner().invoke(cli, ["init"], env=env).exit_code == 0
    res = CliRunner().invoke(cli, ["audit", "report", "--since", "yesterday"], env=env)
    assert res.exit_code == 2 and "--since" in res.output
    res = CliRunner().invoke(cli, ["audit", "verify", "--head", "12:zz"], env=env)
    assert res.exit_code == 2
    res = CliRunner().invoke(cli, ["audit", "verify"], env={"CARNET_DATABASE_URL": db_url})
    assert res.exit_code == 2  # verify unwraps the audit key: it needs the master key
    res = CliRunner().invoke(
        cli, ["audit", "prune", "--before", "2000-01-01"], env=env, input="n\n"
    )
    assert res.exit_code == 6
    down = "postgresql+psycopg://postgres@127.0.0.1:9/x"
    res = CliRunner().invoke(cli, ["audit", "report", "--store-url", down], env=env)
    assert res.exit_code == 4 and "127.0.0.1:9" in res.output


def test_key_commands_live_with_the_audit_key(
    keys: carnet.KeyManager,
    notes: None,
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    tmp_path: Path,
) -> None:
    trail = _trail(keys)
    _read(engine)
    assert trail.flush()
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["status", "--json", "--no-master-check"], env=env)
    assert res.exit_code == 0, res.output
    assert "" not in [t["tenant"] for t in json.loads(res.output)["tenants"]]
    res = CliRunner().invoke(cli, ["keys", "rotate", "--all", "--json"], env=env)
    assert res.exit_code == 0, res.output
    # A master-key rotation rewraps the audit key too: the chain still verifies.
    new = f"file://{tmp_path}/master2.key"
    assert CliRunner().invoke(cli, ["master", "new", new], env=env).exit_code == 0
    res = CliRunner().invoke(cli, ["master", "rotate", "--to", new, "--json"], env=env)
    assert res.exit_code == 0, res.output
    env2 = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": new}
    res = CliRunner().invoke(cli, ["audit", "verify", "--json"], env=env2)
    assert res.exit_code == 0 and json.loads(res.output)["records"] == 2, res.output


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_store_messages_never_show_a_password_or_a_value(
    keys: carnet.KeyManager, notes: None
) -> None:
    url = "postgresql+psycopg://audit:PLANTED-pw-5521@127.0.0.1:9/audit"
    trail = AuditTrail(keys, url, background=False, timeout=1, create=False)
    with pytest.raises(AuditStoreUnavailable) as err:
        trail.store.append([])
    for text in (repr(trail), repr(trail.store), str(err.value), repr(err.value)):
        assert "PLANTED-pw" not in text
    assert err.value.__cause__ is None and err.value.__context__ is None


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_a_refresh_records_a_row_only_when_it_reloads_the_note(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, rows=True)
    with principal_scope("dr.r"), Session(engine) as s:
        note = s.get(Note, 2)
        assert note is not None and note.body
        s.refresh(note, ["practice_id"])  # the note is not reloaded: not disclosed again
        s.refresh(note)  # reloaded and opened again
    assert trail.flush()
    rows = [r for r in _records(trail.store) if r["kind"] == "rows" and r["field"] == "notes.body"]
    assert sum(int(r["count"]) for r in rows) == 2  # type: ignore[call-overload]
    reads = [r for r in _records(trail.store) if r["kind"] == "read" and r["field"] == "notes.body"]
    assert sum(int(r["count"]) for r in reads) == 2  # type: ignore[call-overload]


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_a_reservation_serves_every_request_of_its_principal(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine
) -> None:
    trail = _trail(keys, mode="required", block=100)
    for i in range(3):
        with audit_context(request_id=f"req-{i}", route="/notes"):
            _read(engine)
    assert trail.flush()
    recs = _records(trail.store)
    reserves = [r for r in recs if r["kind"] == "reserve"]
    # One block per practice for the three requests; each request's reads apart.
    assert sorted((r["practice"], r["count"]) for r in reserves) == [("p0", 100), ("p1", 100)]
    reads = {(r["request_id"], r["practice"]): r["count"] for r in recs if r["kind"] == "read"}
    assert reads == {(f"req-{i}", p): 6 for i in range(3) for p in ("p0", "p1")}


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_records_and_heads_are_json_log_lines(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="carnet.audit.json")
    trail = _trail(keys, head_every=0.0)
    _read(engine)
    assert trail.flush()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "carnet.audit.json"]
    recs = [x for x in lines if x["event"] == "carnet.audit.record"]
    heads = [x for x in lines if x["event"] == "carnet.audit.head"]
    assert {(x["principal"], x["practice"], x["count"]) for x in recs} == {
        ("dr.martin", "p0", 6),
        ("dr.martin", "p1", 6),
    }
    assert heads and heads[-1]["seq"] == trail.store.head().seq  # type: ignore[union-attr]
    assert SECRET not in caplog.text


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_report_flags_readers_beyond_their_own_history(
    keys: carnet.KeyManager, notes: None, db_url: str, master_key_uri: str
) -> None:
    import time as _time

    from carnet.audit_store import iso

    store = AuditStore(keys)
    store.create_schema()
    now = _time.time()
    day = 86400.0

    def rec(principal: str, practice: str, count: int, at: float) -> dict[str, object]:
        return {
            "kind": "read",
            "principal": principal,
            "practice": practice,
            "field": "notes.body",
            "count": count,
            "legacy": 0,
            "first_at": iso(at),
            "last_at": iso(at),
            "process": "1/x",
            "host": "h",
            "request_id": None,
            "route": None,
            "detail": None,
        }

    history = []
    for d in range(1, 8):  # the 7 previous days
        history += [rec("steady", "p1", 80, now - d * day - 3600)]
        history += [rec("export", "p1", 10, now - d * day - 3600)]
    today = [rec("steady", "p1", 90, now - 3600), rec("light", "p3", 10, now - 3600)]
    today += [rec("export", f"p{i}", 60, now - 3600) for i in range(5)]
    today += [rec("newcomer", "p2", 60, now - 3600)]
    store.append(history + today)
    env = {"CARNET_DATABASE_URL": db_url, "CARNET_MASTER_KEY": master_key_uri}
    res = CliRunner().invoke(cli, ["audit", "report", "--since", "24h", "--json"], env=env)
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert {u["principal"] for u in rep["unusual"]} == {"export", "newcomer"}
    assert rep["heaviest"][0] == {"principal": "export", "count": 300, "practices": 5}
    assert rep["total"] == 90 + 10 + 300 + 60
    assert store.verify().ok
    store.engine.dispose()


def test_trail_installed_alone_with_its_background_writer(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/audit.db" if engine.dialect.name == "sqlite" else None
    trail = AuditTrail(keys, url, rows=True, flush_every=0.05).install(keys)
    assert getattr(keys.decrypt_hook, "trail", None) is trail
    assert len(_read(engine, "dr.alone")) == 12
    import time as _time

    deadline = _time.monotonic() + 10

    def total(kind: str) -> int:
        return sum(int(r["count"]) for r in recs if r["kind"] == kind)  # type: ignore[call-overload]

    recs = _records(trail.store)
    while (total("read"), total("rows")) != (12, 12) and _time.monotonic() < deadline:
        _time.sleep(0.05)  # the background thread writes; nobody calls flush()
        recs = _records(trail.store)
    assert (total("read"), total("rows")) == (12, 12)
    assert {r["principal"] for r in recs} == {"dr.alone"}
    trail.close()
    keys.decrypt_hook = None
    trail.store.engine.dispose()


@pytest.mark.parametrize("db_kind", ["postgresql"])
def test_best_effort_starts_with_its_store_down_and_creates_the_table_later(
    keys: carnet.KeyManager, notes: None, engine: sa.Engine, fresh_db_url_factory: object
) -> None:
    url = fresh_db_url_factory()  # type: ignore[operator]
    name = sa.engine.make_url(url).database
    admin = sa.create_engine(url.rsplit("/", 1)[0] + "/test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        trail = _trail(keys, url=url, timeout=1)  # best_effort: starts all the same
        assert len(_read(engine)) == 12
        assert not trail.flush()
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        assert trail.flush()
        assert sum(int(r["count"]) for r in _records(trail.store) if r["kind"] == "read") == 12  # type: ignore[call-overload]
        trail.store.engine.dispose()
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.dispose()
