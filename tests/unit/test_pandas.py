"""pandas on an encrypted column, on SQLite, PostgreSQL and MariaDB (docs/quickstart.md#pandas).

``read_sql`` of a selectable built from the model's table, through an
engine, decrypts inside a scope and yields ``Sealed`` outside one;
``to_sql`` with ``dtype={"body": EncryptedText(...)}`` seals each row under
its own practice; without ``dtype`` (or with a dtype that sends the text as
bytes) the database's checks refuse it, and nothing is ever stored in clear.
The quickstart's pandas blocks run here on every backend.
"""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import carnet
from carnet.errors import CarnetError, InvalidCiphertext, TenantMismatch
from support.models import Note
from support.paths import ROOT
from support.refusals import leaks

pd = pytest.importorskip("pandas")

SECRET = "Zq7-planted-note-pandas-dysthymie-5d1e"
LYON, NANTES = "cabinet-lyon-3", "cabinet-nantes"
NOTES = Note.__table__


def _stored(engine: sa.Engine) -> list[tuple[Any, ...]]:
    """Every notes row as stored, ciphertext as bytes or text."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT id, practice_id, body, summary FROM notes ORDER BY id")
        return [
            tuple(bytes(v) if isinstance(v, memoryview | bytearray) else v for v in r) for r in rows
        ]


def _in_clear(engine: sa.Engine, text: str) -> bool:
    # Stored as raw bytes (body) or carnet's text form (summary): neither holds the text.
    needle = text.encode()
    return any(
        needle in (v if isinstance(v, bytes) else str(v).encode())
        for row in _stored(engine)
        for v in row[2:]
        if v is not None
    )


def _bodies(engine: sa.Engine, tenant: str) -> list[str | None]:
    """The notes of one practice, opened by the ORM (a fresh session)."""
    with carnet.tenant_scope(tenant), Session(engine) as s:
        q = sa.select(Note).where(Note.practice_id == tenant).order_by(Note.id)
        return [n.body for n in s.scalars(q)]


def test_read_sql_through_an_engine(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    lyon = [f"{SECRET} {i}" for i in range(3)]
    with Session(engine) as s:
        s.add_all([Note(practice_id=LYON, body=b, summary=b) for b in lyon])
        s.add(Note(practice_id=NANTES, body="autre cabinet"))
        s.commit()
    query = (
        sa.select(NOTES.c.id, NOTES.c.body, NOTES.c.summary)
        .where(NOTES.c.practice_id == LYON)
        .order_by(NOTES.c.id)
    )
    with carnet.tenant_scope(LYON):
        df = pd.read_sql(query, engine)
    assert list(df["body"]) == lyon
    assert list(df["summary"]) == lyon  # text storage too

    sealed = pd.read_sql(query, engine)
    assert all(isinstance(v, carnet.Sealed) for v in sealed["body"])
    assert SECRET not in sealed.to_string() and SECRET not in repr(sealed)
    with carnet.tenant_scope(LYON):
        assert [v.open(LYON) for v in sealed["body"]] == lyon

    # Another practice's row does not open under the scope: refused, not shown.
    every = sa.select(NOTES.c.id, NOTES.c.body)
    with carnet.tenant_scope(NANTES), pytest.raises(TenantMismatch) as ei:
        pd.read_sql(every, engine)
    assert leaks(ei.value, (SECRET,)) == []

    # A table name or an SQL string bypasses carnet's types: ciphertext, never the note.
    for raw in (pd.read_sql("notes", engine), pd.read_sql("SELECT * FROM notes", engine)):
        assert len(raw) == 4
        assert SECRET not in raw.to_string()
        assert not any(isinstance(v, str) and SECRET in v for v in raw["summary"])
        assert not any(
            isinstance(v, bytes | memoryview) and SECRET.encode() in bytes(v) for v in raw["body"]
        )


def test_to_sql_with_an_encrypted_dtype(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    frame = pd.DataFrame(
        {
            "practice_id": [LYON, NANTES, LYON],
            "body": [f"{SECRET} a", f"{SECRET} b", None],
            "summary": [f"{SECRET} s", None, f"{SECRET} t"],
        }
    )
    dtype = {
        "body": carnet.EncryptedText(tenant="practice_id"),
        "summary": carnet.EncryptedText(tenant="practice_id", storage="text"),
    }
    # No scope: each row sealed under its own practice column, as a Core insert.
    frame.to_sql("notes", engine, if_exists="append", index=False, dtype=dtype)
    assert not _in_clear(engine, SECRET)
    assert _bodies(engine, LYON) == [f"{SECRET} a", None]
    assert _bodies(engine, NANTES) == [f"{SECRET} b"]
    with carnet.tenant_scope(LYON), Session(engine) as s:
        summaries = s.scalars(
            sa.select(Note.summary).where(Note.practice_id == LYON).order_by(Note.id)
        ).all()
    assert summaries == [f"{SECRET} s", f"{SECRET} t"]

    # Read back with pandas: the frame written is the frame read.
    with carnet.tenant_scope(LYON):
        back = pd.read_sql(
            sa.select(NOTES.c.body).where(NOTES.c.practice_id == LYON).order_by(NOTES.c.id), engine
        )
    assert [None if pd.isna(v) else v for v in back["body"]] == [f"{SECRET} a", None]

    # In a scope, a row of another practice is refused and nothing is written.
    before = _stored(engine)
    with carnet.tenant_scope(LYON), pytest.raises(TenantMismatch) as ei:
        frame.to_sql("notes", engine, if_exists="append", index=False, dtype=dtype)
    assert leaks(ei.value, (SECRET,)) == []
    assert _stored(engine) == before


@pytest.mark.parametrize("method", [None, "multi"])
def test_to_sql_without_dtype_is_refused(
    keys: carnet.KeyManager, engine: sa.Engine, method: str | None
) -> None:
    with Session(engine) as s:
        s.add(Note(practice_id=LYON, body="déjà là", summary="déjà là"))
        s.commit()
    before = _stored(engine)
    frames: list[tuple[Any, dict[str, Any] | None]] = [
        # pandas' own types: TEXT for a str column
        (pd.DataFrame({"practice_id": [LYON], "body": [SECRET]}), None),
        (pd.DataFrame({"practice_id": [LYON], "summary": [SECRET]}), None),
        # a dtype that sends the note as bytes into the binary column
        (
            pd.DataFrame({"practice_id": [LYON], "body": [SECRET.encode()]}),
            {"body": sa.LargeBinary},
        ),
        # a text that looks like carnet's prefix but is not ciphertext
        (pd.DataFrame({"practice_id": [LYON], "summary": ["carnet:" + SECRET]}), None),
    ]
    # As docs/quickstart.md advises: a database's own refusal (not carnet's)
    # would print the frame's values in its message otherwise.
    quiet = sa.create_engine(engine.url, hide_parameters=True)
    try:
        for df, dtype in frames:
            with pytest.raises(Exception) as ei:  # noqa: PT011 - which one is checked below
                df.to_sql(
                    "notes", quiet, if_exists="append", index=False, dtype=dtype, method=method
                )
            err = ei.value
            if isinstance(err, CarnetError):
                # carnet's database check refused it, and carnet named the check.
                assert isinstance(err, InvalidCiphertext), repr(err)
                assert err.constraint is not None
            else:
                # Only PostgreSQL refuses text in a BYTEA column by its type, before any check.
                assert engine.dialect.name == "postgresql", repr(err)
                assert dtype is None and "body" in df.columns
                assert any(type(e).__name__ == "DatatypeMismatch" for e in _chain(err)), repr(err)
            assert leaks(err, (SECRET,)) == []
            assert _stored(engine) == before
    finally:
        quiet.dispose()
    assert not _in_clear(engine, SECRET)


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and len(out) < 20:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _doc_block(marker: str) -> str:
    text = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    block = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    return block.strip().removeprefix("```python").removesuffix("```")


def test_quickstart_pandas_blocks(keys: carnet.KeyManager, engine: sa.Engine) -> None:
    with Session(engine) as s:
        s.add(Note(practice_id=LYON, body=SECRET))
        s.commit()
    ns: dict[str, Any] = {"Note": Note, "engine": engine}
    exec(compile(_doc_block("pandas"), "quickstart.md", "exec"), ns)  # noqa: S102
    assert list(ns["df"]["body"]) == [SECRET]
    exec(compile(_doc_block("pandas-to-sql"), "quickstart.md", "exec"), ns)  # noqa: S102
    refused = ns["refused"]
    assert isinstance(refused, InvalidCiphertext) or engine.dialect.name == "postgresql"
    assert _bodies(engine, LYON) == [SECRET, "Contrôle tensionnel, RAS"]
    assert not _in_clear(engine, "Contrôle tensionnel")
