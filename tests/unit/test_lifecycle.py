"""Library functions behind the CLI, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import carnet
from carnet import dbchecks, envelope, lifecycle
from carnet.errors import InvalidCiphertext, KeyInUse
from carnet.keystore import wrap_context
from support.dbutil import drop_checks
from support.lifecycleutil import SECRET, active_key_ids, fill_notes, notes_table, read_notes


@pytest.fixture
def keys_with_notes(unconfigured_keys: carnet.KeyManager, engine: sa.Engine) -> carnet.KeyManager:
    """As after ``carnet init`` (key and job tables), with 120 notes sealed in ``notes``."""
    lifecycle.init(unconfigured_keys)
    fill_notes(engine, unconfigured_keys, 120)
    return unconfigured_keys


def test_status_discovers_columns_and_counts_by_key(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    with engine.begin() as conn:
        # Plaintext left in a column whose checks are gone (dropped by a DBA,
        # or rows from before them): the database would refuse the plant
        # otherwise, and status must still count it.
        drop_checks(conn, notes_table(sa.MetaData()))
        conn.execute(sa.text("UPDATE notes SET summary = 'legacy' WHERE id = 5"))
        conn.execute(sa.text("UPDATE notes SET body = NULL WHERE id = 6"))
    rep = lifecycle.status(keys_with_notes)
    assert rep.master_key_ok
    assert [t.tenant for t in rep.tenants] == ["p0", "p1", "p2"]
    assert all(t.active_version == 1 for t in rep.tenants)
    cols = {(c.table, c.column): c for c in rep.columns}
    assert set(cols) == {("notes", "body"), ("notes", "summary")}
    assert cols["notes", "body"].nulls == 1 and cols["notes", "summary"].plaintext == 1
    assert sum(k["rows"] for k in cols["notes", "body"].by_key.values()) == 119
    assert SECRET not in repr(rep.as_dict()) and "legacy" not in repr(rep.as_dict())


def test_rotate_reencrypt_retire(keys_with_notes: carnet.KeyManager, engine: sa.Engine) -> None:
    old = {r.key_id for r in keys_with_notes.list_keys()}
    rotated = lifecycle.rotate_keys(keys_with_notes)
    assert len(rotated) == 3
    before = read_notes(engine, keys_with_notes)
    one_old = next(iter(old))
    with pytest.raises(KeyInUse) as exc:
        lifecycle.retire_key(keys_with_notes, one_old)
    assert "notes.body" in str(exc.value) and "notes.summary" in str(exc.value)
    for col in ("body", "summary"):
        rep = lifecycle.reencrypt(keys_with_notes, "notes", col, batch_size=32)
        assert rep.rewritten == 120 and not rep.failed
        assert lifecycle.reencrypt(keys_with_notes, "notes", col).rewritten == 0
    after = read_notes(engine, keys_with_notes)
    assert {i: p for i, (p, _) in after.items()} == {i: p for i, (p, _) in before.items()}
    assert {k for _, k in after.values()} <= active_key_ids(keys_with_notes)
    res = lifecycle.retire_key(keys_with_notes, one_old, [("notes", "body"), ("notes", "summary")])
    assert res["key"]["state"] == "retired" and res["rows_made_unreadable"] == 0
    assert lifecycle.verify(keys_with_notes, "notes", "body").failed == 0


def test_reencrypt_one_tenant_and_renamed_label(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    keys_with_notes.rotate("p1")
    rep = lifecycle.reencrypt(keys_with_notes, "notes", "body", tenant="p1")
    assert rep.rewritten == 40
    rep = lifecycle.reencrypt(
        keys_with_notes,
        "notes",
        "body",
        label="notes.comment",
        old_label="notes.body",
        job="rename",
    )
    assert rep.rewritten == 120
    assert lifecycle.verify(keys_with_notes, "notes", "body", label="notes.comment").ok == 120
    assert lifecycle.verify(keys_with_notes, "notes", "body").failed == 120


def test_a_label_change_moves_the_database_check_to_the_new_label(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    from carnet import dbchecks

    def write(label: str) -> None:
        blob = keys_with_notes.encrypt(b"x", tenant="p0", label=label)
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE notes SET body = :b WHERE id = 0").bindparams(
                    sa.bindparam("b", type_=sa.LargeBinary)
                ),
                {"b": blob},
            )

    # Before: the check accepts values of the column's label only.
    write("notes.body")
    with pytest.raises(InvalidCiphertext) as refused:
        write("notes.comment")
    assert refused.value.constraint == "carnet_f2_notes_body"
    # Meanwhile both labels are accepted (the application may write either).
    assert dbchecks.accept_labels(engine, "notes", "body", "notes.comment", "notes.body")
    write("notes.comment")
    write("notes.body")
    rep = lifecycle.reencrypt(
        keys_with_notes, "notes", "body", label="notes.comment", old_label="notes.body"
    )
    assert rep.failed == [] and rep.rewritten == 120
    # After a complete pass: the new label alone.
    write("notes.comment")
    with pytest.raises(InvalidCiphertext):
        write("notes.body")


def test_verify_reports_pks_of_tampered_foreign_and_destroyed(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    raw = sa.table("notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:
        # The database would refuse the value from another column (its label
        # tag): what verify says if such a value is there anyway.
        drop_checks(conn, notes_table(sa.MetaData()))
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
    lifecycle.destroy_tenant(keys_with_notes, "p1")
    rep = lifecycle.verify(keys_with_notes, "notes", "body")
    # Shredded rows are their own category: the erasure working, not a failure.
    assert (rep.failed, rep.destroyed, rep.ok) == (2, 40, 78)
    assert rep.reasons == {"tampered_or_foreign": 2}
    assert sorted(rep.failed_pks) == [[6], [9]]
    assert rep.practices["p1"] == {"ok": 0, "destroyed": 40, "failed": 0}
    assert SECRET not in repr(rep.as_dict())


def test_master_rotation_then_old_key_deleted(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine, tmp_path: Path, master_key_uri: str
) -> None:
    new_uri = "file://" + str(tmp_path / "m2.key")
    lifecycle.new_master(new_uri)
    rep = lifecycle.rotate_master(keys_with_notes, new_uri, batch_size=2)
    assert rep.rewrapped == 3
    assert lifecycle.rotate_master(keys_with_notes, new_uri).already == 3
    keys_with_notes.close()
    Path(master_key_uri[len("file://") :]).unlink()
    fresh = carnet.KeyManager(engine, master_key=new_uri)
    assert len(read_notes(engine, fresh)) == 120
    assert lifecycle.status(fresh).master_key_ok


def test_verify_with_tenant_column_catches_a_value_copied_between_practices(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    raw = sa.table("notes", sa.column("id"), sa.column("body", sa.LargeBinary))
    with engine.begin() as conn:  # row 1 is p1's, row 2 is p2's: paste p1's note into p2's row
        # The database would refuse the paste: verify must catch such a value
        # anyway where the checks are gone (dropped by a DBA, rows from before).
        drop_checks(conn, notes_table(sa.MetaData()))
        b1 = conn.execute(sa.select(raw.c.body).where(raw.c.id == 1)).scalar_one()
        conn.execute(raw.update().where(raw.c.id == 2).values(body=b1))
    # By its key alone the pasted value is authentic...
    assert lifecycle.verify(keys_with_notes, "notes", "body").failed == 0
    # ...but not in a row of p2.
    rep = lifecycle.verify(keys_with_notes, "notes", "body", tenant_column="practice_id")
    assert (rep.failed, rep.reasons, rep.failed_pks) == (1, {"other_practice": 1}, [[2]])


# -- format v1: read, counted, upgraded by reencrypt -------------------------------------


def _seal_v1(keys: carnet.KeyManager, plaintext: bytes, *, tenant: str, label: str) -> bytes:
    """A format-v1 value under ``tenant``'s active key, framed by hand (docs/format.md):
    carnet no longer writes v1."""
    rec = keys.ensure_key(tenant)
    assert rec.wrapped_key is not None
    dek = keys.master_key.unwrap(rec.wrapped_key, wrap_context(tenant, rec.key_id))
    nonce = os.urandom(12)
    aad = envelope.associated_data(rec.key_id, label, tenant, version=1)
    return b"\x01" + rec.key_id + nonce + AESGCM(dek).encrypt(nonce, plaintext, aad)


def _plant_v1(keys: carnet.KeyManager, engine: sa.Engine, ids: range) -> None:
    """Rewrite rows ``ids`` of both columns as v1 values of the same notes."""
    raw = sa.table(
        "notes",
        sa.column("id"),
        sa.column("practice_id"),
        sa.column("body", sa.LargeBinary),
        sa.column("summary", sa.Text),
    )
    body, summary = read_notes(engine, keys), read_notes(engine, keys, "summary")
    with engine.begin() as conn:
        # A database upgraded from a release that wrote v1 holds its checks in
        # v1 mode (what `carnet checks install` chooses for such data).
        for spec in dbchecks.specs_for(notes_table(sa.MetaData()), engine.dialect.name):
            dbchecks.set_format_mode(conn, spec, "v1")
        tenants = dict(conn.execute(sa.select(raw.c.id, raw.c.practice_id)).all())
        for i in ids:
            t = tenants[i]
            conn.execute(
                raw.update()
                .where(raw.c.id == i)
                .values(
                    body=_seal_v1(keys, body[i][0].encode(), tenant=t, label="notes.body"),
                    summary=envelope.to_text(
                        _seal_v1(keys, summary[i][0].encode(), tenant=t, label="notes.summary")
                    ),
                )
            )


def _versions(engine: sa.Engine) -> dict[str, list[int]]:
    raw = sa.table("notes", sa.column("body", sa.LargeBinary), sa.column("summary", sa.Text))
    with engine.connect() as conn:
        rows = conn.execute(sa.select(raw.c.body, raw.c.summary)).all()
    return {
        "body": sorted(envelope.version_of(bytes(b)) for b, _ in rows),
        "summary": sorted(envelope.version_of(envelope.from_text(s)) for _, s in rows),
    }


def test_reencrypt_upgrades_v1_values_on_the_active_key(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    before = {c: read_notes(engine, keys_with_notes, c) for c in ("body", "summary")}
    _plant_v1(keys_with_notes, engine, range(0, 30))
    assert _versions(engine) == {c: [1] * 30 + [2] * 90 for c in ("body", "summary")}
    # v1 values read as they did, in Python and through the ORM type.
    assert {c: read_notes(engine, keys_with_notes, c) for c in ("body", "summary")} == before
    notes = notes_table(sa.MetaData())
    got: dict[int, str] = {}
    carnet.bind_manager(engine, keys_with_notes)
    try:
        with engine.connect() as conn:
            for t in ("p0", "p1", "p2"):
                with carnet.tenant_scope(t):
                    q = sa.select(notes.c.id, notes.c.body).where(notes.c.practice_id == t)
                    got.update((r[0], r[1]) for r in conn.execute(q))
    finally:
        carnet.bind_manager(engine, None)
    assert got == {i: p for i, (p, _) in before["body"].items()}
    # Under the active key, yet not current: status counts them, doctor's word is reencrypt.
    cols = {(c.table, c.column): c for c in lifecycle.status(keys_with_notes).columns}
    for c in ("body", "summary"):
        assert cols["notes", c].v1 == 30 and cols["notes", c].not_on_active == 0
    for c in ("body", "summary"):
        rep = lifecycle.reencrypt(keys_with_notes, "notes", c, batch_size=7)
        assert (rep.rewritten, rep.from_v1, rep.already_current) == (30, 30, 90)
        assert not rep.failed
        again = lifecycle.reencrypt(keys_with_notes, "notes", c)
        assert (again.rewritten, again.from_v1, again.already_current) == (0, 0, 120)
    assert _versions(engine) == {c: [2] * 120 for c in ("body", "summary")}
    after = {c: read_notes(engine, keys_with_notes, c) for c in ("body", "summary")}
    assert after == before  # same notes, same (active) keys
    cols = {(c.table, c.column): c for c in lifecycle.status(keys_with_notes).columns}
    assert cols["notes", "body"].v1 == 0 and cols["notes", "summary"].v1 == 0
    for c in ("body", "summary"):
        assert lifecycle.verify(keys_with_notes, "notes", c, tenant_column="practice_id").ok == 120


def test_reencrypt_after_rotation_moves_v1_values_to_v2_on_the_new_key(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    _plant_v1(keys_with_notes, engine, range(0, 12))
    before = read_notes(engine, keys_with_notes)
    old = {r.key_id for r in keys_with_notes.list_keys()}
    lifecycle.rotate_keys(keys_with_notes)
    st = {(c.table, c.column): c for c in lifecycle.status(keys_with_notes).columns}[
        "notes", "body"
    ]
    # Every value is on an older key now; 12 of them are v1 too (counted in both).
    assert (st.not_on_active, st.v1) == (120, 12)
    rep = lifecycle.reencrypt(keys_with_notes, "notes", "body")
    assert (rep.rewritten, rep.from_v1) == (120, 12)
    after = read_notes(engine, keys_with_notes)
    assert {i: p for i, (p, _) in after.items()} == {i: p for i, (p, _) in before.items()}
    assert {k for _, k in after.values()} <= active_key_ids(keys_with_notes)
    assert not {k for _, k in after.values()} & old
    assert _versions(engine)["body"] == [2] * 120
    # The old keys are unused in body now, v1 values included.
    for kid in old:
        assert lifecycle.key_usage(keys_with_notes, kid, [("notes", "body")]).total == 0


def test_key_usage_counts_v1_and_v2_values_of_a_key(
    keys_with_notes: carnet.KeyManager, engine: sa.Engine
) -> None:
    _plant_v1(keys_with_notes, engine, range(0, 9))
    kid = keys_with_notes.ensure_key("p0").key_id
    usage = lifecycle.key_usage(keys_with_notes, kid, [("notes", "body"), ("notes", "summary")])
    # p0 holds every third row: 40 of 120 in each column, 3 of each in v1.
    assert usage.rows == {"notes.body": 40, "notes.summary": 40}
