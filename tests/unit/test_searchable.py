"""Typed encrypted columns and blind indexes on SQLite, PostgreSQL and MariaDB: ORM and Core."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, load_only, mapped_column

import carnet
import carnet.batchops
from carnet import envelope, indexkeys
from carnet import transforms as tr
from carnet.errors import (
    CarnetError,
    ConfigurationError,
    InvalidCiphertext,
    InvalidPlaintext,
    KeyDestroyed,
    TenantMismatch,
    TenantRequired,
)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str | None] = mapped_column(sa.String(64))
    first_name: Mapped[str | None] = mapped_column(
        carnet.EncryptedString(100, tenant="practice_id")
    )
    last_name: Mapped[str | None] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
    birth_date: Mapped[dt.date | None] = mapped_column(carnet.EncryptedDate(tenant="practice_id"))
    phone: Mapped[str | None] = mapped_column(carnet.EncryptedString(32, tenant="practice_id"))
    phone_bidx = carnet.BlindIndex("phone", transform=tr.phone_fr, bits=16)
    phone_last4 = carnet.BlindIndex("phone", transform=tr.last4, bits=8, lenient=True)
    name_bidx = carnet.BlindIndex("first_name", "last_name", transform=tr.initial_lastname, bits=20)
    birth_bidx = carnet.BlindIndex("birth_date", transform=tr.date_iso, bits=12)


class Contact(Base):
    """Two-bit indexes: about a quarter of a practice's rows share each value."""

    __tablename__ = "contacts"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str | None] = mapped_column(sa.String(64))
    first_name: Mapped[str | None] = mapped_column(carnet.EncryptedString(50, tenant="practice_id"))
    last_name: Mapped[str | None] = mapped_column(carnet.EncryptedString(50, tenant="practice_id"))
    phone: Mapped[str | None] = mapped_column(carnet.EncryptedString(32, tenant="practice_id"))
    phone_bidx = carnet.BlindIndex("phone", transform=tr.phone_fr, bits=2)
    name_bidx = carnet.BlindIndex("first_name", "last_name", transform=tr.initial_lastname, bits=2)


core_md = sa.MetaData()
core_patients = sa.Table(
    "core_patients",
    core_md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("practice_id", sa.String(64)),
    sa.Column("phone", carnet.EncryptedString(32)),
    sa.Column("first_name", carnet.EncryptedString(50)),
    sa.Column("last_name", carnet.EncryptedString(50)),
    carnet.BlindIndex(
        "phone", transform=tr.phone_fr, bits=16, tenant="practice_id", column_name="phone_bidx"
    ),
    carnet.BlindIndex(
        "first_name",
        "last_name",
        transform=tr.initial_lastname,
        bits=16,
        tenant="practice_id",
        column_name="name_bidx",
    ),
)


@pytest.fixture
def keys_metadata() -> tuple[sa.MetaData, ...]:
    """This module's models, created by the shared ``keys``."""
    return (Base.metadata, core_md)


def _raw(engine: sa.Engine, sql: str, **params: object) -> list[sa.Row[object]]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def _add(engine: sa.Engine, *patients: Patient) -> list[int]:
    with Session(engine) as s:
        s.add_all(patients)
        s.commit()
        return [p.id for p in patients]


# -- typed columns ---------------------------------------------------------------------


def test_string_and_date_round_trip_as_ciphertext(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    born = dt.date(1984, 2, 29)
    with Session(engine) as s:
        p = Patient(practice_id="p1", first_name="Hélène", last_name="Dupont", birth_date=born)
        s.add(p)
        s.commit()
        # still a date on the instance after the flush, then after a reload
        assert p.birth_date == born
        s.expire_all()
        assert p.birth_date == born and type(p.birth_date) is dt.date
        pid = p.id
    with Session(engine) as s:
        got = s.get(Patient, pid)
        assert got is not None and (got.first_name, got.birth_date) == ("Hélène", born)
    row = _raw(engine, "SELECT first_name, birth_date FROM patients")[0]
    assert b"Dupont" not in bytes(row[0]) and b"1984" not in bytes(row[1])
    # Every date of a practice seals to the same length: header with "p1", ISO date, tag.
    assert bytes(row[1])[0] == 2 and len(bytes(row[1])) == envelope.overhead("p1") + 10 == 63


def test_string_length_and_date_type_are_enforced_without_echo(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        s.add(Patient(practice_id="p1", phone="0" * 33))
        with pytest.raises(InvalidPlaintext) as info:
            s.commit()
        assert "0" * 33 not in str(info.value)
    with Session(engine) as s:
        s.add(Patient(practice_id="p1", birth_date="not-a-date"))  # type: ignore[arg-type]
        with pytest.raises(InvalidPlaintext) as info:
            s.commit()
        assert "not-a-date" not in str(info.value)
    assert _raw(engine, "SELECT count(*) FROM patients")[0][0] == 0


def test_column_widths(engine: sa.Engine) -> None:
    # Sized for 32 characters of 4 UTF-8 bytes and the longest practice id
    # (255 characters, 1020 bytes) the v2 header carries.
    assert envelope.PRACTICE_BOUND_BYTES == 1020
    longest = envelope.overhead("\U0001f9fa" * 255) + 4 * 32
    assert carnet.EncryptedString(32).width == 1071 + 128 == longest
    text = envelope.text_length("\U0001f9fa" * 255, 4 * 32)
    assert carnet.EncryptedString(32, storage="text").width == 2092 + 4 * 52 == text
    ddl = str(sa.schema.CreateTable(core_patients).compile(engine))
    if engine.dialect.name == "mariadb":
        assert "VARBINARY(1199)" in ddl


# -- blind index: ORM ------------------------------------------------------------------


def test_search_by_phone_meets_every_spelling_within_one_practice(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    ids = _add(
        engine,
        Patient(practice_id="p1", last_name="A", phone="06 12 34 56 78"),
        Patient(practice_id="p1", last_name="B", phone="01 42 68 53 00"),
        Patient(practice_id="p2", last_name="C", phone="+33 6 12 34 56 78"),
        Patient(practice_id="p1", last_name="D", phone=None),
    )
    with Session(engine) as s:
        for spelling in ("0612345678", "+33 6 12 34 56 78", "0033612345678", "06.12.34.56.78"):
            found = carnet.search(s, Patient.phone_bidx, spelling, tenant="p1")
            assert [p.id for p in found] == [ids[0]]
        with carnet.tenant_scope("p2"):
            assert [p.id for p in carnet.search(s, Patient.phone_bidx, "06 12 34 56 78")] == [
                ids[2]
            ]
        assert carnet.search(s, Patient.phone_bidx, "07 00 00 00 00", tenant="p1") == []
        assert carnet.search(s, Patient.phone_bidx, "0612345678", tenant="p9") == []
        with pytest.raises(TenantRequired):
            carnet.search(s, Patient.phone_bidx, "0612345678")
        with pytest.raises(InvalidPlaintext):
            carnet.search(s, Patient.phone_bidx, "pas un numéro", tenant="p1")
        # by last four digits (lenient: a non-phone is no match, not an error)
        assert [p.id for p in carnet.search(s, Patient.phone_last4, "5678", tenant="p1")] == [
            ids[0]
        ]
        assert carnet.search(s, Patient.phone_last4, "12", tenant="p1") == []
        with pytest.raises(ConfigurationError):
            carnet.search(s, Patient.phone, "0612345678", tenant="p1")  # two indexes on phone
    # The same number in two practices is two unrelated index values.
    rows = _raw(engine, "SELECT practice_id, phone_bidx FROM patients WHERE phone IS NOT NULL")
    assert len({r[1] for r in rows}) == 3
    assert _raw(engine, "SELECT phone_bidx FROM patients WHERE id = :i", i=ids[3])[0][0] is None


def test_search_compound_and_date(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    ids = _add(
        engine,
        Patient(
            practice_id="p1",
            first_name="Hélène",
            last_name="Dupont",
            birth_date=dt.date(1990, 1, 2),
        ),
        Patient(practice_id="p1", first_name="Hugo", last_name="DUPONT"),
        Patient(practice_id="p1", first_name="Marie", last_name="Dupont"),
    )
    with Session(engine) as s:
        found = carnet.search(s, Patient.name_bidx, ("helene", "dupont"), tenant="p1")
        assert sorted(p.id for p in found) == ids[:2]  # same initial, same folded name
        with pytest.raises(ConfigurationError):
            carnet.search(s, Patient.name_bidx, "Dupont", tenant="p1")
        found = carnet.search(s, Patient.birth_date, dt.date(1990, 1, 2), tenant="p1")
        assert [p.id for p in found] == [ids[0]]
        assert [p.id for p in carnet.search(s, Patient.birth_date, "1990-01-02", tenant="p1")] == [
            ids[0]
        ]


def test_false_positives_are_dropped(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    phones = [f"06 00 00 {i // 100:02d} {i % 100:02d}" for i in range(40)]
    with Session(engine) as s:
        s.add_all(
            Contact(practice_id="p1", phone=ph, first_name=f"F{i}", last_name=f"Nom{i}")
            for i, ph in enumerate(phones)
        )
        s.add_all(Contact(practice_id="p2", phone=ph) for ph in phones)
        s.commit()
    buckets = _raw(
        engine,
        "SELECT phone_bidx, count(*) FROM contacts WHERE practice_id = 'p1' GROUP BY phone_bidx",
    )
    assert max(n for _, n in buckets) > 1  # collisions exist: the filter is exercised
    assert all(0 <= v < 4 for v, _ in buckets)
    with Session(engine) as s:
        for i, ph in enumerate(phones):
            cond, _norm = carnet.searchable.candidates(Contact.phone_bidx, ph, tenant="p1")
            n_candidates = len(s.scalars(sa.select(Contact.id).where(cond)).all())
            found = carnet.search(s, Contact.phone_bidx, ph.replace(" ", ""), tenant="p1")
            assert [c.phone for c in found] == [ph] and n_candidates >= 1
            assert found[0].practice_id == "p1"
            named = carnet.search(s, Contact.name_bidx, (f"f{i}", f"NOM{i}"), tenant="p1")
            assert [c.last_name for c in named] == [f"Nom{i}"]


def test_updates_recompute_the_index(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    (pid,) = _add(engine, Patient(practice_id="p1", phone="0612345678"))
    with Session(engine) as s:
        p = s.get(Patient, pid)
        assert p is not None
        p.phone = "07 11 22 33 44"
        s.commit()
        assert carnet.search(s, Patient.phone_bidx, "0612345678", tenant="p1") == []
        assert [x.id for x in carnet.search(s, Patient.phone_bidx, "0711223344", tenant="p1")] == [
            pid
        ]
        p.phone = None
        s.commit()
    assert _raw(engine, "SELECT phone_bidx, phone_last4 FROM patients")[0] == (None, None)


def test_tenant_change_reindexes_under_the_new_practice(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    (pid,) = _add(engine, Patient(practice_id="p1", phone="0612345678"))
    with Session(engine) as s:
        p = s.get(Patient, pid)
        assert p is not None
        p.practice_id = "p2"
        s.commit()
        assert carnet.search(s, Patient.phone_bidx, "0612345678", tenant="p1") == []
        assert [x.id for x in carnet.search(s, Patient.phone_bidx, "0612345678", tenant="p2")] == [
            pid
        ]


def test_compound_partial_update_loads_the_other_field(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    (pid,) = _add(engine, Patient(practice_id="p1", first_name="Hélène", last_name="Dupont"))
    with Session(engine) as s:
        # only id and first_name loaded: the flush must load last_name to recompute
        p = s.scalars(sa.select(Patient).options(load_only(Patient.id, Patient.first_name))).one()
        assert "last_name" not in p.__dict__
        p.first_name = "Marie"
        s.commit()
    with Session(engine) as s:
        assert [
            x.id for x in carnet.search(s, Patient.name_bidx, ("M", "Dupont"), tenant="p1")
        ] == [pid]
        assert carnet.search(s, Patient.name_bidx, ("H", "Dupont"), tenant="p1") == []


def test_compound_partial_update_opens_a_field_loaded_without_its_tenant(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    (pid,) = _add(engine, Patient(practice_id="p1", first_name="Hélène", last_name="Dupont"))
    with Session(engine) as s:
        # practice_id not loaded: first_name cannot be opened as it loads (it stays
        # Sealed, or is expired until the practice loads with it)
        p = s.scalars(sa.select(Patient).options(load_only(Patient.id, Patient.first_name))).one()
        assert type(p.__dict__.get("first_name")) is not str
        p.last_name = "Martin"
        s.commit()
    with Session(engine) as s:
        found = carnet.search(s, Patient.name_bidx, ("h", "martin"), tenant="p1")
        assert [(x.id, x.first_name) for x in found] == [(pid, "Hélène")]


def test_invalid_value_for_a_strict_index_writes_nothing(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        s.add(Patient(practice_id="p1", phone="PLANTED-SECRET"))
        with pytest.raises(InvalidPlaintext) as info:
            s.commit()
        assert "PLANTED-SECRET" not in str(info.value) + repr(info.value)
    assert _raw(engine, "SELECT count(*) FROM patients")[0][0] == 0


def test_orm_bulk_insert_and_update(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.execute(
            sa.insert(Patient),
            [
                {
                    "id": 1,
                    "practice_id": "p1",
                    "phone": "0612345678",
                    "birth_date": dt.date(2001, 5, 6),
                },
                {
                    "id": 2,
                    "practice_id": "p2",
                    "phone": "0612345678",
                    "first_name": "Al",
                    "last_name": "Ba",
                },
            ],
        )
        s.execute(sa.update(Patient), [{"id": 2, "practice_id": "p2", "phone": "0799999999"}])
        s.commit()
    with Session(engine) as s:
        assert [p.id for p in carnet.search(s, Patient.phone_bidx, "0612345678", tenant="p1")] == [
            1
        ]
        assert carnet.search(s, Patient.phone_bidx, "0612345678", tenant="p2") == []
        assert [p.id for p in carnet.search(s, Patient.phone_bidx, "0799999999", tenant="p2")] == [
            2
        ]
        found = carnet.search(s, Patient.birth_bidx, dt.date(2001, 5, 6), tenant="p1")
        assert [p.birth_date for p in found] == [dt.date(2001, 5, 6)]
        # a bulk write of one field of a compound index cannot load the other: refused
        with pytest.raises(ConfigurationError):
            s.execute(sa.update(Patient), [{"id": 2, "practice_id": "p2", "first_name": "Zoé"}])
        s.rollback()
        with pytest.raises(ConfigurationError):
            s.execute(sa.update(Patient).where(Patient.id == 1).values(phone="0700000000"))


# -- blind index: Core -----------------------------------------------------------------


def _core_index(
    keys: carnet.KeyManager, tenant: str, label: str, name: str, norm: str, bits: int
) -> int:
    root = keys.index_roots(tenant)[0]
    return indexkeys.index_value(root, norm, label=label, index=name, tenant=tenant, bits=bits)


def test_core_insert_and_update_compute_the_index(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    t = core_patients
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(t.insert(), [{"id": 1, "phone": "06 12 34 56 78"}, {"id": 2, "phone": None}])
        conn.execute(
            t.insert(), {"id": 3, "phone": "0711223344", "first_name": "É", "last_name": "Roy"}
        )
    with carnet.tenant_scope("p2"), engine.begin() as conn:
        conn.execute(t.insert(), {"id": 4, "practice_id": "p2", "phone": "+33612345678"})
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(
            t.update().where(t.c.id == sa.bindparam("pk")), {"pk": 3, "phone": "0612345678"}
        )
    rows = dict(_raw(engine, "SELECT id, phone_bidx FROM core_patients"))
    lp = "core_patients.phone_bidx"
    assert rows[1] == rows[3] == _core_index(keys, "p1", lp, "phone_fr", "+33612345678", 16)
    assert rows[2] is None
    assert rows[4] == _core_index(keys, "p2", lp, "phone_fr", "+33612345678", 16)
    name = _raw(engine, "SELECT name_bidx FROM core_patients WHERE id = 3")[0][0]
    assert name == _core_index(
        keys, "p1", "core_patients.name_bidx", "initial_lastname", "e roy", 16
    )


def test_core_refusals(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    t = core_patients
    with engine.begin() as conn, pytest.raises(TenantRequired):
        conn.execute(t.insert(), {"id": 1, "phone": "0612345678"})
    with carnet.tenant_scope("p1"), engine.begin() as conn, pytest.raises(TenantMismatch):
        conn.execute(t.insert(), {"id": 1, "practice_id": "p2", "phone": "0612345678"})
    with carnet.tenant_scope("p1"), engine.begin() as conn, pytest.raises(ConfigurationError):
        conn.execute(t.insert().values(id=1, phone="0612345678"))
    with carnet.tenant_scope("p1"), engine.begin() as conn, pytest.raises(ConfigurationError):
        conn.execute(t.update().where(t.c.id == 1), {"first_name": "Zoé"})
    src = sa.select(t.c.id + 1000, t.c.practice_id, t.c.phone)
    with carnet.tenant_scope("p1"), engine.begin() as conn, pytest.raises(CarnetError):
        conn.execute(t.insert().from_select(["id", "practice_id", "phone"], src))
    assert _raw(engine, "SELECT count(*) FROM core_patients")[0][0] == 0


# -- keys: rotation, re-index, destruction ---------------------------------------------


def test_data_key_rotation_leaves_indexes_valid(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    (pid,) = _add(engine, Patient(practice_id="p1", phone="0612345678"))
    before = _raw(engine, "SELECT phone_bidx FROM patients")[0][0]
    keys.rotate("p1")
    (pid2,) = _add(engine, Patient(practice_id="p1", phone="06 12 34 56 78"))
    rows = _raw(engine, "SELECT phone_bidx FROM patients ORDER BY id")
    assert [r[0] for r in rows] == [before, before]
    with Session(engine) as s:
        found = carnet.search(s, Patient.phone_bidx, "0612345678", tenant="p1")
        assert sorted(p.id for p in found) == [pid, pid2]


def test_index_root_rotation_and_reindex_keep_every_row_findable(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    phones = [f"06 12 34 {i:02d} 00" for i in range(30)]
    ids = _add(engine, *(Patient(practice_id="p1", phone=ph) for ph in phones))
    (other,) = _add(engine, Patient(practice_id="p2", phone=phones[0]))
    p2_before = _raw(engine, "SELECT phone_bidx FROM patients WHERE id = :i", i=other)[0][0]
    old = keys.index_roots("p1")[0]
    keys.rotate_index_root("p1")
    (new_id,) = _add(engine, Patient(practice_id="p1", phone="0799999999"))

    def all_found() -> None:
        with Session(engine) as s:
            for pid, ph in zip(ids, phones, strict=True):
                assert [p.id for p in carnet.search(s, Patient.phone_bidx, ph, tenant="p1")] == [
                    pid
                ]
            assert [
                p.id for p in carnet.search(s, Patient.phone_bidx, "0799999999", tenant="p1")
            ] == [new_id]

    all_found()  # mixed roots: old values and the new row
    report = carnet.reindex(engine, Patient.phone_bidx, tenant="p1", batch_size=7)
    assert report.rewritten == 30 and report.failed == []
    all_found()
    keys.retire(old.key_id)
    fresh = carnet.KeyManager(engine, master_key=keys.master_key)
    carnet.configure(fresh)
    all_found()  # only the new root now
    again = carnet.reindex(engine, Patient.phone_bidx, tenant="p1")
    assert again.rewritten == 0 and again.skipped == 31
    assert _raw(engine, "SELECT phone_bidx FROM patients WHERE id = :i", i=other)[0][0] == p2_before


def test_destroy_removes_the_index_root(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    _add(engine, Patient(practice_id="gone", phone="0612345678"))
    _add(engine, Patient(practice_id="kept", phone="0612345678"))
    assert {r.kind for r in keys.list_keys("gone")} == {"data", "index"}
    keys.destroy("gone")
    assert {(r.kind, r.state) for r in keys.list_keys("gone")} == {
        ("data", "destroyed"),
        ("index", "destroyed"),
    }
    fresh = carnet.KeyManager(engine, master_key=keys.master_key)
    carnet.configure(fresh)
    with Session(engine) as s:
        with pytest.raises(KeyDestroyed):
            carnet.search(s, Patient.phone_bidx, "0612345678", tenant="gone")
        assert len(carnet.search(s, Patient.phone_bidx, "0612345678", tenant="kept")) == 1
        s.add(Patient(practice_id="gone", phone="0612345678"))
        with pytest.raises(KeyDestroyed):
            s.commit()


def test_first_root_created_in_a_rolled_back_transaction_is_forgotten(
    keys: carnet.KeyManager, engine: sa.Engine
) -> None:
    with Session(engine) as s:
        s.add(Patient(practice_id="rb", phone="0612345678"))
        s.flush()
        s.rollback()
    (pid,) = _add(engine, Patient(practice_id="rb", phone="0612345678"))
    fresh = carnet.KeyManager(engine, master_key=keys.master_key)
    with Session(engine) as s:
        found = carnet.search(s, Patient.phone_bidx, "0612345678", tenant="rb", manager=fresh)
        assert [p.id for p in found] == [pid]


def test_reprs_hold_no_secret(keys: carnet.KeyManager) -> None:
    root = keys.index_roots("p1")[0]
    text = repr(root) + repr(Patient.__table__.c.phone_bidx.type) + str(root)
    assert root.secret.hex() not in text and repr(root.secret) not in text
    assert root.key_id.hex() in text


def test_reindex_resumes_after_a_crash_and_fills_missing_values(
    keys: carnet.KeyManager, engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    phones = [f"06 12 00 {i:02d} 11" for i in range(20)]
    ids = _add(engine, *(Patient(practice_id="p1", phone=ph) for ph in phones))
    # Rows written with the index left out on purpose (as after a migration): NULL.
    with carnet.tenant_scope("p1"), engine.begin() as conn:
        conn.execute(
            Patient.__table__.insert(),
            [{"id": 100 + i, "practice_id": "p1", "phone": ph, "phone_bidx": None}
             for i, ph in enumerate(phones[:3])],
        )  # fmt: skip
    keys.rotate_index_root("p1")
    real_value = carnet.batchops._value
    calls = 0

    def dying(*args: object) -> int:
        nonlocal calls
        calls += 1
        if calls > 12:
            raise RuntimeError("killed")  # not a CarnetError: the run stops here
        return real_value(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(carnet.batchops, "_value", dying)
    with pytest.raises(RuntimeError):
        carnet.reindex(engine, Patient.phone_bidx, tenant="p1", batch_size=5)
    monkeypatch.setattr(carnet.batchops, "_value", real_value)
    report = carnet.reindex(engine, Patient.phone_bidx, tenant="p1", batch_size=5)
    assert report.resumed_from is not None  # continued after the last committed batch
    assert report.scanned == 23 - 10 and report.failed == []
    new_root = keys.index_roots("p1")[0]
    rows = dict(_raw(engine, "SELECT id, phone_bidx FROM patients"))
    for pid, ph in zip(ids + [100, 101, 102], phones + phones[:3], strict=True):
        want = indexkeys.index_value(
            new_root, tr.phone_fr(ph), label="patients.phone_bidx", index="phone_fr",
            tenant="p1", bits=16,
        )  # fmt: skip
        assert rows[pid] == want
    with Session(engine) as s:
        found = carnet.search(s, Patient.phone_bidx, phones[0], tenant="p1")
        assert sorted(p.id for p in found) == [ids[0], 100]


def test_no_plaintext_or_key_in_logs_and_errors(
    keys: carnet.KeyManager, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="carnet")
    planted_phone = "06 98 76 54 32"
    (pid,) = _add(engine, Patient(practice_id="p1", last_name="PLANTED-NAME", phone=planted_phone))
    keys.rotate_index_root("p1")
    carnet.reindex(engine, Patient.phone_bidx, tenant="p1")
    errors: list[BaseException] = []
    with Session(engine) as s:
        assert [p.id for p in carnet.search(s, Patient.phone_bidx, planted_phone, tenant="p1")] == [
            pid
        ]
        for bad in ("PLANTED-NOT-A-PHONE", "06 12"):
            try:
                carnet.search(s, Patient.phone_bidx, bad, tenant="p1")
            except InvalidPlaintext as exc:
                errors.append(exc)
        s.add(Patient(practice_id="p1", phone="PLANTED-NOT-A-PHONE"))
        try:
            s.commit()
        except InvalidPlaintext as exc:
            errors.append(exc)
    assert len(errors) == 3
    secrets = [r.secret.hex() for r in keys.index_roots("p1")]
    text = caplog.text + "".join(f"{e}{e!r}" for e in errors)
    for needle in ["PLANTED", planted_phone, planted_phone.replace(" ", ""), *secrets]:
        assert needle not in text


def _chain_text(exc: BaseException) -> str:
    """str and repr of ``exc`` and of every exception in its cause/context chain."""
    out: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out += [str(e), repr(e), *(str(a) for a in e.args)]
        todo += [e.__cause__, e.__context__]  # type: ignore[list-item]
    return "\n".join(out)


BAD_DATE = "31/12/1984"  # a real birth date, badly written: an identifier all the same


def test_no_identifier_in_any_exception_chain(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    errors: list[BaseException] = []

    def expect(fn: Any) -> None:
        try:
            fn()
        except (InvalidPlaintext, InvalidCiphertext) as exc:
            errors.append(exc)
        else:
            raise AssertionError("no error raised")

    # Every transform, on a value it refuses.
    for transform, bad in [
        (tr.date_iso, (BAD_DATE,)),
        (tr.date_iso, ("1984-13-45",)),
        (tr.phone_fr, (BAD_DATE,)),
        (tr.last4, ("31/1",)),
        (tr.initial_lastname, ("", BAD_DATE)),
        (tr.exact, (b"31/12/1984",)),
        (tr.folded, (19841231,)),
    ]:
        expect(lambda t=transform, b=bad: t(*b))
    with Session(engine) as s:
        # A search for a value its index refuses.
        expect(lambda: carnet.search(s, Patient.birth_bidx, BAD_DATE, tenant="p1"))
        expect(lambda: carnet.search(s, Patient.phone_bidx, BAD_DATE, tenant="p1"))
        # An EncryptedDate written as a badly formed string.
        s.add(Patient(practice_id="p1", birth_date=BAD_DATE))  # type: ignore[arg-type]
        expect(s.commit)
        s.rollback()
    # An EncryptedDate that opens to text that is not a date (sealed by another
    # type under the same label): the read refuses it without quoting it.
    (pid,) = _add(engine, Patient(practice_id="p1", birth_date=dt.date(1984, 12, 31)))
    blob = keys.encrypt(BAD_DATE.encode(), tenant="p1", label="patients.birth_date")
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE patients SET birth_date = :b WHERE id = :i").bindparams(
                sa.bindparam("b", type_=sa.LargeBinary)
            ),
            {"b": blob, "i": pid},
        )
    with Session(engine) as s:
        expect(lambda: s.get(Patient, pid))
    assert len(errors) == 11
    for exc in errors:
        assert BAD_DATE not in _chain_text(exc), type(exc)
        assert "1984-13-45" not in _chain_text(exc)
