"""Model-based test of the tenant invariant on SQLite, PostgreSQL and MariaDB.

Random sequences of ORM adds, edits and practice changes (a form posting the
same text back, merge, values not loaded, deferred or expired, a change through
a relationship), ORM bulk and criteria statements, Core writes with and
without a scope, savepoints rolled back, key rotation, crypto-shredding and
cache clears; and raw writes that skip carnet's Python guard (``exec_driver_sql``,
a DBAPI cursor, statements on tables declared without carnet's types), which
only the database's checks (carnet.dbchecks) can refuse. After every step
the stored rows are checked against an in-memory model with a brand-new
KeyManager (tests/support/invariant.py); after every example, again from a
brand-new process. Raw steps are counted per rule and outcome (accepted, or
refused by which check), printed with ``-s`` and written to raw-steps.json in
the test's temporary directory.

CI runs a bounded, derandomized number of examples per backend;
``make fuzz`` (CARNET_FUZZ_EXAMPLES) runs many more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, settings
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
from carnet import dbchecks
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
# The raw writers below add 7 rules to 17: a few more steps per example keep
# the other rules about as busy as before, for ~+20-30 % of CI's runtime.
STEPS = 30 if FUZZ else 21

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

# The same tables declared again, without carnet's types: statements built on
# them carry no encrypted column and no practice for carnet's guard to see.
# They are compiled and sent with ``exec_driver_sql`` or on a DBAPI cursor.
_plain = sa.MetaData()
plain_notes = sa.Table(
    "mt_notes",
    _plain,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("practice_id", sa.String(64)),
    sa.Column("body", sa.LargeBinary),
    sa.Column("summary", sa.Text),
)
plain_consults = sa.Table(
    "mt_consults",
    _plain,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("patient_id", sa.Integer),
    sa.Column("comment", sa.LargeBinary),
)
plain_patients = sa.Table(
    "mt_patients",
    _plain,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("practice_id", sa.String(64)),
)
# How a raw write reaches the database, skipping carnet's Python guard.
CHANNELS = ["exec_driver_sql", "dbapi_cursor", "plain_table_driver", "plain_table_cursor"]
channels = st.sampled_from(CHANNELS)
# Plaintext that does not begin like a carnet value (no header is ever forged).
plaintexts = st.text(min_size=1, max_size=60).filter(
    lambda t: not t.startswith(("\x01", "\x02", "carnet:"))
)
# (backend, rule, channel, outcome) -> steps; outcome "accepted" or "refused:<check>".
RAW_STEPS: Counter[tuple[str, str, str, str]] = Counter()
# The binary encrypted columns, (table, column): a value is copied only between
# columns of the same storage (``mt_notes.summary`` is the one text column).
BINARY = [("mt_notes", "body"), ("mt_consults", "comment")]

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

        # -- raw writes: past carnet's Python guard, only the database refuses ------------
        #
        # Each step runs one write through ``exec_driver_sql``, a DBAPI cursor, or
        # a statement built on the plain tables above (compiled, then sent by
        # either). Refused by one of carnet's checks: the model is unchanged.
        # Accepted: the model takes what the row now holds, and the invariant
        # check after the step says whether the database let the invariant break.

        def _raw(
            self,
            rule: str,
            channel: str,
            sql: str,
            params: tuple[Any, ...],
            stmt: sa.Executable,
        ) -> bool:
            """Run one raw write; True when the database accepted it."""
            dialect = engine.dialect
            args: Any = params
            if channel.startswith("plain_table"):
                compiled = stmt.compile(dialect=dialect)
                sql = str(compiled)
                if compiled.positional:
                    args = tuple(compiled.params[k] for k in compiled.positiontup or ())
                else:
                    args = dict(compiled.params)
            elif dialect.paramstyle in ("format", "pyformat"):
                sql = sql.replace("?", "%s")
            refused: str | None = None
            if channel in ("exec_driver_sql", "plain_table_driver"):
                with engine.connect() as conn:
                    try:
                        conn.exec_driver_sql(sql, args)
                        conn.commit()
                    except CarnetError as exc:
                        conn.rollback()
                        refused = getattr(exc, "constraint", None)
                        if refused is None:
                            raise
            else:
                raw = engine.raw_connection()
                try:
                    cur = raw.cursor()
                    try:
                        cur.execute(sql, args)
                        raw.commit()
                    except dialect.loaded_dbapi.Error as exc:
                        raw.rollback()
                        refused = dbchecks.check_of(exc)
                        if refused is None:
                            raise
                    finally:
                        cur.close()
                finally:
                    raw.close()
            outcome = "accepted" if refused is None else "refused:" + refused.split("_")[1]
            RAW_STEPS[(engine.dialect.name, rule, channel, outcome)] += 1
            event(f"{rule}: {outcome}")
            return refused is None

        def _cells(self, storage: str) -> list[tuple[str, int, str]]:
            """Every stored encrypted cell of a storage: (table, row id, column)."""
            if storage == "text":
                return [("mt_notes", n, "summary") for n in sorted(self.model)]
            return [("mt_notes", n, "body") for n in sorted(self.model)] + [
                ("mt_consults", c, "comment") for c in sorted(self.consults)
            ]

        def _practice_of(self, table: str, rid: int) -> str:
            if table == "mt_notes":
                return self.model[rid][0]
            return self.patients[self.consults[rid][0]]

        def _text_of(self, table: str, rid: int, col: str) -> str | None:
            if table == "mt_consults":
                return self.consults[rid][1]
            _, body, summary = self.model[rid]
            return body if col == "body" else summary

        def _set(self, table: str, rid: int, col: str, text: str | None) -> None:
            if table == "mt_consults":
                self.consults[rid] = (self.consults[rid][0], text)
                return
            p, body, summary = self.model[rid]
            self.model[rid] = (p, text, summary) if col == "body" else (p, body, text)

        @staticmethod
        def _copy_kind(text: str | None, source: str, target: str) -> str:
            if text is None:
                return "null"
            return "same_practice" if source == target else "other_practice"

        def _copy(
            self,
            data: st.DataObject,
            rule: str,
            channel: str,
            source: tuple[str, int, str],
            targets: list[tuple[str, str]],
            how: str,
        ) -> None:
            src_table, sid, src_col = source
            tgt_table, tgt_col = data.draw(st.sampled_from(targets))
            text = self._text_of(*source)
            practice = self._practice_of(src_table, sid)
            src = _plain.tables[src_table]
            tgt = _plain.tables[tgt_table]
            inner = sa.select(src.c[src_col].label("v")).where(src.c.id == sid).subquery("s")
            if how == "update":
                rows = sorted(self.model) if tgt_table == "mt_notes" else sorted(self.consults)
                rows = [r for r in rows if (tgt_table, r) != (src_table, sid)]
                if not rows:
                    return
                # Half the time a row of the source's own practice: what may be accepted.
                same = [r for r in rows if self._practice_of(tgt_table, r) == practice]
                tid = data.draw(
                    st.sampled_from(same if same and data.draw(st.booleans()) else rows)
                )
                sql = (
                    f"UPDATE {tgt_table} SET {tgt_col} = (SELECT v FROM "  # noqa: S608
                    f"(SELECT {src_col} AS v FROM {src_table} WHERE id = ?) s) WHERE id = ?"
                )
                stmt = (
                    tgt.update()
                    .where(tgt.c.id == tid)
                    .values({tgt_col: sa.select(inner.c.v).scalar_subquery()})
                )
                kind = self._copy_kind(text, practice, self._practice_of(tgt_table, tid))
                if self._raw(f"{rule}_update_{kind}", channel, sql, (sid, tid), stmt):
                    self._set(tgt_table, tid, tgt_col, text)
                return
            # INSERT ... SELECT: a new row, of the source's practice half the time.
            tid = self._id()
            if tgt_table == "mt_notes":
                owner_col = "practice_id"
                owner: Any = data.draw(st.sampled_from([practice, *PRACTICES]))
                literal = f"'{owner}'"
            else:
                owner_col = "patient_id"
                mine = [p for p, t in self.patients.items() if t == practice]
                owner = data.draw(st.sampled_from(mine + PATIENTS if mine else PATIENTS))
                literal = str(owner)
            sql = (
                f"INSERT INTO {tgt_table} (id, {owner_col}, {tgt_col}) "  # noqa: S608
                f"SELECT {tid}, {literal}, {src_col} FROM {src_table} WHERE id = ?"
            )
            stmt = tgt.insert().from_select(
                ["id", owner_col, tgt_col],
                sa.select(
                    sa.literal_column(str(tid)),
                    sa.literal_column(literal),
                    src.c[src_col],
                ).where(src.c.id == sid),
            )
            to = owner if tgt_table == "mt_notes" else self.patients[owner]
            kind = self._copy_kind(text, practice, to)
            if self._raw(f"{rule}_insert_select_{kind}", channel, sql, (sid,), stmt):
                if tgt_table == "mt_notes":
                    self.model[tid] = (owner, None, None)
                else:
                    self.consults[tid] = (owner, None)
                self._set(tgt_table, tid, tgt_col, text)

        @precondition(lambda self: self.model or self.consults)
        @rule(
            data=st.data(),
            channel=channels,
            storage=st.sampled_from(["binary", "text"]),
            how=st.sampled_from(["update", "insert_select"]),
        )
        def raw_copy(self, data: st.DataObject, channel: str, storage: str, how: str) -> None:
            """A real stored value copied into another row of the same column."""
            cells = self._cells(storage)
            if not cells:
                return
            source = data.draw(st.sampled_from(cells))
            self._copy(data, "raw_copy", channel, source, [source[::2]], how)

        @precondition(lambda self: self.model and self.consults)
        @rule(data=st.data(), channel=channels, how=st.sampled_from(["update", "insert_select"]))
        def raw_copy_to_another_column(self, data: st.DataObject, channel: str, how: str) -> None:
            """A real stored value copied into a column of another label, same storage."""
            source = data.draw(st.sampled_from(self._cells("binary")))
            targets = [c for c in BINARY if c != source[::2]]
            self._copy(data, "raw_copy_to_another_column", channel, source, targets, how)

        @precondition(lambda self: self.model)
        @rule(
            data=st.data(),
            channel=channels,
            new=practices,
            how=st.sampled_from(["update", "upsert"]),
        )
        def raw_move(self, data: st.DataObject, channel: str, new: str, how: str) -> None:
            """A note's practice changed alone: UPDATE, or an upsert updating only it."""
            nid = data.draw(st.sampled_from(sorted(self.model)))
            _, body, summary = self.model[nid]
            t = plain_notes
            if how == "update":
                sql = "UPDATE mt_notes SET practice_id = ? WHERE id = ?"
                params: tuple[Any, ...] = (new, nid)
                stmt: sa.Executable = t.update().where(t.c.id == nid).values(practice_id=new)
            elif engine.dialect.name in ("mysql", "mariadb"):
                from sqlalchemy.dialects import mysql

                sql = (
                    "INSERT INTO mt_notes (id, practice_id) VALUES (?, ?) "
                    "ON DUPLICATE KEY UPDATE practice_id = VALUES(practice_id)"
                )
                params = (nid, new)
                ins = mysql.insert(t).values(id=nid, practice_id=new)
                stmt = ins.on_duplicate_key_update(practice_id=ins.inserted.practice_id)
            else:
                from sqlalchemy.dialects import postgresql, sqlite

                sql = (
                    "INSERT INTO mt_notes (id, practice_id) VALUES (?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET practice_id = excluded.practice_id"
                )
                params = (nid, new)
                ins = (postgresql if engine.dialect.name == "postgresql" else sqlite).insert(t)
                ins = ins.values(id=nid, practice_id=new)
                stmt = ins.on_conflict_do_update(
                    index_elements=["id"], set_={"practice_id": ins.excluded.practice_id}
                )
            held = new != self.model[nid][0] and (body is not None or summary is not None)
            kind = "holding_values" if held else "free"
            if self._raw(f"raw_move_{how}_{kind}", channel, sql, params, stmt):
                self.model[nid] = (new, body, summary)

        @rule(
            data=st.data(),
            channel=channels,
            cell=st.sampled_from([("mt_notes", "body"), ("mt_notes", "summary"), *BINARY[1:]]),
            how=st.sampled_from(["update", "insert"]),
            text=st.one_of(st.none(), plaintexts),
        )
        def raw_plaintext(
            self,
            data: st.DataObject,
            channel: str,
            cell: tuple[str, str],
            how: str,
            text: str | None,
        ) -> None:
            """Plaintext (or NULL) written into an encrypted column."""
            table, col = cell
            t = _plain.tables[table]
            value = None if text is None else text if col == "summary" else text.encode()
            if how == "update":
                rows = sorted(self.model) if table == "mt_notes" else sorted(self.consults)
                if not rows:
                    return
                rid = data.draw(st.sampled_from(rows))
                sql = f"UPDATE {table} SET {col} = ? WHERE id = ?"  # noqa: S608
                stmt: sa.Executable = t.update().where(t.c.id == rid).values({col: value})
                kind = "null" if text is None else "text"
                if self._raw(f"raw_plaintext_update_{kind}", channel, sql, (value, rid), stmt):
                    self._set(table, rid, col, text)
                return
            rid = self._id()
            if table == "mt_notes":
                owner_col, owner = "practice_id", data.draw(practices)
            else:
                owner_col, owner = "patient_id", data.draw(st.sampled_from(PATIENTS))
            sql = f"INSERT INTO {table} (id, {owner_col}, {col}) VALUES (?, ?, ?)"  # noqa: S608
            stmt = t.insert().values({"id": rid, owner_col: owner, col: value})
            kind = "null" if text is None else "text"
            if self._raw(f"raw_plaintext_insert_{kind}", channel, sql, (rid, owner, value), stmt):
                if table == "mt_notes":
                    self.model[rid] = (owner, None, None)
                else:
                    self.consults[rid] = (owner, None)
                self._set(table, rid, col, text)

        @rule(channel=channels, patient=st.sampled_from(PATIENTS), new=practices)
        def raw_patient_move(self, channel: str, patient: int, new: str) -> None:
            """A parent row's practice changed, whether or not children hold values."""
            t = plain_patients
            sql = "UPDATE mt_patients SET practice_id = ? WHERE id = ?"
            stmt = t.update().where(t.c.id == patient).values(practice_id=new)
            held = new != self.patients[patient] and any(
                p == patient and t is not None for p, t in self.consults.values()
            )
            kind = "holding_values" if held else "free"
            if self._raw(f"raw_patient_move_{kind}", channel, sql, (new, patient), stmt):
                self.patients[patient] = new

        @precondition(lambda self: self.consults)
        @rule(data=st.data(), channel=channels, patient=st.sampled_from(PATIENTS))
        def raw_consult_move(self, data: st.DataObject, channel: str, patient: int) -> None:
            """A child row moved to another parent (of another practice, or the same)."""
            cid = data.draw(st.sampled_from(sorted(self.consults)))
            t = plain_consults
            sql = "UPDATE mt_consults SET patient_id = ? WHERE id = ?"
            stmt = t.update().where(t.c.id == cid).values(patient_id=patient)
            text = self.consults[cid][1]
            moved = text is not None and self.patients[patient] != self._practice_of(
                "mt_consults", cid
            )
            kind = "value_to_another_practice" if moved else "free"
            if self._raw(f"raw_consult_move_{kind}", channel, sql, (patient, cid), stmt):
                self.consults[cid] = (patient, self.consults[cid][1])

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


def test_tenant_invariant_model(engine: sa.Engine, master_key_uri: str, tmp_path: Path) -> None:
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
    _report_raw_steps(engine.dialect.name, tmp_path)
    assert checks[0] >= EXAMPLES


def _report_raw_steps(backend: str, tmp_path: Path) -> None:
    """Print the raw steps per rule and outcome, and write them to raw-steps.json."""
    mine = {k: v for k, v in RAW_STEPS.items() if k[0] == backend}
    by_rule: Counter[tuple[str, str]] = Counter()
    for (_, rule_name, _, outcome), n in mine.items():
        by_rule[(rule_name, outcome)] += n
    path = tmp_path / "raw-steps.json"
    path.write_text(
        json.dumps(
            [
                {"backend": b, "rule": r, "channel": c, "outcome": o, "steps": n}
                for (b, r, c, o), n in sorted(mine.items())
            ],
            indent=1,
        )
    )
    print(f"raw steps on {backend}: {sum(mine.values())} ({path})")
    for (rule_name, outcome), n in sorted(by_rule.items()):
        print(f"  {rule_name:52} {outcome:12} {n}")


def test_raw_copy_into_another_column_of_the_same_practice(
    engine: sa.Engine, master_key_uri: str
) -> None:
    """The smallest case of ``raw_copy_to_another_column`` above, always run.

    A real value of practice cab-lyon, sealed for ``mt_consults.comment``, is
    copied by raw SQL into ``mt_notes.body`` of a cab-lyon row. Its header
    names the right practice and a data key of it, so the practice and key
    checks pass; but it was sealed for another field label, so it no longer
    opens under its row's label. The database must refuse the copy, or the
    invariant must still hold after it.
    """
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    keys.create_schema()
    Base.metadata.create_all(engine)
    carnet.configure(keys)
    try:
        with Session(engine) as s:
            s.add_all([Practice(id=p) for p in PRACTICES])
            s.add(MPatient(id=1, practice_id="cab-lyon"))
            s.add(MNote(id=1, practice_id="cab-lyon", body="a note"))
            s.add(MConsult(id=2, patient_id=1, comment="a comment"))
            s.commit()
        expected = {1: ("cab-lyon", "a comment", None)}
        with engine.connect() as conn:
            try:
                conn.exec_driver_sql(
                    "UPDATE mt_notes SET body = (SELECT comment FROM mt_consults WHERE id = 2) "
                    "WHERE id = 1"
                )
                conn.commit()
            except CarnetError as exc:
                assert exc.constraint is not None  # type: ignore[attr-defined]
                expected = {1: ("cab-lyon", "a note", None)}
        problems = mismatches(
            engine, master_key_uri, expected, set(), {2: (1, "a comment")}, {1: "cab-lyon"}
        )
        assert not problems, problems
    finally:
        carnet.configure(None)
        keys.close()
