"""The tenant invariant, checked from the stored rows with a brand-new KeyManager.

    After any commit, every non-NULL encrypted value opens under its own row's
    practice and label and yields the text last written; or its practice was
    destroyed and it raises KeyDestroyed.

Used in-process by the model-based test after every step, and as a script
from a fresh process (no cache, no state of the test's process)::

    python tests/support/invariant.py DB_URL MASTER_KEY_URI EXPECTED.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping

import sqlalchemy as sa

# A note as the model expects it: (practice, body, summary); None texts are NULL.
Expected = Mapping[int, tuple[str, str | None, str | None]]

TABLE = "mt_notes"
COLUMNS = (("body", "binary"), ("summary", "text"))


# Consultations whose practice is their patient's: id -> (patient id, comment).
Consults = Mapping[int, tuple[int, "str | None"]]


def mismatches(
    engine: sa.Engine,
    master_key_uri: str,
    expected: Expected,
    destroyed: set[str],
    consults: Consults | None = None,
    patients: Mapping[int, str] | None = None,
) -> list[str]:
    """Every way the stored rows break the invariant (ids and labels only, never texts)."""
    import carnet
    from carnet import envelope
    from carnet.errors import KeyDestroyed

    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    problems: list[str] = []
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(f"SELECT id, practice_id, body, summary FROM {TABLE}")  # noqa: S608
            ).all()
        found = {r.id: r for r in rows}
        if set(found) != set(expected):
            problems.append(f"rows {sorted(found)} != expected {sorted(expected)}")
        for nid, (practice, *texts) in expected.items():
            r = found.get(nid)
            if r is None:
                continue
            if r.practice_id != practice:
                problems.append(f"row {nid}: practice {r.practice_id!r} != {practice!r}")
                continue
            for (col, storage), want in zip(COLUMNS, texts, strict=True):
                raw = getattr(r, col)
                label = f"{TABLE}.{col}"
                if want is None:
                    if raw is not None:
                        problems.append(f"row {nid}: {col} should be NULL")
                    continue
                if raw is None:
                    problems.append(f"row {nid}: {col} is NULL")
                    continue
                blob = envelope.from_text(raw) if storage == "text" else bytes(raw)
                try:
                    got = keys.decrypt(blob, tenant=practice, label=label).decode("utf-8")
                except KeyDestroyed:
                    if practice not in destroyed:
                        problems.append(f"row {nid}: {col} raises KeyDestroyed")
                    continue
                except Exception as exc:  # noqa: BLE001 - report every failure kind
                    problems.append(f"row {nid}: {col} does not open: {type(exc).__name__}")
                    continue
                if practice in destroyed:
                    problems.append(f"row {nid}: {col} opens although {practice!r} was destroyed")
                elif got != want:
                    problems.append(f"row {nid}: {col} holds another text")
        if consults is not None and patients is not None:
            problems += _consult_mismatches(engine, keys, consults, patients, destroyed)
    finally:
        keys.close()
    return problems


def _consult_mismatches(
    engine: sa.Engine,
    keys: object,
    consults: Consults,
    patients: Mapping[int, str],
    destroyed: set[str],
) -> list[str]:
    from carnet.errors import KeyDestroyed

    problems: list[str] = []
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT c.id, c.patient_id, p.practice_id, c.comment FROM mt_consults c "
                "JOIN mt_patients p ON p.id = c.patient_id"
            )
        ).all()
        stored_patients = dict(
            conn.execute(sa.text("SELECT id, practice_id FROM mt_patients")).all()
        )
    if stored_patients != dict(patients):
        problems.append("patients' practices differ from the model")
    found = {r.id: r for r in rows}
    if set(found) != set(consults):
        problems.append(f"consults {sorted(found)} != expected {sorted(consults)}")
    for cid, (patient, want) in consults.items():
        r = found.get(cid)
        if r is None:
            continue
        if r.patient_id != patient:
            problems.append(f"consult {cid}: patient {r.patient_id} != {patient}")
            continue
        practice = r.practice_id
        if want is None or r.comment is None:
            if (want is None) != (r.comment is None):
                problems.append(f"consult {cid}: NULL mismatch")
            continue
        try:
            got = keys.decrypt(  # type: ignore[attr-defined]
                bytes(r.comment), tenant=practice, label="mt_consults.comment"
            ).decode("utf-8")
        except KeyDestroyed:
            if practice not in destroyed:
                problems.append(f"consult {cid}: raises KeyDestroyed")
            continue
        except Exception as exc:  # noqa: BLE001 - report every failure kind
            problems.append(f"consult {cid}: does not open: {type(exc).__name__}")
            continue
        if practice in destroyed:
            problems.append(f"consult {cid}: opens although {practice!r} was destroyed")
        elif got != want:
            problems.append(f"consult {cid}: holds another text")
    return problems


def main(argv: list[str]) -> int:
    url, master, path = argv
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    expected = {int(k): tuple(v) for k, v in data["expected"].items()}
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        consults = {int(k): (v[0], v[1]) for k, v in data.get("consults", {}).items()}
        patients = {int(k): v for k, v in data.get("patients", {}).items()}
        problems = mismatches(
            engine,
            master,
            expected,  # type: ignore[arg-type]
            set(data["destroyed"]),
            consults if patients else None,
            patients or None,
        )
    finally:
        engine.dispose()
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, "src")
    raise SystemExit(main(sys.argv[1:]))
