"""Alembic autogenerate with EncryptedText models, and carnet's own tables under Alembic.

The main tests build a project the way a user does: ``alembic init``, a model
module, the one documented line in ``env.py``, then run the real ``alembic``
command (``revision --autogenerate``, ``upgrade head``) as a subprocess, on
each backend. The application then writes and reads notes through a
KeyManager that never called ``create_schema()``: Alembic made its tables.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Session

import carnet
from carnet import jobs
from carnet.migrate import alembic as carnet_alembic
from carnet.migrate import carnet_tables, state
from carnet.schema import carnet_metadata
from support.paths import ROOT
from support.schemas import old_keys_table

SRC = ROOT / "src"
ALEMBIC = str(Path(sys.executable).with_name("alembic"))
CARNET_TABLES = {"carnet_keys", "carnet_jobs", "carnet_migrations"}

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import carnet


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[str | None] = mapped_column(carnet.EncryptedText(tenant="practice_id"))
    summary: Mapped[str | None] = mapped_column(
        carnet.EncryptedText(tenant="practice_id", storage="text", label="notes.summary_v1")
    )
"""

HOOK = "**carnet.migrate.alembic.autogenerate_options({args})"


class Project:
    """An Alembic project in a temporary directory, driven through the real ``alembic`` CLI."""

    def __init__(self, root: Path, db_url: str, *, hook_args: str | None = "") -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.run("init", "migrations")
        (root / "models.py").write_text(MODELS)
        env = root / "migrations" / "env.py"
        text = env.read_text()
        text = text.replace(
            "target_metadata = None",
            "import carnet.migrate.alembic\nimport models\n\n"
            "target_metadata = models.Base.metadata",
        )
        online = "connection=connection, target_metadata=target_metadata\n"
        assert online in text, "Alembic's env.py template changed"
        if hook_args is not None:
            text = text.replace(
                online,
                "connection=connection, target_metadata=target_metadata,\n"
                f"            {HOOK.format(args=hook_args)}\n",
            )
        env.write_text(text)
        ini = root / "alembic.ini"
        # configparser interpolates '%': a URL-encoded password needs '%%'.
        ini.write_text(
            ini.read_text().replace(
                "driver://user:pass@localhost/dbname", db_url.replace("%", "%%")
            )
        )

    def run(self, *args: str) -> str:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(self.root)])
        proc = subprocess.run(
            [ALEMBIC, *args], cwd=self.root, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    def autogenerate(self, message: str) -> Path:
        self.run("revision", "--autogenerate", "-m", message)
        (path,) = (self.root / "migrations" / "versions").glob(f"*_{message}.py")
        return path


def function_body(script: Path, name: str) -> list[str]:
    """The statements of ``name()`` in a migration script (docstring left out), as source."""
    tree = ast.parse(script.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return [ast.unparse(stmt) for stmt in body]


def load_models(root: Path) -> ModuleType:
    # A module name of its own per project: each test's models are a new Base.
    spec = importlib.util.spec_from_file_location(f"alembic_models_{id(root)}", root / "models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def manager_cleanup() -> Iterator[list[carnet.KeyManager]]:
    made: list[carnet.KeyManager] = []
    yield made
    carnet.configure(None)
    for keys in made:
        keys.close()
        keys.engine.dispose()


def test_autogenerate_then_upgrade_twice_then_the_application_works(
    db_url: str, master_key_uri: str, tmp_path: Path, manager_cleanup: list[carnet.KeyManager]
) -> None:
    project = Project(tmp_path / "project", db_url)

    first = project.autogenerate("first")
    source = first.read_text()
    assert "\nimport carnet\n" in source
    assert "carnet.types" not in source
    assert "carnet.EncryptedText(tenant='practice_id')" in source
    assert (
        "carnet.EncryptedText(tenant='practice_id', label='notes.summary_v1', storage='text')"
        in source
    )
    upgrade = function_body(first, "upgrade")
    assert upgrade[0] == "carnet.migrate.alembic.upgrade_carnet_tables(op)"
    assert not any("drop_" in stmt for stmt in upgrade)
    # The downgrade leaves the key table alone, whatever the user runs.
    assert not any("carnet_" in stmt for stmt in function_body(first, "downgrade"))

    project.run("upgrade", "head")
    engine = sa.create_engine(db_url)
    try:
        assert {"notes", *CARNET_TABLES} <= set(sa.inspect(engine).get_table_names())

        second = project.autogenerate("second")
        # Empty: carnet's tables (present now, absent from the model) are neither
        # dropped nor altered, and EncryptedText compares equal to what it created.
        assert function_body(second, "upgrade") == ["pass"], second.read_text()
        project.run("upgrade", "head")

        # The application, with a KeyManager that never called create_schema().
        models = load_models(project.root)
        keys = carnet.KeyManager(engine, master_key=master_key_uri)
        manager_cleanup.append(keys)
        carnet.configure(keys)
        with Session(engine) as s:
            s.add_all(
                [
                    models.Note(
                        id=1,
                        practice_id="cabinet-a",
                        body="Patiente anxieuse",
                        summary="suivi mensuel",
                    ),
                    models.Note(
                        id=2, practice_id="cabinet-b", body="Douleurs lombaires", summary=None
                    ),
                ]
            )
            s.commit()
        with engine.connect() as conn:
            raw = conn.execute(sa.text("SELECT body, summary FROM notes WHERE id = 1")).one()
            n_keys = conn.execute(sa.text("SELECT COUNT(*) FROM carnet_keys")).scalar_one()
        assert b"anxieuse" not in bytes(raw.body)
        assert raw.summary.startswith("carnet:") and "mensuel" not in raw.summary
        assert n_keys == 2

        fresh = carnet.KeyManager(engine, master_key=master_key_uri)
        manager_cleanup.append(fresh)
        carnet.configure(fresh)
        with Session(engine) as s:
            got = {n.id: (n.body, n.summary) for n in s.scalars(sa.select(models.Note))}
        assert got == {1: ("Patiente anxieuse", "suivi mensuel"), 2: ("Douleurs lombaires", None)}

        # With keys in the table, autogenerate still proposes nothing.
        third = project.autogenerate("third")
        assert function_body(third, "upgrade") == ["pass"], third.read_text()
    finally:
        engine.dispose()


def test_adopting_alembic_on_a_database_made_by_create_schema(
    db_url: str, master_key_uri: str, tmp_path: Path, manager_cleanup: list[carnet.KeyManager]
) -> None:
    # The case: carnet_keys exists, with keys in it, and is not in the models.
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    manager_cleanup.append(keys)
    keys.create_schema()
    keys.encrypt(b"x", tenant="cabinet-a", label="notes.body")
    project = Project(tmp_path / "project", db_url)
    script = project.autogenerate("adopt")
    source = script.read_text()
    assert "carnet_keys" not in source, source
    assert not any("drop_" in stmt for stmt in function_body(script, "upgrade"))
    # Only what create_schema() does not make is proposed.
    assert "# carnet: create table carnet_jobs" in source
    assert "# carnet: create table carnet_migrations" in source
    project.run("upgrade", "head")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT COUNT(*) FROM carnet_keys")).scalar_one() == 1
    assert _plan(engine) == []


def test_a_renamed_key_table_is_never_proposed_for_dropping(
    db_url: str, master_key_uri: str, tmp_path: Path, manager_cleanup: list[carnet.KeyManager]
) -> None:
    # The key table under a name the env.py hook was not told: recognised by its columns.
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri, table_name="practice_keys")
    manager_cleanup.append(keys)
    keys.create_schema()
    keys.encrypt(b"x", tenant="cabinet-a", label="notes.body")
    project = Project(tmp_path / "project", db_url, hook_args="manage_tables=False")
    script = project.autogenerate("renamed")
    upgrade = function_body(script, "upgrade")
    assert not any("practice_keys" in stmt for stmt in upgrade), script.read_text()
    assert any("create_table('notes'" in stmt for stmt in upgrade)
    # manage_tables=False: carnet's tables are not proposed either.
    assert not any("carnet" in stmt for stmt in upgrade if "EncryptedText" not in stmt)


def test_named_key_table_is_created_and_upgraded_under_its_name(
    db_url: str, tmp_path: Path
) -> None:
    project = Project(tmp_path / "project", db_url, hook_args="keys_table='practice_keys'")
    script = project.autogenerate("named")
    assert (
        function_body(script, "upgrade")[0]
        == "carnet.migrate.alembic.upgrade_carnet_tables(op, keys_table='practice_keys')"
    )
    project.run("upgrade", "head")
    engine = sa.create_engine(db_url)
    try:
        names = set(sa.inspect(engine).get_table_names())
        assert {"practice_keys", "carnet_jobs", "carnet_migrations"} <= names
        assert "carnet_keys" not in names
        again = project.autogenerate("again")
        assert function_body(again, "upgrade") == ["pass"], again.read_text()
    finally:
        engine.dispose()


# -- the operation itself, in process, through Alembic's Operations ----------------------


def _plan(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [s.description for s in carnet_alembic.plan_carnet_tables(conn)]


def _upgrade(engine: sa.Engine) -> list[str]:
    with engine.begin() as conn:
        return carnet_alembic.upgrade_carnet_tables(Operations(MigrationContext.configure(conn)))


def test_declared_tables_match_what_carnet_creates_itself(
    engine: sa.Engine, master_key_uri: str
) -> None:
    # If carnet's own create paths and carnet.schema ever disagree, an Alembic
    # upgrade of a database made by create_schema() would not be empty.
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        keys.create_schema()
        jobs.ensure_jobs_table(engine)
        state.ensure(engine)
    finally:
        keys.close()
    assert _plan(engine) == []
    assert _upgrade(engine) == []


def test_upgrade_creates_missing_tables_and_adds_missing_columns_idempotently(
    engine: sa.Engine, master_key_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        keys.create_schema()  # a database from before: only the key table, with a key in it
        keys.encrypt(b"x", tenant="cabinet-a", label="notes.body")
    finally:
        keys.close()

    # A later release declares a new NOT NULL column with a constant default.
    def later_release(keys_table_name: str = "carnet_keys") -> sa.MetaData:
        md = carnet_metadata(keys_table_name)
        md.tables[keys_table_name].append_column(
            sa.Column("origin", sa.String(16), nullable=False, default="data")
        )
        return md

    monkeypatch.setattr(carnet_tables, "carnet_metadata", later_release)
    assert _upgrade(engine) == [
        "create table carnet_jobs",
        "add column carnet_keys.origin",
        "create table carnet_migrations",
    ]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT origin FROM carnet_keys")).scalars().all() == ["data"]
    assert _upgrade(engine) == []


def test_a_not_null_column_without_constant_default_is_refused_before_any_change(
    engine: sa.Engine, master_key_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        keys.create_schema()
    finally:
        keys.close()

    def bad_release(keys_table_name: str = "carnet_keys") -> sa.MetaData:
        md = carnet_metadata(keys_table_name)
        md.tables[keys_table_name].append_column(sa.Column("origin", sa.String(16), nullable=False))
        return md

    monkeypatch.setattr(carnet_tables, "carnet_metadata", bad_release)
    with pytest.raises(carnet.errors.ConfigurationError, match="carnet_keys.origin"):
        _upgrade(engine)
    # Refused while planning: not even the missing tables were created.
    assert "carnet_jobs" not in sa.inspect(engine).get_table_names()


@pytest.mark.parametrize("db_kind", ["postgresql", "mariadb"])
def test_upgrade_converts_a_declared_collation(
    engine: sa.Engine, master_key_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        keys.create_schema()  # tenant column in the database's default collation
        keys.encrypt(b"x", tenant="cabinet-a", label="notes.body")
    finally:
        keys.close()
    exact: dict[str, Any] = {
        "postgresql": sa.String(255, collation="C"),
        "mariadb": mysql.VARCHAR(255, collation="utf8mb4_bin"),
    }

    def exact_tenant(keys_table_name: str = "carnet_keys") -> sa.MetaData:
        md = carnet_metadata(keys_table_name)
        col = md.tables[keys_table_name].c.tenant
        col.type = (
            sa.String(255)
            .with_variant(exact["postgresql"], "postgresql")
            .with_variant(exact["mariadb"], "mysql", "mariadb")
        )
        return md

    monkeypatch.setattr(carnet_tables, "carnet_metadata", exact_tenant)
    applied = _upgrade(engine)
    want = "C" if engine.dialect.name == "postgresql" else "utf8mb4_bin"
    assert f"set collation of carnet_keys.tenant to {want}" in applied
    (tenant,) = [c for c in sa.inspect(engine).get_columns("carnet_keys") if c["name"] == "tenant"]
    assert tenant["type"].collation == want and tenant["nullable"] is False
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT tenant FROM carnet_keys")).scalars().all() == [
            "cabinet-a"
        ]
    assert _plan(engine) == []


def test_offline_sql_creates_the_three_tables(db_url: str, tmp_path: Path) -> None:
    project = Project(tmp_path / "project", db_url)
    script = project.autogenerate("offline")
    assert "upgrade_carnet_tables(op)" in script.read_text()
    sql = project.run("upgrade", "head", "--sql")
    for name in CARNET_TABLES:
        assert f"CREATE TABLE {name}" in sql


def test_render_type_keeps_what_shapes_stored_values() -> None:
    render = carnet_alembic.render_type
    assert render(carnet.EncryptedText()) == "carnet.EncryptedText()"
    assert render(carnet.EncryptedText(storage="text", mixed_read=True)) == (
        "carnet.EncryptedText(storage='text')"
    )
    t = sa.Table("t", sa.MetaData(), sa.Column("c", carnet.EncryptedText(tenant="p")))
    # The default label follows the table the migration creates: not frozen in the script.
    assert render(t.c.c.type) == "carnet.EncryptedText(tenant='p')"
    # What is rendered is a constructor call that gives back the same arguments.
    made = eval(render(carnet.EncryptedText("p", label="x.y")), {"carnet": carnet})  # noqa: S307
    assert (made.tenant, made.label, made.storage) == ("p", "x.y", "binary")


def test_the_applications_own_hooks_are_called_for_everything_else() -> None:
    seen: list[str] = []

    def mine(obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        seen.append(name)
        return name != "audit_log"

    def my_render(type_: str, obj: Any, autogen_context: Any) -> Any:
        return "mine()" if type_ == "type" and isinstance(obj, sa.Enum) else False

    opts = carnet_alembic.autogenerate_options(
        keys_table="practice_keys", include_object=mine, render_item=my_render
    )
    flt = opts["include_object"]
    md = carnet_metadata("practice_keys")
    renamed = sa.Table(
        "old_keys", sa.MetaData(), *[c._copy() for c in md.tables["practice_keys"].c]
    )
    for table in [*md.tables.values(), renamed]:
        assert flt(table, table.name, "table", True, None) is False
        # ... and so are their columns (and indexes, constraints: anything with .table)
        column = next(iter(table.c))
        assert flt(column, column.name, "column", True, None) is False
    notes = sa.Table("notes", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    audit = sa.Table("audit_log", sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    assert flt(notes, "notes", "table", False, None) is True
    assert flt(audit, "audit_log", "table", True, None) is False
    assert seen == ["notes", "audit_log"]  # never asked about carnet's tables

    class Ctx:
        imports: set[str] = set()

    ctx = Ctx()
    assert opts["render_item"]("type", carnet.EncryptedText(), ctx) == "carnet.EncryptedText()"
    assert ctx.imports == {"import carnet"}
    assert opts["render_item"]("type", sa.Enum("a"), ctx) == "mine()"
    assert opts["render_item"]("type", sa.Integer(), ctx) is False


def test_upgrade_gives_a_key_table_from_before_key_kinds_its_kinds(
    engine: sa.Engine, master_key_uri: str
) -> None:
    # A key table made before key kinds, with a data key in it: the Alembic
    # upgrade adds the kind column AND makes the constraints per kind, so a
    # practice's first index root no longer collides with its active data key.
    from carnet.keystore import utcnow

    old_md = sa.MetaData()
    old = old_keys_table(old_md)
    old_md.create_all(engine)
    mk = carnet.open_master_key(master_key_uri)
    key_id = os.urandom(16)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            old.insert().values(
                key_id=key_id.hex(), tenant="p1", version=1, state="active", active_tenant="p1",
                master_key_uri=mk.uri,
                wrapped_key=mk.wrap(os.urandom(32), {"tenant": "p1", "key_id": key_id.hex()}),
                created_at=now, updated_at=now,
            )
        )  # fmt: skip
    mk.close()
    applied = _upgrade(engine)
    assert "add key kinds to carnet_keys (kind column, constraints per kind)" in applied
    assert not any(a == "add column carnet_keys.kind" for a in applied)
    assert _plan(engine) == []
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    try:
        blob = keys.encrypt(b"kept", tenant="p1", label="l")
        assert blob[1:17] == key_id  # the existing key is still the active data key
        assert len(keys.index_roots("p1")) == 1
        keys.rotate_index_root("p1")
        keys.rotate("p1")
        assert sorted((r.kind, r.version, r.state) for r in keys.list_keys("p1")) == [
            ("data", 1, "inactive"), ("data", 2, "active"),
            ("index", 1, "inactive"), ("index", 2, "active"),
        ]  # fmt: skip
    finally:
        keys.close()


SEARCHABLE_MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
import datetime as dt

import carnet
from carnet import transforms


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(primary_key=True)
    practice_id: Mapped[str] = mapped_column(sa.String(64))
    last_name: Mapped[str] = mapped_column(carnet.EncryptedString(100, tenant="practice_id"))
    phone: Mapped[str | None] = mapped_column(
        carnet.EncryptedString(32, tenant="practice_id", storage="text", label="patients.tel")
    )
    birth_date: Mapped[dt.date | None] = mapped_column(carnet.EncryptedDate(tenant="practice_id"))
    phone_bidx = carnet.BlindIndex("phone", transform=transforms.phone_fr, bits=10)
    birth_bidx = carnet.BlindIndex("birth_date", transform=transforms.date_iso, bits=6)
"""


def test_autogenerate_renders_the_searchable_types_and_the_application_works(
    db_url: str, master_key_uri: str, tmp_path: Path, manager_cleanup: list[carnet.KeyManager]
) -> None:
    project = Project(tmp_path / "project", db_url)
    (project.root / "models.py").write_text(SEARCHABLE_MODELS)
    script = project.autogenerate("patients")
    body = "\n".join(function_body(script, "upgrade"))
    assert "import carnet\n" in script.read_text()
    assert "carnet.EncryptedString(100, tenant='practice_id')" in body
    assert (
        "carnet.EncryptedString(32, tenant='practice_id', label='patients.tel', storage='text')"
        in body
    )
    assert "carnet.EncryptedDate(tenant='practice_id')" in body
    assert "sa.Column('phone_bidx', sa.BigInteger(), nullable=True)" in body
    assert "ix_patients_phone_bidx" in body and "carnet.searchable" not in body
    project.run("upgrade", "head")
    # The database now has what the models declare: a second autogenerate is empty.
    again = project.autogenerate("again")
    assert function_body(again, "upgrade") == ["pass"]

    models = load_models(project.root)
    engine = sa.create_engine(db_url)
    keys = carnet.KeyManager(engine, master_key=master_key_uri)
    manager_cleanup.append(keys)
    carnet.configure(keys)
    import datetime as dt

    with Session(engine) as s:
        s.add(
            models.Patient(
                id=1,
                practice_id="p1",
                last_name="Dupont",
                phone="06 39 98 00 01",
                birth_date=dt.date(1961, 4, 2),
            )
        )
        s.commit()
    with Session(engine) as s:
        (found,) = carnet.search(s, models.Patient.phone_bidx, "0639980001", tenant="p1")
        assert (found.last_name, found.birth_date) == ("Dupont", dt.date(1961, 4, 2))
    engine.dispose()


def test_render_type_of_the_searchable_types() -> None:
    render = carnet_alembic.render_type
    assert render(carnet.EncryptedString(20)) == "carnet.EncryptedString(20)"
    assert render(carnet.EncryptedDate(tenant="p", storage="text")) == (
        "carnet.EncryptedDate(tenant='p', storage='text')"
    )
    made = eval(render(carnet.EncryptedString(7, "p", label="x.y")), {"carnet": carnet})  # noqa: S307
    assert (made.length, made.tenant, made.label) == (7, "p", "x.y")
    made = eval(render(carnet.EncryptedDate("p")), {"carnet": carnet})  # noqa: S307
    assert isinstance(made, carnet.EncryptedDate) and made.tenant == "p"


def test_render_type_of_documents_and_json() -> None:
    render = carnet_alembic.render_type
    assert render(carnet.EncryptedBytes(tenant="p")) == "carnet.EncryptedBytes(tenant='p')"
    made = eval(render(carnet.EncryptedBytes("p", max_bytes=1000)), {"carnet": carnet})  # noqa: S307
    assert isinstance(made, carnet.EncryptedBytes) and made.max_bytes == 1000
    made = eval(render(carnet.EncryptedJSON("p", storage="text")), {"carnet": carnet})  # noqa: S307
    assert isinstance(made, carnet.EncryptedJSON) and (made.tenant, made.storage) == ("p", "text")
