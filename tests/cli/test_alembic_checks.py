"""The database checks under Alembic: the carnet operations, autogenerate, batch mode, --sql.

Autogenerate runs through the real ``alembic`` command on each backend (the
Project of test_alembic_autogenerate); the operations run in-process on a
MigrationContext, as a migration's ``op`` does.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from test_alembic_autogenerate import Project, function_body

import carnet
import carnet.migrate.alembic  # noqa: F401 - registers op.carnet_install_checks
from carnet import dbchecks
from carnet.errors import ConfigurationError


def notes(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "notes",
        md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(64), nullable=False),
        sa.Column("body", carnet.EncryptedText(tenant="practice_id")),
        sa.Column(
            "summary",
            carnet.EncryptedText(tenant="practice_id", storage="text", label="notes.summary_v1"),
        ),
    )


def specs(engine: sa.Engine) -> list[dbchecks.ColumnSpec]:
    return dbchecks.specs_for(notes(sa.MetaData()), engine.dialect.name)


def missing(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [n for s in specs(engine) for n in dbchecks.missing(conn, s)]


def table_without_checks(engine: sa.Engine) -> None:
    """The notes table as it was before carnet had database checks."""
    notes(sa.MetaData()).create(engine)
    with engine.begin() as conn:
        dbchecks.drop(conn, specs(engine))
    assert missing(engine)


STRICT_ENV = (
    "compare_type=True,\n"
    "            autogenerate_plugins=['alembic.autogenerate.*', "
    "'alembic.autogenerate.checkconstraint_byname'],\n"
    "            "
)


def strict_comparison(project: Project) -> None:
    """env.py with compare_type and Alembic's opt-in CHECK constraint comparison on."""
    env = project.root / "migrations" / "env.py"
    text = env.read_text()
    hook = "**carnet.migrate.alembic.autogenerate_options("
    assert hook in text
    env.write_text(text.replace(hook, STRICT_ENV + hook, 1))


@pytest.mark.parametrize("strict", [False, True], ids=["default", "compare-checks"])
def test_autogenerate_proposes_the_checks_of_an_existing_table(
    db_url: str, tmp_path: Path, strict: bool
) -> None:
    engine = sa.create_engine(db_url)
    try:
        table_without_checks(engine)
        project = Project(tmp_path / "project", db_url)
        if strict:
            strict_comparison(project)
        script = project.autogenerate("checks")
        upgrade = function_body(script, "upgrade")
        assert (
            "op.carnet_install_checks('notes', 'body', practice='practice_id', "
            "storage='binary', mode='v2')" in upgrade
        ), script.read_text()
        assert (
            # The column's own label (not table.column): its values carry its tag.
            "op.carnet_install_checks('notes', 'summary', practice='practice_id', "
            "storage='text', mode='v2', label='notes.summary_v1')" in upgrade
        )
        source = script.read_text()
        assert "import carnet.migrate.alembic" in source
        # No dialect's DDL pasted into the migration: it is built at run time.
        for word in ("TRIGGER", "CHECK (", "ALTER TABLE", "carnet_f2_"):
            assert word not in source
        assert "op.carnet_drop_checks('notes', 'body'" in "\n".join(
            function_body(script, "downgrade")
        )
        assert not any("drop_constraint" in s or "drop_table" in s for s in upgrade)

        project.run("upgrade", "head")
        assert missing(engine) == []
        # Installed: the next autogenerate is empty, whichever comparison is on
        # (carnet's CHECK constraints are not in the models and are never dropped).
        again = project.autogenerate("again")
        assert function_body(again, "upgrade") == ["pass"], again.read_text()
        assert function_body(again, "downgrade") == ["pass"], again.read_text()

        project.run("downgrade", "-1")  # back to "checks": nothing changes
        project.run("downgrade", "base")
        with engine.connect() as conn:
            assert dbchecks.installed(conn, "notes") == set()
    finally:
        engine.dispose()


@pytest.mark.parametrize("strict", [False, True], ids=["default", "compare-checks"])
def test_create_table_in_a_migration_installs_the_checks(
    db_url: str, tmp_path: Path, strict: bool
) -> None:
    project = Project(tmp_path / "project", db_url)
    if strict:
        strict_comparison(project)
    script = project.autogenerate("first")
    upgrade = function_body(script, "upgrade")
    assert any(s.startswith("op.create_table('notes'") for s in upgrade)
    # op.create_table fires after_create: no separate operation is needed.
    assert not any("carnet_install_checks" in s for s in upgrade), script.read_text()
    project.run("upgrade", "head")
    engine = sa.create_engine(db_url)
    try:
        assert missing(engine) == []
        second = project.autogenerate("second")
        assert function_body(second, "upgrade") == ["pass"], second.read_text()
    finally:
        engine.dispose()


def test_the_operations_in_process_and_batch_mode(engine: sa.Engine) -> None:
    table_without_checks(engine)
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        for s in specs(engine):
            op.carnet_install_checks(  # type: ignore[attr-defined]
                "notes", s.column, practice="practice_id", storage=s.storage, mode="v2"
            )
    assert missing(engine) == []

    # Batch mode recreates the table on SQLite (and here everywhere, with
    # recreate="always"): its triggers go with the old table.
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        with op.batch_alter_table("notes", recreate="always") as b:
            b.add_column(sa.Column("extra", sa.Integer, nullable=True))
    if engine.dialect.name == "sqlite":
        assert missing(engine), "SQLite's batch mode kept the triggers?"
    # The documented step after the batch block puts them back.
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        for s in specs(engine):
            op.carnet_install_checks(  # type: ignore[attr-defined]
                "notes", s.column, practice="practice_id", storage=s.storage
            )
    assert missing(engine) == []
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        op.carnet_drop_checks("notes", "body", practice="practice_id")  # type: ignore[attr-defined]
    with engine.connect() as conn:
        assert not any("notes_body" in n for n in dbchecks.installed(conn, "notes"))


def test_mode_auto_reads_the_rows_at_run_time(engine: sa.Engine) -> None:
    table_without_checks(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO notes (id, practice_id, summary) VALUES (1, 'a', 'x')"))
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        with pytest.raises(ConfigurationError, match="carnet verify"):
            op.carnet_install_checks(  # type: ignore[attr-defined]
                "notes", "summary", practice="practice_id", storage="text", mode="auto"
            )


def test_a_parent_join(engine: sa.Engine) -> None:
    md = sa.MetaData()
    sa.Table(
        "patients",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("practice_id", sa.String(64), nullable=False),
    )
    sa.Table(
        "visits",
        md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("patient_id", sa.ForeignKey("patients.id"), nullable=False),
        sa.Column("body", sa.LargeBinary),
    )
    md.create_all(engine)
    with engine.begin() as conn:
        op = Operations(MigrationContext.configure(conn))
        op.carnet_install_checks(  # type: ignore[attr-defined]
            "visits", "body", parent=("patient_id", "patients", "id", "practice_id")
        )
    with engine.connect() as conn:
        got = dbchecks.installed(conn, "visits") | dbchecks.installed(conn, "patients")
    assert any(n.startswith("carnet_p_visits_body") for n in got)
    assert any(n.startswith("carnet_m_patients_visits_body") for n in got)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mariadb"])
def test_offline_sql_has_each_dialects_ddl(dialect: str) -> None:
    buf = io.StringIO()
    ctx = MigrationContext.configure(
        dialect_name=dialect, opts={"as_sql": True, "output_buffer": buf}
    )
    op = Operations(ctx)
    op.carnet_install_checks("notes", "body", practice="practice_id")  # type: ignore[attr-defined]
    sql = buf.getvalue()
    assert "carnet_f2_notes_body" in sql and "carnet_p_notes_body" in sql
    made = [ln for ln in sql.splitlines() if ln.startswith("CREATE") or " ADD CONSTRAINT " in ln]
    # The key check is left out: the key table cannot be looked up offline.
    assert made and not any("carnet_k_" in ln for ln in made)
    if dialect == "sqlite":
        assert "CREATE TRIGGER" in sql and "ADD CONSTRAINT" not in sql
    else:
        assert "ADD CONSTRAINT" in sql
