"""``carnet demo``: a small practice database on SQLite, end to end.

It needs nothing but the core package. It writes synthetic notes (see
:mod:`carnet._synthetic`: invented patients, fictional phone numbers) and the
patients' names, birth dates and phone numbers, all encrypted, then proves on
the raw database file that neither note text nor phone number is in it, reads
the notes back, finds a patient by phone through a blind index, rotates one
practice's data key and crypto-shreds another's.

What it prints never includes a note's text, except one example clearly
labelled as read back through carnet, and never more ciphertext than a short
hex prefix.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from . import _synthetic, transforms
from ._engines import make_engine
from .errors import ConfigurationError, KeyDestroyed
from .lookup import candidates, search
from .manager import KeyManager
from .planner import plan_bits
from .providers import create_master_key
from .types import BlindIndex, EncryptedDate, EncryptedString, EncryptedText, Sealed

__all__ = ["PROBE_LENGTH", "distinctive_probes", "note_probes", "run_demo", "scan_files"]

DB_NAME = "clinic.db"
KEY_NAME = "master.key"
# Long enough that a match is never chance (ciphertext is uniformly random
# bytes), short enough that a slice fits well inside one SQLite page.
PROBE_LENGTH = 40


# -- raw-file scanning ---------------------------------------------------------------------


def note_probes(text: str, length: int = PROBE_LENGTH, step: int = 16) -> list[bytes]:
    """Every ``length``-byte UTF-8 slice of ``text`` starting at a multiple of ``step``."""
    raw = text.encode("utf-8")
    if len(raw) <= length:
        return [raw]
    starts = [*range(0, len(raw) - length, step), len(raw) - length]
    return list(dict.fromkeys(raw[p : p + length] for p in starts))


def distinctive_probes(
    texts: Mapping[int, str], per_text: int = 3, length: int = PROBE_LENGTH
) -> dict[bytes, list[int]]:
    """Up to ``per_text`` slices of each text that no other text contains, spread along it.

    Unique slices keep the count honest: a template sentence shared by many
    notes would otherwise mark all of them found when one leaks. Several
    slices per note, so a value split across two database pages is still
    caught by the slices that do not straddle the split.
    """
    candidates = {tid: note_probes(text, length) for tid, text in texts.items()}
    seen: dict[bytes, int] = {}
    for probes in candidates.values():
        for probe in probes:
            seen[probe] = seen.get(probe, 0) + 1
    out: dict[bytes, list[int]] = {}
    for tid, probes in candidates.items():
        unique = [p for p in probes if seen[p] == 1]
        if not unique:  # a verbatim duplicate: it is found if any copy leaks
            unique = probes
        stride = max(1, len(unique) // per_text)
        for probe in unique[::stride][:per_text]:
            out.setdefault(probe, []).append(tid)
    return out


def scan_files(
    paths: Iterable[str | os.PathLike[str]], probes: Mapping[bytes, Sequence[int]]
) -> set[int]:
    """Ids of the items whose probes occur in any of the files' raw bytes.

    ``probes`` maps each probe to the ids of the items it belongs to. Every
    byte offset is checked (a sliding window per probe length), so a match
    does not depend on how the database aligns or delimits values.
    """
    by_length: dict[int, dict[bytes, Sequence[int]]] = {}
    for probe, ids in probes.items():
        if probe:
            by_length.setdefault(len(probe), {})[probe] = ids
    found: set[int] = set()
    for path in paths:
        data = Path(path).read_bytes()
        for length, table in by_length.items():
            get = table.get
            for i in range(len(data) - length + 1):
                hit = get(data[i : i + length])
                if hit is not None:
                    found.update(hit)
    return found


def _database_files(db_path: Path) -> list[Path]:
    # A write-ahead log or rollback journal can hold page images the main file no longer has.
    candidates = [db_path] + [db_path.with_name(db_path.name + s) for s in ("-wal", "-journal")]
    return [p for p in candidates if p.exists()]


# -- schema --------------------------------------------------------------------------------


def _models(
    manager: KeyManager, patients_per_practice: int
) -> tuple[type[Any], type[Any], type[Any], sa.MetaData]:
    # Declared per run, with the manager passed explicitly rather than through
    # carnet.configure(): a library function must not change process-wide state.
    # About two unrelated rows per phone lookup (docs/searchable.md, sizing).
    phone_bits = plan_bits(max(1, patients_per_practice), false_positives=2).bits

    class Base(DeclarativeBase):
        pass

    class Practice(Base):
        __tablename__ = "practices"
        id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
        name: Mapped[str] = mapped_column(sa.String(200))

    class Patient(Base):
        __tablename__ = "patients"
        id: Mapped[int] = mapped_column(primary_key=True)
        practice_id: Mapped[str] = mapped_column(sa.ForeignKey("practices.id"), index=True)
        first_name: Mapped[str] = mapped_column(
            EncryptedString(100, tenant="practice_id", manager=manager)
        )
        last_name: Mapped[str] = mapped_column(
            EncryptedString(100, tenant="practice_id", manager=manager)
        )
        birth_date: Mapped[dt.date] = mapped_column(
            EncryptedDate(tenant="practice_id", manager=manager)
        )
        phone: Mapped[str] = mapped_column(
            EncryptedString(32, tenant="practice_id", manager=manager)
        )
        phone_bidx = BlindIndex("phone", transform=transforms.phone_fr, bits=phone_bits)

    class Note(Base):
        __tablename__ = "notes"
        id: Mapped[int] = mapped_column(primary_key=True)
        practice_id: Mapped[str] = mapped_column(sa.ForeignKey("practices.id"), index=True)
        patient_id: Mapped[int] = mapped_column(sa.ForeignKey("patients.id"), index=True)
        written_at: Mapped[dt.date]
        author: Mapped[str] = mapped_column(sa.String(100))
        body: Mapped[str | None] = mapped_column(
            EncryptedText(tenant="practice_id", manager=manager)
        )

    return Practice, Patient, Note, Base.metadata


# -- the demo ------------------------------------------------------------------------------


def _prepare_directory(directory: str | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="carnet-demo-"))
    path = Path(directory).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    for name in (DB_NAME, KEY_NAME):
        if (path / name).exists():
            raise ConfigurationError(
                f"{path / name} already exists: give carnet demo an empty or new directory"
            )
    return path


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def run_demo(
    directory: str | None = None,
    echo: Callable[[str], None] = print,
    *,
    seed: int = 2026,
    practices: int = 5,
    patients: int = 1000,
) -> dict[str, Any]:
    """Build a small practice database in ``directory`` and walk through carnet's guarantees.

    ``directory`` defaults to a new temporary directory (printed). Returns the
    figures shown, for tests and scripts. Needs only the core package.
    """
    t_start = time.perf_counter()
    root = _prepare_directory(directory)
    db_path = root / DB_NAME
    key_uri = "file://" + str(root / KEY_NAME)
    echo(f"carnet demo in {root}")

    create_master_key(key_uri).close()
    echo(f"  master key: {root / KEY_NAME} (file master key, mode 600; outside the database)")

    engine = make_engine(f"sqlite:///{db_path}", batch=False)
    manager = KeyManager(engine, master_key=key_uri)
    try:
        return _walkthrough(
            engine,
            manager,
            db_path,
            echo,
            seed=seed,
            practices=practices,
            patients=patients,
            t_start=t_start,
            root=root,
        )
    finally:
        manager.close()
        engine.dispose()


def _walkthrough(
    engine: sa.Engine,
    manager: KeyManager,
    db_path: Path,
    echo: Callable[[str], None],
    *,
    seed: int,
    practices: int,
    patients: int,
    t_start: float,
    root: Path,
) -> dict[str, Any]:
    Practice, Patient, Note, metadata = _models(manager, patients // max(1, practices))
    manager.create_schema()
    metadata.create_all(engine)

    data = _synthetic.generate(seed, practices=practices, patients=patients)
    texts = {i + 1: n.text for i, n in enumerate(data.notes)}
    tenant_of = {i + 1: n.practice_id for i, n in enumerate(data.notes)}
    tenants = [p.id for p in data.practices]

    # -- write ---------------------------------------------------------------------------
    t0 = time.perf_counter()
    with Session(engine) as session:
        session.add_all(Practice(id=p.id, name=p.name) for p in data.practices)
        session.add_all(
            Patient(
                id=p.id,
                practice_id=p.practice_id,
                first_name=p.first_name,
                last_name=p.last_name,
                birth_date=p.birth_date,
                phone=p.phone,
            )
            for p in data.patients
        )
        session.add_all(
            Note(
                id=i + 1,
                practice_id=n.practice_id,
                patient_id=n.patient_id,
                written_at=n.written_at,
                author=n.author,
                body=n.text,
            )
            for i, n in enumerate(data.notes)
        )
        session.commit()
    insert_s = time.perf_counter() - t0
    n_notes = len(texts)
    echo(
        f"  wrote {len(tenants)} practices, {len(data.patients)} patients, {n_notes} notes "
        f"(synthetic French clinical notes) in {_fmt_s(insert_s)}"
    )
    echo(
        f"  data keys created: {manager.stats()['keys_created']} (one per practice); patients' "
        "names, birth dates and phone numbers encrypted too, phone numbers blind-indexed"
    )

    # -- what a thief holding the file would see -----------------------------------------
    notes_t = _table(Note)
    with engine.connect() as conn:
        sample = conn.execute(
            sa.select(notes_t.c.id, notes_t.c.body).order_by(notes_t.c.id).limit(1)
        ).one()
    sealed = sample.body
    assert isinstance(sealed, Sealed)  # noqa: S101 - read without a tenant: never plaintext
    echo(
        f"  note #{sample.id} as stored: {sealed.data[:12].hex()}… "
        f"({len(sealed.data)} bytes: version, key id, nonce, AES-GCM ciphertext + tag)"
    )

    engine.dispose()  # close every connection so the file on disk is complete
    note_found, phone_found, files = _scan(db_path, texts, data.patients)
    echo(
        f"  scanned the raw bytes of {', '.join(p.name for p in files)} for "
        f"{PROBE_LENGTH}-byte phrases found in one note only, three per note:"
    )
    echo(f"    {len(note_found)} of {n_notes} notes found in {DB_NAME}")
    echo(
        f"    {len(phone_found)} of {len(data.patients)} patients' phone numbers found "
        f"(encrypted, searchable only through the blind index)"
    )

    # -- read back -----------------------------------------------------------------------
    manager.clear_cache()
    manager.reset_stats()
    t0 = time.perf_counter()
    read_ok = _read_all(engine, Note, texts)
    read_cold_s = time.perf_counter() - t0
    cold_unwraps = manager.stats()["master_unwraps"]
    t0 = time.perf_counter()
    _read_all(engine, Note, texts)
    read_warm_s = time.perf_counter() - t0
    warm_unwraps = manager.stats()["master_unwraps"] - cold_unwraps
    echo(
        f"  read back {read_ok} of {n_notes} notes through the ORM, each equal to what was "
        f"written: cold cache {_fmt_s(read_cold_s)} ({cold_unwraps} master-key unwraps), "
        f"warm {_fmt_s(read_warm_s)} ({warm_unwraps} unwraps)"
    )
    with Session(engine) as session:
        example = session.get(Note, 1)
        assert example is not None and example.body is not None  # noqa: S101
        shown = example.body if len(example.body) <= 90 else example.body[:90] + "…"
        echo(f"  example, read back through carnet (synthetic note #1, {example.practice_id}):")
        echo(f"    « {shown} »")

    # -- find a patient by phone ---------------------------------------------------------
    found = _find_by_phone(engine, Patient, data.patients, echo)

    # -- rotation ------------------------------------------------------------------------
    rotated = tenants[0]
    before = [r.version for r in manager.list_keys(rotated)]
    new_rec = manager.rotate(rotated)
    rotated_ids = [i for i, t in tenant_of.items() if t == rotated]
    old_ok = _read_all(engine, Note, texts, practice=rotated)
    new_id = n_notes + 1
    new_text = _synthetic.generate(seed + 1, practices=1, patients=1).notes[0].text
    with Session(engine) as session:
        first_patient = next(p for p in data.patients if p.practice_id == rotated)
        session.add(
            Note(
                id=new_id,
                practice_id=rotated,
                patient_id=first_patient.id,
                written_at=dt.date(2026, 3, 2),
                author="Dr Demo",
                body=new_text,
            )
        )
        session.commit()
    texts[new_id] = new_text
    tenant_of[new_id] = rotated
    old_version = _version_of(engine, manager, Note, rotated_ids[0])
    new_version = _version_of(engine, manager, Note, new_id)
    echo(
        f"  rotated {rotated}'s data key: version {max(before)} -> {new_rec.version}; "
        f"its {old_ok} earlier notes still read (sealed under version {old_version}), "
        f"a new note is sealed under version {new_version}"
    )

    # -- crypto-shredding ----------------------------------------------------------------
    shredded = tenants[1] if len(tenants) > 1 else tenants[0]
    destroyed_keys = manager.destroy(shredded)
    shredded_ids = [i for i, t in tenant_of.items() if t == shredded]
    unreadable = 0
    with engine.connect() as conn:
        rows = conn.execute(sa.select(notes_t.c.body).where(notes_t.c.practice_id == shredded))
        for row in rows:
            try:
                row.body.open(shredded)
            except KeyDestroyed:
                unreadable += 1
    orm_error = ""
    with Session(engine) as session:
        try:
            session.get(Note, shredded_ids[0])
        except KeyDestroyed as exc:
            orm_error = type(exc).__name__
    others = [t for t in tenants if t != shredded]
    others_ok = sum(_read_all(engine, Note, texts, practice=t) for t in others)
    others_total = sum(1 for t in tenant_of.values() if t != shredded)
    echo(
        f"  destroyed {shredded}'s keys ({destroyed_keys}: data key, blind-index root): "
        f"{unreadable} of "
        f"{len(shredded_ids)} of its notes now raise KeyDestroyed "
        f"(through the ORM too: {orm_error or 'no error!'}); "
        f"the other practices' {others_ok} of {others_total} notes still read"
    )

    # -- last look at the file, after every write ------------------------------------------
    engine.dispose()
    final_found, _, _ = _scan(db_path, texts, [])
    stats = manager.stats()
    total_s = time.perf_counter() - t_start
    versions = {r.tenant: (r.version, r.state) for r in manager.list_keys()}
    echo(
        f"  final scan after rotation and shredding: {len(final_found)} of {len(texts)} notes "
        f"found in {DB_NAME}"
    )
    echo("summary:")
    echo(f"  practices {len(tenants)}, patients {len(data.patients)}, notes {len(texts)}")
    echo(
        "  key versions: "
        + ", ".join(
            f"{t} v{max(r.version for r in manager.list_keys(t))}"
            + (" (destroyed)" if t == shredded else "")
            for t in tenants
        )
    )
    echo(
        f"  master-key calls: {stats['master_unwraps']} unwraps, {stats['master_wraps']} wraps "
        f"(grow with practices and rotations, not with notes)"
    )
    echo(f"  total time {_fmt_s(total_s)}; files left in {root}")

    return {
        "directory": str(root),
        "database": str(db_path),
        "practices": len(tenants),
        "patients": len(data.patients),
        "notes": n_notes,
        "files_scanned": [str(p) for p in files],
        "notes_found_in_file": len(note_found),
        "phones_found_in_file": len(phone_found),
        **found,
        "notes_found_final": len(final_found),
        "notes_total_final": len(texts),
        "notes_read_back": read_ok,
        "cold_unwraps": cold_unwraps,
        "warm_unwraps": warm_unwraps,
        "rotated_practice": rotated,
        "rotated_version": new_rec.version,
        "old_notes_readable_after_rotation": old_ok,
        "old_notes_key_version": old_version,
        "new_note_key_version": new_version,
        "shredded_practice": shredded,
        "shredded_notes": len(shredded_ids),
        "shredded_unreadable": unreadable,
        "shredded_orm_error": orm_error,
        "other_notes": others_total,
        "other_notes_readable": others_ok,
        "key_versions": versions,
        "stats": stats,
        "timings": {
            "insert_s": insert_s,
            "read_cold_s": read_cold_s,
            "read_warm_s": read_warm_s,
            "total_s": total_s,
        },
    }


def _scan(
    db_path: Path, texts: Mapping[int, str], patients: Sequence[_synthetic.Patient]
) -> tuple[set[int], set[int], list[Path]]:
    files = _database_files(db_path)
    phone_probes: dict[bytes, list[int]] = {}
    for p in patients:
        phone_probes.setdefault(p.phone.encode("ascii"), []).append(p.id)
    return scan_files(files, distinctive_probes(texts)), scan_files(files, phone_probes), files


def _find_by_phone(
    engine: sa.Engine,
    patient_cls: Any,
    patients: Sequence[_synthetic.Patient],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    """Look a patient up by phone, spelt differently from how it was written."""
    target = patients[len(patients) // 2]
    digits = target.phone.replace(" ", "")
    typed = "+33 " + " ".join([digits[1]] + [digits[i : i + 2] for i in range(2, 10, 2)])
    expected = sorted(
        p.id for p in patients if p.practice_id == target.practice_id and p.phone == target.phone
    )
    with Session(engine) as session:
        cond, _ = candidates(patient_cls.phone_bidx, typed, tenant=target.practice_id)
        n_candidates = len(session.scalars(sa.select(patient_cls.id).where(cond)).all())
        t0 = time.perf_counter()
        hits = search(session, patient_cls.phone_bidx, typed, tenant=target.practice_id)
        lookup_s = time.perf_counter() - t0
        ids = sorted(p.id for p in hits)
    bits = patient_cls.__table__.c.phone_bidx.type.bits
    echo(
        f"  searched {target.practice_id} for the synthetic number {typed!r} (stored as "
        f"{target.phone!r}) through a {bits}-bit blind index: {n_candidates} candidate "
        f"row(s), {len(ids)} exact match(es) (patient #{', #'.join(map(str, ids))}) "
        f"in {_fmt_s(lookup_s)}"
    )
    return {
        "phone_lookup_ids": ids,
        "phone_lookup_expected": expected,
        "phone_lookup_candidates": n_candidates,
        "phone_lookup_s": lookup_s,
    }


def _read_all(
    engine: sa.Engine, note_cls: Any, texts: Mapping[int, str], practice: str | None = None
) -> int:
    """Notes read through the ORM that equal what was written."""
    q = sa.select(note_cls)
    if practice is not None:
        q = q.where(note_cls.practice_id == practice)
    with Session(engine) as session:
        return sum(1 for n in session.scalars(q) if n.body == texts.get(n.id))


def _table(note_cls: Any) -> sa.Table:
    # Core reads use the Table's own columns: a cached Core statement built from
    # ORM attributes makes SQLAlchemy compare the encrypted column with ``==``,
    # which EncryptedText refuses.
    table: sa.Table = note_cls.__table__
    return table


def _version_of(engine: sa.Engine, manager: KeyManager, note_cls: Any, note_id: int) -> int:
    t = _table(note_cls)
    with engine.connect() as conn:
        sealed = conn.execute(sa.select(t.c.body).where(t.c.id == note_id)).scalar_one()
    rec = manager.get_key(manager.key_id_of(sealed.data))
    return rec.version if rec is not None else 0
