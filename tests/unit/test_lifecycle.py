"""Library functions behind the CLI, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

import carnet
from carnet import envelope, lifecycle
from carnet.errors import KeyInUse
from support.dbutil import drop_checks
from support.lifecycleutil import SECRET, active_key_ids, fill_notes, notes_table, read_notes


@pytest.fixture
def keys(engine: sa.Engine, master_key_uri: str) -> carnet.KeyManager:
    m = carnet.KeyManager(engine, master_key=master_key_uri)
    lifecycle.init(m)
    fill_notes(engine, m, 120)
    return m


def test_status_discovers_columns_and_counts_by_key(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with engine.begin() as conn:
        # Plaintext left in a column whose checks are gone (dropped by a DBA,
        # or rows from before them): the database would refuse the plant
        # otherwise, and status must still count it.
        drop_checks(conn, notes_table(sa.MetaData()))
        conn.execute(sa.text("UPDATE notes SET summary = 'legacy' WHERE id = 5"))
        conn.execute(sa.text("UPDATE notes SET body = NULL WHERE id = 6"))
    rep = lifecycle.status(keys)
    assert rep.master_key_ok
    assert [t.tenant for t in rep.tenants] == ["p0", "p1", "p2"]
    assert all(t.active_version == 1 for t in rep.tenants)
    cols = {(c.table, c.column): c for c in rep.columns}
    assert set(cols) == {("notes", "body"), ("notes", "summary")}
    assert cols["notes", "body"].nulls == 1 and cols["notes", "summary"].plaintext == 1
    assert sum(k["rows"] for k in cols["notes", "body"].by_key.values()) == 119
    assert SECRET not in repr(rep.as_dict()) and "legacy" not in repr(rep.as_dict())


def test_rotate_reencrypt_retire(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    old = {r.key_id for r in keys.list_keys()}
    rotated = lifecycle.rotate_keys(keys)
    assert len(rotated) == 3
    before = read_notes(engine, keys)
    one_old = next(iter(old))
    with pytest.raises(KeyInUse) as exc:
        lifecycle.retire_key(keys, one_old)
    assert "notes.body" in str(exc.value) and "notes.summary" in str(exc.value)
    for col in ("body", "summary"):
        rep = lifecycle.reencrypt(keys, "notes", col, batch_size=32)
        assert rep.rewritten == 120 and not rep.failed
        assert lifecycle.reencrypt(keys, "notes", col).rewritten == 0
    after = read_notes(engine, keys)
    assert {i: p for i, (p, _) in after.items()} == {i: p for i, (p, _) in before.items()}
    assert {k for _, k in after.values()} <= active_key_ids(keys)
    res = lifecycle.retire_key(keys, one_old, [("notes", "body"), ("notes", "summary")])
    assert res["key"]["state"] == "retired" and res["rows_made_unreadable"] == 0
    assert lifecycle.verify(keys, "notes", "body").failed == 0


def test_reencrypt_one_tenant_and_renamed_label(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    keys.rotate("p1")
    rep = lifecycle.reencrypt(keys, "notes", "body", tenant="p1")
    assert rep.rewritten == 40
    rep = lifecycle.reencrypt(
        keys, "notes", "body", label="notes.comment", old_label="notes.body", job="rename"
    )
    assert rep.rewritten == 120
    assert lifecycle.verify(keys, "notes", "body", label="notes.comment").ok == 120
    assert lifecycle.verify(keys, "notes", "body").failed == 120


def test_verify_reports_pks_of_tampered_foreign_and_destroyed(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    raw = sa.table("notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:
        b6 = bytes(conn.execute(sa.select(raw.c.body).where(raw.c.id == 6)).scalar_one())
        conn.execute(raw.update().where(raw.c.id == 6).values(body=b6[:-1] + bytes([b6[-1] ^ 1])))
        # A value from another column (summary label) pasted into body.
        conn.execute(
            raw.update()
            .where(raw.c.id == 9)
            .values(
                body=envelope.from_text(
                    conn.execute(sa.text("SELECT summary FROM notes WHERE id = 9")).scalar_one()
                )
            )
        )
    lifecycle.destroy_tenant(keys, "p1")
    rep = lifecycle.verify(keys, "notes", "body")
    # Shredded rows are their own category: the erasure working, not a failure.
    assert (rep.failed, rep.destroyed, rep.ok) == (2, 40, 78)
    assert rep.reasons == {"tampered_or_foreign": 2}
    assert sorted(rep.failed_pks) == [[6], [9]]
    assert rep.practices["p1"] == {"ok": 0, "destroyed": 40, "failed": 0}
    assert SECRET not in repr(rep.as_dict())


def test_master_rotation_then_old_key_deleted(
    keys: carnet.KeyManager, engine: sa.Engine, tmp_path: Path, master_key_uri: str
) -> None:
    new_uri = "file://" + str(tmp_path / "m2.key")
    lifecycle.new_master(new_uri)
    rep = lifecycle.rotate_master(keys, new_uri, batch_size=2)
    assert rep.rewrapped == 3
    assert lifecycle.rotate_master(keys, new_uri).already == 3
    keys.close()
    Path(master_key_uri[len("file://") :]).unlink()
    fresh = carnet.KeyManager(engine, master_key=new_uri)
    assert len(read_notes(engine, fresh)) == 120
    assert lifecycle.status(fresh).master_key_ok


def test_verify_with_tenant_column_catches_a_value_copied_between_practices(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    raw = sa.table("notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:  # row 1 is p1's, row 2 is p2's: paste p1's note into p2's row
        # The database would refuse the paste: verify must catch such a value
        # anyway where the checks are gone (dropped by a DBA, rows from before).
        drop_checks(conn, notes_table(sa.MetaData()))
        b1 = conn.execute(sa.select(raw.c.body).where(raw.c.id == 1)).scalar_one()
        conn.execute(raw.update().where(raw.c.id == 2).values(body=b1))
    # By its key alone the pasted value is authentic...
    assert lifecycle.verify(keys, "notes", "body").failed == 0
    # ...but not in a row of p2.
    rep = lifecycle.verify(keys, "notes", "body", tenant_column="practice_id")
    assert (rep.failed, rep.reasons, rep.failed_pks) == (1, {"other_practice": 1}, [[2]])
