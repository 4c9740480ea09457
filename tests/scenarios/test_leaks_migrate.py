"""Legacy notes reach no error, log line or CLI output, whatever the database says.

A migration handles legacy plaintext by definition: it reads it, and its
compare-and-set binds it as the old value. Three ways it used to escape:

- a Latin-1 legacy value (SQLite TEXT): pysqlite's error quotes it, and the
  CLI printed the driver's first line (``status``, ``migrate plan`` / ``run``);
- ``carnet.migrate`` as a library on an ordinary engine: the database's
  refusal (a column too narrow for the ciphertext, a trigger) came back as
  SQLAlchemy's error listing the parameters, or on PostgreSQL as the raw
  driver error of the bulk UPDATE;
- the same refusal through the CLI, as a traceback.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import carnet
from carnet.errors import DatabaseError
from carnet.migrate import resolve, run_migration
from support.lifecycleutil import fill_notes, run_cli
from support.paths import ROOT

EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

from legacy_practice.generate import populate  # noqa: E402

SECRET = "PLANTED-violences-conjugales-5b8"
MIGRATE = ["--table", "consultations", "--column", "comment", "--tenant", "patients.practice_id"]


def _everything(exc: BaseException) -> str:
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        parts += [str(e), repr(e), repr(e.args), repr(vars(e))]
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return "\n".join(parts)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("sqlalchemy.engine").setLevel(logging.INFO)
    try:
        yield caplog
    finally:
        logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)


# -- a Latin-1 legacy note, through the CLI ---------------------------------------------


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_latin1_legacy_note_stays_out_of_cli_output(
    engine: sa.Engine, db_url: str, master_key_uri: str
) -> None:
    populate(engine, seed=3, practices_n=2, patients_n=6, consultations_n=20)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE consultations SET comment = CAST(? AS TEXT) WHERE id = 5",
            ((SECRET + " d\u00e9pression s\u00e9v\u00e8re").encode("latin-1"),),
        )
    engine.dispose()
    runs = {
        "status": ["status"],
        "status --json": ["status", "--json"],
        "migrate plan": ["migrate", "plan", *MIGRATE],
        "migrate plan --json": ["migrate", "plan", *MIGRATE, "--json"],
        "migrate run": ["migrate", "run", *MIGRATE],
        "migrate run --json": ["migrate", "run", *MIGRATE, "--json"],
    }
    for name, args in runs.items():
        r = run_cli(args, db_url=db_url, master_key=master_key_uri)
        out = r.stdout + r.stderr
        assert r.returncode != 0, (name, out)
        assert SECRET not in out, (name, out)
        assert "Traceback" not in out, (name, out)
        assert "not valid UTF-8" in out, (name, out)


# -- a column too narrow for the ciphertext, as a library call --------------------------


def _narrow_table(engine: sa.Engine) -> sa.Table:
    t = sa.Table(
        "letters",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(20), nullable=False),
        sa.Column("comment", sa.String(120)),
    )
    t.create(engine)
    with engine.begin() as conn:
        conn.execute(
            t.insert(),
            [
                {"id": 1, "practice_id": "p1", "comment": "court"},
                # Fits as plaintext (90 characters), not once sealed (~130).
                {"id": 2, "practice_id": "p1", "comment": (SECRET + " " + "x" * 90)[:90]},
                {"id": 3, "practice_id": "p2", "comment": "court aussi"},
            ],
        )
    return t


def test_too_narrow_column_leaves_the_row_and_names_it(
    unconfigured_keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    _narrow_table(engine)
    logs.clear()  # the planting INSERT is logged
    target = resolve(engine, "letters", "comment", tenant="practice_id")
    result = run_migration(unconfigured_keys, engine, target, batch_size=10)
    assert result.problems == {"too_long": [[2]]}
    assert result.report.failed == [(2,)] and result.report.rewritten == 2
    with engine.connect() as conn:
        stored = dict(conn.execute(sa.text("SELECT id, comment FROM letters")).all())
    assert stored[2].startswith(SECRET)  # untouched, for the operator to widen the column
    assert stored[1].startswith("carnet:") and stored[3].startswith("carnet:")
    assert SECRET not in logs.text


# -- the database refuses the write, naming the value -----------------------------------

_REFUSE = {
    "postgresql": [
        "CREATE FUNCTION refuse_update() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'refused: %%', OLD.comment; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE UPDATE ON letters FOR EACH ROW "
        "EXECUTE FUNCTION refuse_update()",
    ],
    "mariadb": [
        "CREATE TRIGGER refuse BEFORE UPDATE ON letters FOR EACH ROW BEGIN "
        "DECLARE m VARCHAR(255); SET m = CONCAT('refused: ', OLD.comment); "
        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = m; END",
    ],
}


def _refusing_table(engine: sa.Engine, kind: str) -> None:
    t = _narrow_table(engine)
    with engine.begin() as conn:
        conn.execute(t.update().where(t.c.id == 2).values(comment=SECRET))
        for ddl in _REFUSE[kind]:
            conn.exec_driver_sql(ddl)


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"])
def test_refused_write_is_a_carnet_error_without_the_value(
    unconfigured_keys: carnet.KeyManager,
    engine: sa.Engine,
    db_kind: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    _refusing_table(engine, db_kind)
    logs.clear()
    target = resolve(engine, "letters", "comment", tenant="practice_id")
    with pytest.raises(DatabaseError) as ei:
        run_migration(unconfigured_keys, engine, target, batch_size=10)
    exc = ei.value
    assert exc.__cause__ is None and exc.__context__ is None
    assert SECRET not in _everything(exc)
    assert "letters.comment" in str(exc) and "[1] to [3]" in str(exc)
    assert (exc.table, exc.column, exc.pks) == ("letters", "comment", ((1,), (3,)))
    assert SECRET not in logs.text
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT comment FROM letters WHERE id = 2")).scalar() == SECRET


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"])
def test_refused_write_through_the_cli(
    engine: sa.Engine, db_url: str, master_key_uri: str, db_kind: str
) -> None:
    _refusing_table(engine, db_kind)
    engine.dispose()
    args = [
        "migrate",
        "run",
        "--table",
        "letters",
        "--column",
        "comment",
        "--tenant",
        "practice_id",
    ]
    for extra in ([], ["--json"]):
        r = run_cli([*args, *extra], db_url=db_url, master_key=master_key_uri)
        out = r.stdout + r.stderr
        assert r.returncode == 4, out  # a database error, as in every command
        assert SECRET not in out and "Traceback" not in out, out
        assert "letters.comment" in out, out


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_latin1_legacy_note_through_the_library(
    unconfigured_keys: carnet.KeyManager, engine: sa.Engine, logs: pytest.LogCaptureFixture
) -> None:
    t = _narrow_table(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE letters SET comment = CAST(? AS TEXT) WHERE id = 3",
            ((SECRET + " r\u00e9sum\u00e9").encode("latin-1"),),
        )
    logs.clear()
    target = resolve(engine, t.name, "comment", tenant="practice_id")
    for call in (
        lambda: run_migration(unconfigured_keys, engine, target, batch_size=10),
        lambda: carnet.migrate.build_plan(unconfigured_keys, engine, target),
        lambda: carnet.migrate.verify(unconfigured_keys, engine, target),
    ):
        with pytest.raises(DatabaseError) as ei:
            call()
        assert ei.value.__cause__ is None and ei.value.__context__ is None
        assert SECRET not in _everything(ei.value)
        assert "not valid UTF-8" in str(ei.value)
    assert SECRET not in logs.text


# -- the same boundary under re-encryption, through the main CLI -------------------------

_REFUSE_NOTES = {
    "postgresql": [
        "CREATE FUNCTION refuse_notes() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'refused row of %%', OLD.practice_id; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse BEFORE UPDATE ON notes FOR EACH ROW EXECUTE FUNCTION refuse_notes()",
    ],
    "mariadb": [
        "CREATE TRIGGER refuse BEFORE UPDATE ON notes FOR EACH ROW BEGIN "
        "DECLARE m VARCHAR(255); SET m = CONCAT('refused row of ', OLD.practice_id); "
        "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = m; END",
    ],
}


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"])
def test_reencrypt_refused_by_the_database_is_one_line_exit_4(
    unconfigured_keys: carnet.KeyManager,
    engine: sa.Engine,
    db_url: str,
    master_key_uri: str,
    db_kind: str,
) -> None:

    fill_notes(engine, unconfigured_keys, 12)
    r = run_cli(["keys", "rotate", "--all"], db_url=db_url, master_key=master_key_uri)
    assert r.returncode == 0, r.stderr
    with engine.begin() as conn:
        for ddl in _REFUSE_NOTES[db_kind]:
            conn.exec_driver_sql(ddl)
    engine.dispose()
    r = run_cli(
        ["reencrypt", "--table", "notes", "--column", "body"],
        db_url=db_url,
        master_key=master_key_uri,
    )
    assert r.returncode == 4, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("carnet: error: notes.body: database error"), r.stderr
    assert "refused row of" not in r.stderr  # the trigger's text, which could quote a value
