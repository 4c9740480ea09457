"""Model-based test of the tenant invariant on SQLite, PostgreSQL and MariaDB.

Random sequences of ORM adds, edits and practice changes (a form posting the
same text back, merge, values not loaded, deferred or expired, a change through
a relationship), ORM bulk and criteria statements, Core writes with and
without a scope, savepoints rolled back, key rotation, crypto-shredding and
cache clears. After every step the stored rows are checked against an
in-memory model with a brand-new KeyManager (tests/support/invariant.py); after every
example, again from a brand-new process.

CI runs a bounded, derandomized number of examples per backend;
``make fuzz`` (CARNET_FUZZ_EXAMPLES) runs many more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    deferred,
    load_only,
    mapped_column,
    relationship,
)
from sqlalchemy.orm.exc import StaleDataError

import carnet
from carnet.errors import (
    CarnetError,
    KeyDestroyed,
    TenantMismatch,
    TenantRequired,
    UnsupportedOperation,
)
from support.invariant import mismatches
from support.paths import SUPPORT

FUZZ = int(os.environ.get("CARNET_FUZZ_EXAMPLES", "0"))
EXAMPLES = FUZZ or 12
STEPS = 25 if FUZZ else 18

PRACTICES = ["cab-lyon", "cab-nice", "cab-brest", "cab-metz"]


class Base(DeclarativeBase):
    pass


class Practice(Base):
    __tablename__ = "mt_practices"
    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)


class MNote(Base):
    __tablename__ = "mt_notes"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str | None] = mapped_column(sa.ForeignKey("mt_practices.id"))
    practice: Mapped[Practice | None] = relationship()
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    # Deferred: a practice change must load it before re-sealing it.
    summary: Mapped[str | None] = deferred(
        mapped_column(carnet.EncryptedText(tenant="practice_id", storage="text"))
    )


class MPatient(Base):
    __tablename__ = "mt_patients"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    practice_id: Mapped[str] = mapped_column(sa.String(64))


class MConsult(Base):
    """A note whose practice is on its parent row (the patient's)."""

    __tablename__ = "mt_consults"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    patient_id: Mapped[int] = mapped_column(sa.ForeignKey("mt_patients.id"))
    patient: Mapped[MPatient] = relationship()
    comment: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="patient.practice_id"))


notes = MNote.__table__
consults = MConsult.__table__
PATIENTS = list(range(1, 7))
texts = st.one_of(st.none(), st.text(max_size=40))
practices = st.sampled_from(PRACTICES)


def machine_for(engine: sa.Engine, master_key_uri: str, checks: list[int]) -> type:
    class TenantMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.model: dict[int, tuple[str, str | None, str | None]] = {}
            self.destroyed: set[str] = set()
            self.keyed: set[str] = set()
            self.next_id = 1
            self.patients = {p: PRACTICES[p % len(PRACTICES)] for p in PATIENTS}
            self.consults: dict[int, tuple[int, str | None]] = {}

        @initialize()
        def fresh(self) -> None:
            carnet.configure(None)
            with engine.begin() as conn:
                conn.execute(notes.delete())
                conn.execute(consults.delete())
                conn.execute(MPatient.__table__.delete())
                conn.execute(
                    MPatient.__table__.insert(),
                    [{"id": p, "practice_id": t} for p, t in self.patients.items()],
                )
                conn.execute(sa.text("DELETE FROM carnet_keys"))
            self.keys = carnet.KeyManager(engine, master_key=master_key_uri)
            carnet.configure(self.keys)

        def teardown(self) -> None:
            carnet.configure(None)
            if hasattr(self, "keys"):
                self.keys.close()
            # The same check from a brand-new process: nothing cached anywhere.
            if self.model or self.consults:
                path = Path(os.environ.get("TMPDIR", "/tmp")) / f"carnet-model-{os.getpid()}.json"
                path.write_text(
                    json.dumps(
                        {
                            "expected": {str(k): list(v) for k, v in self.model.items()},
                            "destroyed": sorted(self.destroyed),
                            "consults": {str(k): list(v) for k, v in self.consults.items()},
                            "patients": {str(k): v for k, v in self.patients.items()},
                        }
                    )
                )
                proc = subprocess.run(
                    [
                        sys.executable,
                        str(SUPPORT / "invariant.py"),
                        str(engine.url.render_as_string(hide_password=False)),
                        master_key_uri,
                        str(path),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                )
                path.unlink()
                assert proc.returncode == 0, proc.stdout + proc.stderr

        # -- helpers ----------------------------------------------------------

        def _id(self) -> int:
            self.next_id += 1
            return self.next_id

        def _live(self) -> list[int]:
            return sorted(k for k, v in self.model.items() if v[0] not in self.destroyed)

        def _writes(self, practice: str) -> bool:
            return practice not in self.destroyed

        def _refused(self, fn: Callable[[], Any], *errors: type[BaseException]) -> None:
            with pytest.raises(errors or (CarnetError,)):
                fn()

        def _created(self, practice: str) -> None:
            self.keyed.add(practice)

        # -- ORM writes ------------------------------------------------------

        @rule(practice=practices, body=texts, summary=texts)
        def orm_add(self, practice: str, body: str | None, summary: str | None) -> None:
            nid = self._id()

            def add() -> None:
                with Session(engine) as s:
                    s.add(MNote(id=nid, practice_id=practice, body=body, summary=summary))
                    s.commit()

            if self._writes(practice) or (body is None and summary is None):
                add()
                self.model[nid] = (practice, body, summary)
                if body is not None or summary is not None:
                    self._created(practice)
            else:
                self._refused(add, KeyDestroyed)

        @precondition(lambda self: self._live())
        @rule(data=st.data(), body=texts)
        def orm_edit(self, data: st.DataObject, body: str | None) -> None:
            nid = data.draw(st.sampled_from(self._live()))
            with Session(engine) as s:
                n = s.get(MNote, nid)
                assert n is not None
                n.body = body
                s.commit()
            p, _, summary = self.model[nid]
            self.model[nid] = (p, body, summary)

        @precondition(lambda self: self._live())
        @rule(
            data=st.data(),
            new=practices,
            how=st.sampled_from(
                ["form_post", "load_only", "expired", "relationship", "merge", "attribute"]
            ),
        )
        def orm_move(self, data: st.DataObject, new: str, how: str) -> None:
            nid = data.draw(st.sampled_from(self._live()))
            old, body, summary = self.model[nid]

            def move() -> None:
                with Session(engine) as s:
                    if how == "merge":
                        s.merge(MNote(id=nid, practice_id=new, body=body, summary=summary))
                    elif how == "load_only":
                        n = s.scalars(
                            sa.select(MNote)
                            .options(load_only(MNote.id, MNote.practice_id))
                            .where(MNote.id == nid)
                        ).one()
                        n.practice_id = new
                    else:
                        n = s.get(MNote, nid)
                        assert n is not None
                        if how == "form_post":
                            # A form posts every field back: the same texts, another practice.
                            n.practice_id = new
                            n.body = body
                            n.summary = summary
                        elif how == "expired":
                            s.expire(n)
                            n.practice_id = new
                        elif how == "relationship":
                            n.practice = s.get(Practice, new)
                        else:
                            n.practice_id = new
                    s.commit()

            if new == old or self._writes(new) or (body is None and summary is None):
                move()
                self.model[nid] = (new, body, summary)
                if new != old and (body is not None or summary is not None):
                    self._created(new)
            else:
                self._refused(move, KeyDestroyed)

        @precondition(lambda self: self._live())
        @rule(data=st.data(), new=practices)
        def orm_statement_move_is_refused(self, data: st.DataObject, new: str) -> None:
            nid = data.draw(st.sampled_from(self._live()))
            with Session(engine) as s:
                self._refused(
                    lambda: s.execute(
                        sa.update(MNote).where(MNote.id == nid).values(practice_id=new)
                    ),
                    UnsupportedOperation,
                )

        @rule(rows=st.lists(st.tuples(practices, texts), min_size=1, max_size=4))
        def orm_bulk_insert(self, rows: list[tuple[str, str | None]]) -> None:
            params = [
                {"id": self._id(), "practice_id": p, "body": b, "summary": b} for p, b in rows
            ]

            def insert() -> None:
                with Session(engine) as s:
                    s.execute(sa.insert(MNote), params)
                    s.commit()

            if all(self._writes(p["practice_id"]) or p["body"] is None for p in params):
                insert()
                for p in params:
                    self.model[p["id"]] = (p["practice_id"], p["body"], p["body"])
                    if p["body"] is not None:
                        self._created(p["practice_id"])
            else:
                self._refused(insert, KeyDestroyed)

        @precondition(lambda self: self._live())
        @rule(
            data=st.data(),
            body=texts,
            scope=st.sampled_from(["none", "own", "other"]),
            practice=st.sampled_from(["absent", "own", "other"]),
        )
        def orm_bulk_update(
            self, data: st.DataObject, body: str | None, scope: str, practice: str
        ) -> None:
            nid = data.draw(st.sampled_from(self._live()))
            own, _, summary = self.model[nid]
            other = data.draw(st.sampled_from([p for p in PRACTICES if p != own]))
            row: dict[str, Any] = {"id": nid, "body": body}
            if practice != "absent":
                row["practice_id"] = own if practice == "own" else other
            scoped = {"none": None, "own": own, "other": other}[scope]

            def update() -> None:
                with Session(engine) as s:
                    if scoped is None:
                        s.execute(sa.update(MNote), [row])
                    else:
                        with carnet.tenant_scope(scoped):
                            s.execute(sa.update(MNote), [row])
                    s.commit()

            target = row.get("practice_id", scoped)
            if body is not None and target is None:
                self._refused(update, TenantRequired)
                return
            if body is not None and scoped is not None and target != scoped:
                self._refused(update, TenantMismatch)
                return
            if target not in (None, own):
                # Would move the row without re-sealing its summary: the write is
                # pinned to the named practice, matches nothing, and changes nothing.
                try:
                    update()
                except (CarnetError, StaleDataError):
                    pass
                return
            if body is not None and not self._writes(own):
                return
            update()
            self.model[nid] = (own, body, summary)

        # -- Core writes -------------------------------------------------------

        @rule(practice=practices, body=texts, scope=st.sampled_from(["none", "same", "other"]))
        def core_insert(self, practice: str, body: str | None, scope: str) -> None:
            nid = self._id()
            scoped = {
                "none": None,
                "same": practice,
                "other": next(p for p in PRACTICES if p != practice),
            }[scope]

            def insert() -> None:
                with engine.begin() as conn:
                    if scoped is None:
                        conn.execute(
                            notes.insert(), {"id": nid, "practice_id": practice, "body": body}
                        )
                    else:
                        with carnet.tenant_scope(scoped):
                            conn.execute(
                                notes.insert(), {"id": nid, "practice_id": practice, "body": body}
                            )

            if body is not None and scope == "other":
                self._refused(insert, TenantMismatch)
            elif body is not None and not self._writes(practice):
                self._refused(insert, KeyDestroyed)
            else:
                insert()
                self.model[nid] = (practice, body, None)
                if body is not None:
                    self._created(practice)

        @precondition(lambda self: self._live())
        @rule(
            data=st.data(),
            body=st.text(max_size=20),
            scope=st.sampled_from(["none", "own", "other"]),
        )
        def core_update(self, data: st.DataObject, body: str, scope: str) -> None:
            nid = data.draw(st.sampled_from(self._live()))
            own, _, summary = self.model[nid]
            scoped = {"none": None, "own": own, "other": next(p for p in PRACTICES if p != own)}[
                scope
            ]
            stmt = notes.update().where(notes.c.id == nid).values(body=body)
            if scoped is None:
                with engine.begin() as conn:
                    self._refused(lambda: conn.execute(stmt), TenantRequired)
                return
            if not self._writes(scoped):
                return
            with carnet.tenant_scope(scoped), engine.begin() as conn:
                matched = conn.execute(stmt).rowcount
            if scoped == own:
                assert matched == 1
                self.model[nid] = (own, body, summary)
                self._created(own)
            else:
                assert matched == 0  # pinned to the scope's practice: another's row is not touched

        @precondition(lambda self: self._live())
        @rule(data=st.data(), new=practices)
        def core_move_without_values_is_refused(self, data: st.DataObject, new: str) -> None:
            nid = data.draw(st.sampled_from(self._live()))
            with engine.begin() as conn:
                self._refused(
                    lambda: conn.execute(
                        notes.update().where(notes.c.id == nid).values(practice_id=new)
                    ),
                    UnsupportedOperation,
                )

        # -- savepoints ------------------------------------------------------------

        @rule(
            practice=practices,
            first=st.text(max_size=20),
            second=st.text(max_size=20),
            orm=st.booleans(),
        )
        def savepoint_rolled_back(self, practice: str, first: str, second: str, orm: bool) -> None:
            # The practice's first key may be created inside the savepoint (on
            # SQLite, in the savepoint itself): a rollback must not leave it cached.
            if not self._writes(practice):
                return
            before, gone, kept = self._id(), self._id(), self._id()
            if orm:
                with Session(engine) as s:
                    s.add(MNote(id=before, practice_id=practice, body=None))
                    s.flush()
                    sp = s.begin_nested()
                    s.add(MNote(id=gone, practice_id=practice, body=first))
                    s.flush()
                    sp.rollback()
                    s.add(MNote(id=kept, practice_id=practice, body=second))
                    s.commit()
            else:
                with engine.begin() as conn:
                    conn.execute(notes.insert(), {"id": before, "practice_id": practice})
                    sp = conn.begin_nested()
                    conn.execute(
                        notes.insert(), {"id": gone, "practice_id": practice, "body": first}
                    )
                    sp.rollback()
                    conn.execute(
                        notes.insert(), {"id": kept, "practice_id": practice, "body": second}
                    )
            self.model[before] = (practice, None, None)
            self.model[kept] = (practice, second, None)
            self._created(practice)

        # -- the practice on a parent row ------------------------------------------------

        @rule(
            patient=st.sampled_from(PATIENTS),
            text=texts,
            how=st.sampled_from(["orm", "core", "core_own_scope", "core_other_scope"]),
        )
        def consult_add(self, patient: int, text: str | None, how: str) -> None:
            cid = self._id()
            practice = self.patients[patient]
            other = next(p for p in PRACTICES if p != practice)
            row = {"id": cid, "patient_id": patient, "comment": text}

            def add() -> None:
                if how == "orm":
                    with Session(engine) as s:
                        s.add(MConsult(**row))
                        s.commit()
                    return
                scoped = {"core": None, "core_own_scope": practice, "core_other_scope": other}[how]
                with engine.begin() as conn:
                    if scoped is None:
                        conn.execute(consults.insert(), row)
                    else:
                        with carnet.tenant_scope(scoped):
                            conn.execute(consults.insert(), row)

            if text is not None and how == "core_other_scope":
                self._refused(add, TenantMismatch)
            elif text is not None and not self._writes(practice):
                self._refused(add, KeyDestroyed)
            else:
                add()
                self.consults[cid] = (patient, text)
                if text is not None:
                    self._created(practice)

        def _live_consults(self) -> list[int]:
            return sorted(
                c for c, (p, _) in self.consults.items() if self.patients[p] not in self.destroyed
            )

        @precondition(lambda self: self._live_consults())
        @rule(
            data=st.data(),
            patient=st.sampled_from(PATIENTS),
            how=st.sampled_from(["foreign_key", "relationship", "load_only"]),
        )
        def consult_move(self, data: st.DataObject, patient: int, how: str) -> None:
            cid = data.draw(st.sampled_from(self._live_consults()))
            _, text = self.consults[cid]
            new = self.patients[patient]

            def move() -> None:
                with Session(engine) as s:
                    if how == "load_only":
                        c = s.scalars(
                            sa.select(MConsult)
                            .options(load_only(MConsult.id))
                            .where(MConsult.id == cid)
                        ).one()
                    else:
                        c = s.get(MConsult, cid)  # type: ignore[assignment]
                    assert c is not None
                    if how == "relationship":
                        c.patient = s.get(MPatient, patient)  # type: ignore[assignment]
                    else:
                        c.patient_id = patient
                    s.commit()

            if text is not None and not self._writes(new):
                self._refused(move, KeyDestroyed)
                return
            move()
            self.consults[cid] = (patient, text)
            if text is not None:
                self._created(new)

        @precondition(lambda self: self._live_consults())
        @rule(data=st.data(), text=texts)
        def consult_edit(self, data: st.DataObject, text: str | None) -> None:
            cid = data.draw(st.sampled_from(self._live_consults()))
            patient, _ = self.consults[cid]
            with Session(engine) as s:
                c = s.get(MConsult, cid)
                assert c is not None
                c.comment = text
                s.commit()
            self.consults[cid] = (patient, text)

        @rule(patient=st.sampled_from(PATIENTS), new=practices, orm=st.booleans())
        def patient_changes_practice(self, patient: int, new: str, orm: bool) -> None:
            def change() -> None:
                if orm:
                    with Session(engine) as s:
                        p = s.get(MPatient, patient)
                        assert p is not None
                        p.practice_id = new
                        s.commit()
                else:
                    with engine.begin() as conn:
                        conn.execute(
                            MPatient.__table__.update()
                            .where(MPatient.id == patient)
                            .values(practice_id=new)
                        )

            held = any(p == patient and t is not None for p, t in self.consults.values())
            if held and new != self.patients[patient]:
                self._refused(change, UnsupportedOperation)
            else:
                change()
                self.patients[patient] = new

        # -- key lifecycle -------------------------------------------------------------

        @precondition(lambda self: self.keyed - self.destroyed)
        @rule(data=st.data())
        def rotate(self, data: st.DataObject) -> None:
            self.keys.rotate(data.draw(st.sampled_from(sorted(self.keyed - self.destroyed))))

        @precondition(lambda self: self.keyed - self.destroyed)
        @rule(data=st.data())
        def destroy(self, data: st.DataObject) -> None:
            practice = data.draw(st.sampled_from(sorted(self.keyed - self.destroyed)))
            self.keys.destroy(practice)
            self.destroyed.add(practice)

        @rule()
        def clear_cache(self) -> None:
            self.keys.clear_cache()

        @invariant()
        def stored_rows_keep_the_invariant(self) -> None:
            if not hasattr(self, "keys"):
                return
            checks[0] += 1
            problems = mismatches(
                engine, master_key_uri, self.model, self.destroyed, self.consults, self.patients
            )
            assert not problems, problems

    return TenantMachine


def test_tenant_invariant_model(engine: sa.Engine, master_key_uri: str) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    keys.close()
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(Practice.__table__.insert(), [{"id": p} for p in PRACTICES])
    checks = [0]
    machine = machine_for(engine, master_key_uri, checks)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            derandomize=not FUZZ,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
    # Reported by `make fuzz`; the assertion keeps the run honest.
    print(f"\nmodel steps checked on {engine.dialect.name}: {checks[0]}")
    assert checks[0] >= EXAMPLES
