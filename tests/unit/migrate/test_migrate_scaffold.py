"""``carnet migrate scaffold``: the generated migrations and model do what the example's do.

The example's patients are migrated twice on each backend, side by side: one
database through the example's hand-written revisions (0003/0004) and model,
the other through the files ``scaffold`` writes for the same identifiers,
run with Alembic and imported as the application's model, with the
``carnet migrate`` commands the scaffold prints. The two end with the same
schema, the same records, the same values, and the example's final model
finds every patient of the scaffolded database by its blind indexes (same
labels, transforms and bits: the same index format).
"""

from __future__ import annotations

import ast
import datetime as dt
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

import carnet
from carnet.cli import cli as carnet_cli
from carnet.errors import CarnetError, ConfigurationError
from support.paths import EXAMPLES, ROOT

sys.path.insert(0, str(EXAMPLES))

from legacy_practice import app as legacy_app  # noqa: E402
from legacy_practice.generate import populate  # noqa: E402

IDENTIFIERS = ["phone", "last_name", "first_name", "birth_date"]


def scaffold_args(out: Path, module: str) -> list[str]:
    """docs/migration.md's scaffold command for the example's identifiers, into ``out``."""
    words = documented_scaffold()
    words[words.index("--out") + 1] = str(out)
    return [*words, "--module", module]


def invoke(args: list[str], db_url: str, mk: str | None = None) -> Result:
    root = ["--database-url", db_url] + (["--master-key", mk] if mk else [])
    return CliRunner().invoke(carnet_cli, [*root, *args])


def alembic(script_location: Path, db_url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    command.upgrade(cfg, revision)


def alembic_dir(tmp_path: Path, revisions: list[str]) -> Path:
    """An Alembic directory (the example's env.py) holding only the generated revisions."""
    d = tmp_path / "alembic"
    (d / "versions").mkdir(parents=True)
    for name in ("env.py", "script.py.mako"):
        shutil.copy(EXAMPLES / "legacy_practice" / "migrations" / name, d / name)
    for r in revisions:
        shutil.copy(r, d / "versions")
    return d


def schema(engine: sa.Engine) -> dict[str, Any]:
    insp = sa.inspect(engine)
    cols = {
        c["name"]: (c["nullable"], type(c["type"].as_generic()).__name__)
        for c in insp.get_columns("patients")
    }
    idx = {i["name"]: tuple(i["column_names"]) for i in insp.get_indexes("patients")}
    return {"columns": cols, "indexes": idx}


def records(engine: sa.Engine) -> list[tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT column_name, state FROM carnet_migrations")).all()
    return sorted((r[0], r[1]) for r in rows)


@pytest.fixture
def manager_for(master_key_uri: str) -> Iterator[Callable[[sa.Engine], carnet.KeyManager]]:
    made: list[carnet.KeyManager] = []

    def make(engine: sa.Engine) -> carnet.KeyManager:
        keys = carnet.KeyManager(engine, master_key=master_key_uri)
        keys.create_schema()
        made.append(keys)
        carnet.configure(keys)
        return keys

    yield make
    carnet.configure(None)
    for k in made:
        k.close()


def plaintext_refused(engine: sa.Engine, column: str, value: Any) -> bool:
    return plaintext_refused_in(engine, "patients", column, value)


def test_scaffold_does_what_the_hand_written_example_does(
    fresh_db_url_factory: Callable[[], str],
    db_kind: str,
    master_key_uri: str,
    tmp_path: Path,
    manager_for: Callable[[sa.Engine], carnet.KeyManager],
) -> None:
    url_gen, url_ex = fresh_db_url_factory(), fresh_db_url_factory()
    eng_gen, eng_ex = sa.create_engine(url_gen), sa.create_engine(url_ex)
    for eng in (eng_gen, eng_ex):
        populate(eng, seed=7, practices_n=3, patients_n=30, consultations_n=0, lookalike=False)
    module = f"patients_migrating_{db_kind}"
    out = tmp_path / "scaffold"
    res = invoke([*scaffold_args(out, module), "--json"], url_gen)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    files = doc["files"]
    assert {Path(f).parent for f in files.values()} == {out}
    assert [ix["bits"] for ix in doc["indexes"]] == [
        legacy_app.PHONE_BITS, legacy_app.NAME_BITS, legacy_app.BIRTH_BITS
    ]  # fmt: skip

    # Expand: the generated revision on one database, 0003 on the other.
    script = alembic_dir(tmp_path, [files["expand"], files["contract"]])
    alembic(script, url_gen, doc["revisions"]["expand"])
    alembic(EXAMPLES / "legacy_practice" / "migrations", url_ex, "0003_expand_identifiers")
    assert schema(eng_gen) == schema(eng_ex)
    # The generated expand also installs carnet's checks on the new columns at
    # once (the example's leaves that to finish): plaintext is refused there.
    assert plaintext_refused(eng_gen, "phone_enc", b"06 12 34 56 78")
    assert not plaintext_refused(eng_ex, "phone_enc", b"06 12 34 56 78")

    # The generated model, imported as the application's: it writes a patient
    # during the migration, and finds rows through the legacy columns meanwhile.
    sys.path.insert(0, str(out))
    try:
        gen = importlib.import_module(module)
        keys_gen = manager_for(eng_gen)
        with Session(eng_gen) as s:
            p = s.get(gen.MigratingPatient, 5)
            p.write_phone("01 99 00 77 66")
            s.commit()
            found = gen.find(s, "phone_bidx", "0199007766", str(p.practice_id))
            assert [q.id for q in found] == [5]
        keys_ex = manager_for(eng_ex)
        ex_model = legacy_app.patient_model("migrating")
        with Session(eng_ex) as s:
            q = s.get(ex_model, 5)
            q.phone_enc, q.phone = "01 99 00 77 66", None
            s.commit()
        carnet.configure(None)

        # The commands scaffold prints, as printed; the example's with its own model.
        steps = [shlex.split(c)[1:] for c in doc["next"]]
        assert [w[:2] for w in steps] == [["migrate", "run"]] * 4 + [["migrate", "finish"]] * 4
        for words in steps:
            res = invoke([*words, "--json"], url_gen, master_key_uri)
            assert res.exit_code == 0, f"{words}\n{res.output}"
            ex_words = [
                w.replace(f"{module}:", "legacy_practice.app:").replace(str(out), str(EXAMPLES))
                for w in words
            ]
            res = invoke([*ex_words, "--json"], url_ex, master_key_uri)
            assert res.exit_code == 0, f"{ex_words}\n{res.output}"
        carnet.configure(keys_gen)
        with Session(eng_gen) as s:
            for pid in (1, 5, 17):
                p = s.get(gen.MigratingPatient, pid)
                assert p.birth_date_enc is not None and p.read_birth_date() == p.birth_date_enc
                got = gen.find(s, "birth_date_bidx", p.read_birth_date(), str(p.practice_id))
                assert pid in {r.id for r in got}
        carnet.configure(None)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop(module, None)

    # Contract: the generated revision, and 0004.
    alembic(script, url_gen, "heads")
    alembic(EXAMPLES / "legacy_practice" / "migrations", url_ex, "0004_contract_identifiers")
    assert schema(eng_gen) == schema(eng_ex)
    assert records(eng_gen) == records(eng_ex) == sorted((c, "strict") for c in IDENTIFIERS)
    # The checks follow the renamed columns, on both: plaintext is refused in every
    # final column (on SQLite, a later contract's table copy must not lose the
    # triggers an earlier one installed).
    for eng in (eng_gen, eng_ex):
        for column in IDENTIFIERS:
            assert plaintext_refused(eng, column, b"06 12 34 56 78"), column

    # The same patients, read and found through the example's final model on both.
    final = legacy_app.patient_model("encrypted")
    seen: dict[str, list[tuple[Any, ...]]] = {}
    for name, eng, keys in (("gen", eng_gen, keys_gen), ("ex", eng_ex, keys_ex)):
        carnet.configure(keys)
        with Session(eng) as s:
            rows = s.scalars(sa.select(final).order_by(final.id)).all()
            seen[name] = [(p.id, p.practice_id, *legacy_app.identifiers(p)) for p in rows]
            for p in rows:
                tenant = str(p.practice_id)
                for index, value in (
                    ("phone_bidx", p.phone),
                    ("name_bidx", (p.first_name, p.last_name)),
                    ("birth_date_bidx", p.birth_date),
                ):
                    if value is None:
                        continue
                    got = legacy_app.find_patients(s, final, index, value, tenant)
                    assert p.id in {r.id for r in got}, (name, index)
        carnet.configure(None)
    assert seen["gen"] == seen["ex"]
    # The generated final model reads the same patients and finds them by its indexes.
    sys.path.insert(0, str(out))
    try:
        fin = importlib.import_module(f"{module}_final").Patient
        carnet.configure(keys_gen)
        with Session(eng_gen) as s:
            rows = s.scalars(sa.select(fin).order_by(fin.id)).all()
            mine = [(p.id, p.practice_id, p.last_name, p.first_name, p.birth_date, p.phone)
                    for p in rows]  # fmt: skip
            assert mine == seen["gen"]
            for p in rows:
                t = str(p.practice_id)
                assert p.id in {r.id for r in carnet.search(s, fin.birth_date_bidx,
                                                            p.birth_date, tenant=t)}  # fmt: skip
                got = carnet.search(s, fin.name_bidx, (p.first_name, p.last_name), tenant=t)
                assert p.id in {r.id for r in got}
        carnet.configure(None)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop(f"{module}_final", None)
    assert len(seen["gen"]) == 30
    assert all(isinstance(r[4], dt.date) for r in seen["gen"])
    assert [r for r in seen["gen"] if r[0] == 5][0][5] == "01 99 00 77 66"
    eng_gen.dispose()
    eng_ex.dispose()


def test_generated_files_pass_the_project_linters(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    populate(engine, seed=3, practices_n=2, patients_n=5, consultations_n=4, lookalike=False)
    out = tmp_path / "gen"
    res = invoke(scaffold_args(out, "patients_lint"), db_url)
    assert res.exit_code == 0, res.output
    # And a practice on the parent row, a column in place, no index.
    res = invoke(["migrate", "scaffold", "--table", "consultations", "--column", "comment",
                  "--column", "reason", "--into", "reason=reason_enc", "--tenant",
                  "patients.practice_id", "--module", "consultations_lint", "--out", str(out)],
                 db_url)  # fmt: skip
    assert res.exit_code == 0, res.output
    tools = Path(sys.executable).parent
    ruff, mypy = tools / "ruff", tools / "mypy"
    if not ruff.exists() or not mypy.exists():
        pytest.skip("ruff and mypy are not installed beside this interpreter")
    root = Path(__file__).resolve().parents[3]
    cfg = ["--config", str(root / "pyproject.toml")]
    for cmd in (
        [str(ruff), "check", "--no-cache", *cfg, str(out)],
        [str(ruff), "format", "--check", "--no-cache", *cfg, str(out)],
        [str(mypy), "--strict", "--follow-imports=silent", "--no-incremental", "--cache-dir",
         "/dev/null", *(str(p) for p in sorted(out.glob("consultations_lint*.py"))),
         str(out / "patients_lint.py"), str(out / "patients_lint_final.py")],
    ):  # fmt: skip
        env = {**os.environ, "MYPYPATH": str(root / "src")}
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr


def documented_scaffold() -> list[str]:
    """The ``carnet migrate scaffold`` command of docs/migration.md's identifiers section."""
    text = (ROOT / "docs" / "migration.md").read_text(encoding="utf-8")
    block = text.split("<!-- scaffold:start -->")[1].split("<!-- scaffold:end -->")[0]
    (line,) = [ln[2:] for ln in block.splitlines() if ln.startswith("$ carnet migrate scaffold")]
    return shlex.split(line)[1:]


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_scaffold_refuses_bad_input_and_writes_nothing(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    populate(engine, seed=3, practices_n=2, patients_n=5, consultations_n=3, lookalike=False)
    out = tmp_path / "out"
    base = ["migrate", "scaffold", "--table", "patients", "--tenant", "practice_id"]
    cases = [
        (["--column", "nope", "--into", "x"], "has no column 'nope'"),
        (["--column", "birth_date"], "DATE column"),
        (["--column", "phone", "--into", "last_name"], "already has a column 'last_name'"),
        (["--column", "phone", "--column", "last_name", "--into", "x"], "LEGACY=NEW"),
        (["--column", "phone", "--into", "x", "--index", "i=last_name"], "not one of the --column"),
        (["--column", "phone", "--into", "x", "--index", "i=phone:initial_lastname"], "takes 2"),
        (["--column", "phone", "--into", "x", "--index", "i=phone:soundex"], "unknown transform"),
        (["--column", "phone", "--into", "x", "--index", "i=phone:exact:99"], "between 1 and 63"),
        (["--column", "phone", "--into", "x-y"], "Python identifier"),
        (["--column", "practice_id", "--into", "x"], "not migrated"),
    ]
    for args, message in cases:
        res = invoke([*base, *args, "--out", str(out)], db_url)
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith("carnet: error:") and res.stderr.count("\n") == 1
        assert message in res.stderr, (args, res.stderr)
        assert not out.exists()
    # A practice on a parent table: no blind index (carnet.search filters on the row's).
    res = invoke(["migrate", "scaffold", "--table", "consultations", "--column", "comment",
                  "--tenant", "patients.practice_id", "--index", "i=comment", "--out", str(out)],
                 db_url)  # fmt: skip
    assert res.exit_code == 2 and "practice as a column of its row" in res.stderr
    # Two foreign keys up: the model would need a chain of relationships.
    res = invoke(["migrate", "scaffold", "--table", "consultations", "--column", "comment",
                  "--tenant", "practices.id", "--out", str(out)], db_url)  # fmt: skip
    assert res.exit_code == 2 and "2 foreign keys away" in res.stderr
    assert not out.exists()
    # Files already there are kept as they are.
    args = [*base, "--column", "phone", "--into", "phone_enc", "--module", "m", "--out", str(out)]
    assert invoke(args, db_url).exit_code == 0
    before = {p.name: p.read_text() for p in out.iterdir()}
    res = invoke([*args, "--json"], db_url)
    assert res.exit_code == 2 and "not overwritten" in json.loads(res.stdout)["error"]["message"]
    assert {p.name: p.read_text() for p in out.iterdir() if p.name in before} == before


def test_scaffold_in_place_with_mixed_read(
    engine: sa.Engine,
    db_url: str,
    db_kind: str,
    master_key_uri: str,
    tmp_path: Path,
    manager_for: Callable[[sa.Engine], carnet.KeyManager],
) -> None:
    """A TEXT column sealed in place: mixed checks at expand, mixed_read in the model."""
    md = sa.MetaData()
    notes = sa.Table(
        "notes", md,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("practice_id", sa.String(20), nullable=False),
        sa.Column("body", sa.Text, nullable=True),
    )  # fmt: skip
    md.create_all(engine)
    bodies = {i: f"allergie pénicilline, note {i}" for i in range(1, 13)}
    with engine.begin() as conn:
        conn.execute(notes.insert(), [{"id": i, "practice_id": f"p{i % 2}", "body": b}
                                      for i, b in bodies.items()])  # fmt: skip
    module = f"notes_migrating_{db_kind}"
    out = tmp_path / "gen"
    res = invoke(["migrate", "scaffold", "--table", "notes", "--column", "body", "--tenant",
                  "practice_id", "--index", "body_bidx=body:folded", "--module", module,
                  "--out", str(out), "--json"], db_url)  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["columns"] == [{"column": "body", "into": None, "type": "text"}]
    # 6 rows per practice, 2 unrelated rows per lookup: plan_bits says 2 bits.
    assert doc["indexes"][0]["bits"] == carnet.plan_bits(6).bits
    script = alembic_dir(tmp_path, [doc["files"]["expand"], doc["files"]["contract"]])
    alembic(script, db_url, doc["revisions"]["expand"])
    # The mixed phase's checks: legacy plaintext passes, a malformed carnet value does not.
    assert not plaintext_refused_in(engine, "notes", "body", "encore du texte clair")
    assert plaintext_refused_in(engine, "notes", "body", "carnet:2:pas-du-tout")
    # The contract refuses before finish.
    with pytest.raises(ConfigurationError):
        alembic(script, db_url, "heads")

    sys.path.insert(0, str(out))
    try:
        gen = importlib.import_module(module)
        keys = manager_for(engine)
        with Session(engine) as s:
            s.add(gen.MigratingNotes(id=100, practice_id="p0", body="écrite pendant la migration"))
            s.commit()
            assert s.get(gen.MigratingNotes, 3).body == bodies[3]  # legacy, read as it is
            # Before the index is filled, lookups compare the values (clear or sealed).
            for i in (3, 4, 100):
                b = bodies.get(i, "écrite pendant la migration")
                assert [n.id for n in gen.find(s, "body_bidx", b.upper(), f"p{i % 2}")] == [i]
        carnet.configure(None)
        for words in (shlex.split(c)[1:] for c in doc["next"]):
            res = invoke([*words, "--json"], db_url, master_key_uri)
            assert res.exit_code == 0, f"{words}\n{res.output}"
        carnet.configure(keys)
        with Session(engine) as s:
            for i, b in {**bodies, 100: "écrite pendant la migration"}.items():
                got = gen.find(s, "body_bidx", b.upper(), f"p{i % 2}")
                assert [n.id for n in got] == [i]
        carnet.configure(None)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop(module, None)
    alembic(script, db_url, "heads")  # require_strict: finish recorded it
    assert plaintext_refused_in(engine, "notes", "body", "encore du texte clair")
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT body FROM notes")).scalars().all()
    assert len(raw) == 13 and all(v.startswith("carnet:") for v in raw)


def plaintext_refused_in(engine: sa.Engine, table: str, column: str, value: Any) -> bool:
    """True when the database itself refuses ``value`` in ``table.column`` (rolled back)."""
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            conn.execute(sa.text(f"UPDATE {table} SET {column} = :v WHERE id = 1"), {"v": value})
        except (sa.exc.DBAPIError, CarnetError):
            # carnet names its checks' refusals (InvalidCiphertext, TenantMismatch)
            return True
        finally:
            trans.rollback()
    return False


@pytest.mark.parametrize("db_kind", ["sqlite"])
def test_scaffold_after_an_existing_head_and_its_warnings(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    """--revises chains the expand step to the application's head; a short column is flagged."""
    populate(engine, seed=3, practices_n=2, patients_n=5, consultations_n=0, lookalike=False)
    # The application's own history: one revision, already applied.
    script = alembic_dir(tmp_path, [])
    (script / "versions" / "a1_base.py").write_text(
        'revision = "a1"\ndown_revision = None\nbranch_labels = None\ndepends_on = None\n\n\n'
        "def upgrade() -> None:\n    pass\n",
        encoding="utf-8",
    )
    alembic(script, db_url, "a1")
    out = tmp_path / "gen"
    res = invoke(["migrate", "scaffold", "--table", "patients", "--tenant", "practice_id",
                  "--column", "phone", "--column", "last_name", "--into", "last_name=ln_enc",
                  "--revises", "a1", "--out", str(out), "--json"], db_url)  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    (warning,) = doc["warnings"]
    assert "patients.phone is a VARCHAR(20) sealed in place" in warning
    for f in (doc["files"]["expand"], doc["files"]["contract"]):
        shutil.copy(f, script / "versions")
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(script))
    scripts = ScriptDirectory.from_config(cfg)
    # One line of history: a1, the expand step, the contract step.
    assert scripts.get_heads() == [doc["revisions"]["contract"]]
    assert scripts.get_revision(doc["revisions"]["expand"]).down_revision == "a1"
    alembic(script, db_url, doc["revisions"]["expand"])
    cols = {c["name"]: c for c in sa.inspect(engine).get_columns("patients")}
    assert "ln_enc" in cols and cols["last_name"]["nullable"]
    model = (out / "patients_migrating.py").read_text(encoding="utf-8")
    assert "class MigratingPatients(Base):" in model
    assert 'storage="text"' in model and "mixed_read=True" in model


# -- the three files agree, whatever is asked (no database server needed) ------------------

_LEGACY_ENGINE: list[sa.Engine] = []


def _legacy_engine() -> sa.Engine:
    """The example's legacy schema in memory, a few patients: built once for every example."""
    if not _LEGACY_ENGINE:
        eng = sa.create_engine("sqlite://", poolclass=sa.pool.StaticPool)
        populate(eng, seed=5, practices_n=2, patients_n=9, consultations_n=0, lookalike=False)
        _LEGACY_ENGINE.append(eng)
    return _LEGACY_ENGINE[0]


@st.composite
def requests(draw: st.DrawFn) -> tuple[list[str], dict[str, str], list[str]]:
    cols = draw(st.lists(st.sampled_from(IDENTIFIERS), min_size=1, max_size=4, unique=True))
    # A DATE column must move; a text one may be sealed in place.
    into = {c: f"{c}_x" for c in cols if c == "birth_date" or draw(st.booleans())}
    pool = [f"{c}_ix={c}" for c in cols]
    if {"first_name", "last_name"} <= set(cols):
        pool.append("fl_ix=first_name,last_name")
    chosen = draw(st.lists(st.sampled_from(pool), unique=True)) if pool else []
    indexes = []
    for spec in chosen:
        # Defaults (transform and bits), bits given, or both given.
        form = draw(st.sampled_from(["", "::5", "explicit"]))
        if form == "explicit":
            form = ":initial_lastname:7" if "," in spec else ":exact:7"
        indexes.append(spec + form)
    return cols, into, indexes


def _calls(source: str, name: str) -> list[ast.Call]:
    return [
        n for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call) and ast.unparse(n.func).endswith(name)
    ]  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests())
def test_the_three_files_agree(req: tuple[list[str], dict[str, str], list[str]]) -> None:
    from carnet.migrate import scaffold

    cols, into, indexes = req
    sc = scaffold.build(
        _legacy_engine(),
        "patients",
        tuple(cols),
        tenant="practice_id",
        into=tuple(f"{k}={v}" for k, v in into.items()),
        indexes=tuple(indexes),
    )
    news = {c: into.get(c, c) for c in cols}
    # Expand: one sealed column per moved identifier, checks on every one.
    added = [ast.literal_eval(c.args[1]) for c in _calls(sc.expand, "add_encrypted_column")]
    assert added == [news[c] for c in cols if c in into]
    checks = {
        ast.literal_eval(c.args[1]): {k.arg: ast.literal_eval(k.value) for k in c.keywords}
        for c in _calls(sc.expand, "op.carnet_install_checks")
    }
    assert set(checks) == set(news.values())
    for c in cols:
        kw = checks[news[c]]
        assert kw["label"] == f"patients.{c}" and kw["practice"] == "practice_id"
        assert kw["mode"] == ("v2" if c in into else "mixed")
    bidx = [ast.literal_eval(c.args[1].args[0]) for c in _calls(sc.expand, "op.add_column")]
    assert bidx == [ix.name for ix in sc.indexes]
    # Contract: contract() per moved column, require_strict per column sealed in place.
    contracted = {
        ast.literal_eval(k.value)
        for c in _calls(sc.contract, "contract")
        for k in c.keywords
        if k.arg == "new"
    }
    assert contracted == {news[c] for c in cols if c in into}
    strict = [ast.literal_eval(c.args[1]) for c in _calls(sc.contract, "require_strict")]
    assert strict == [c for c in cols if c not in into]
    # The model: executes, maps the columns the migrations create, with the same labels.
    # Registered as a module while it runs: the ORM resolves its annotations there.
    mod = types.ModuleType(f"scaffolded_{uuid.uuid4().hex}")
    sys.modules[mod.__name__] = mod
    try:
        exec(compile(sc.model, f"{mod.__name__}.py", "exec"), mod.__dict__)  # noqa: S102
    finally:
        del sys.modules[mod.__name__]
    ns = mod.__dict__
    table = ns[sc.model_class].__table__
    for c in cols:
        typ = table.c[news[c]].type
        assert isinstance(typ, carnet.EncryptedText) and typ.label == f"patients.{c}"
        assert typ.mixed_read == (c not in into)
        assert isinstance(typ, carnet.EncryptedDate) == (c == "birth_date")
        if c in into:
            assert c in table.c  # the legacy column, still read
    for ix in sc.indexes:
        spec = table.c[ix.name].type.index_spec
        assert spec.sources == tuple(news[c] for c in ix.columns)
        assert spec.label == f"patients.{ix.name}" and spec.bits == ix.bits
        assert ns["LEGACY_SOURCES"][ix.name] == ix.columns
    # The final model: the sealed columns under the legacy names, strict, same labels.
    mod = types.ModuleType(f"scaffolded_{uuid.uuid4().hex}")
    sys.modules[mod.__name__] = mod
    try:
        exec(compile(sc.final, f"{mod.__name__}.py", "exec"), mod.__dict__)  # noqa: S102
    finally:
        del sys.modules[mod.__name__]
    final = getattr(mod, sc.final_class).__table__
    assert not any(c.endswith("_x") for c in final.c.keys())
    for c in cols:
        typ = final.c[c].type
        assert isinstance(typ, carnet.EncryptedText) and typ.label == f"patients.{c}"
        assert not typ.mixed_read
        assert typ.storage == ("binary" if c in into else "text")
    for ix in sc.indexes:
        spec = final.c[ix.name].type.index_spec
        assert spec.sources == ix.columns and spec.label == f"patients.{ix.name}"
        assert spec.bits == ix.bits
    # Every printed command names a column and index that the files declare.
    for cmd in sc.commands():
        words = shlex.split(cmd)
        assert words[words.index("--column") + 1] in cols
        for i, w in enumerate(words):
            if w == "--index":
                assert words[i + 1].rpartition(".")[2] in {ix.name for ix in sc.indexes}


def test_scaffold_with_the_practice_on_the_parent_row(
    engine: sa.Engine,
    db_url: str,
    db_kind: str,
    master_key_uri: str,
    tmp_path: Path,
    manager_for: Callable[[sa.Engine], carnet.KeyManager],
) -> None:
    """The example's consultations: the practice is the patient's, one foreign key up."""
    populate(engine, seed=4, practices_n=2, patients_n=8, consultations_n=30, lookalike=False)
    with engine.connect() as conn:
        before = dict(conn.execute(sa.text("SELECT id, comment FROM consultations")).all())
        reasons = dict(conn.execute(sa.text("SELECT id, reason FROM consultations")).all())
    module = f"consultations_migrating_{db_kind}"
    out = tmp_path / "gen"
    res = invoke(["migrate", "scaffold", "--table", "consultations", "--column", "comment",
                  "--column", "reason", "--into", "reason=reason_enc", "--tenant",
                  "patients.practice_id", "--module", module, "--out", str(out), "--json"],
                 db_url)  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["tenant"] == "patients.practice_id"
    script = alembic_dir(tmp_path, [doc["files"]["expand"], doc["files"]["contract"]])
    alembic(script, db_url, doc["revisions"]["expand"])
    # The parent's checks from the expand on: a value must be well framed.
    assert plaintext_refused_in(engine, "consultations", "reason_enc", b"motif en clair")
    sys.path.insert(0, str(out))
    try:
        gen = importlib.import_module(module)
        keys = manager_for(engine)
        with Session(engine) as s:
            c = s.get(gen.MigratingConsultations, 2)
            c.comment = "réécrit pendant la migration"
            c.write_reason("contrôle")
            s.commit()
        before[2], reasons[2] = "réécrit pendant la migration", "contrôle"
        carnet.configure(None)
        for words in (shlex.split(cmd)[1:] for cmd in doc["next"]):
            res = invoke([*words, "--json"], db_url, master_key_uri)
            assert res.exit_code == 0, f"{words}\n{res.output}"
    finally:
        sys.path.remove(str(out))
        sys.modules.pop(module, None)
    alembic(script, db_url, "heads")
    assert plaintext_refused_in(engine, "consultations", "comment", "note en clair")
    # The parent's own check survived the contract's table copy (SQLite): a patient
    # whose consultations are sealed for a practice cannot move to another.
    with engine.connect() as conn:
        pid = conn.execute(sa.text("SELECT patient_id FROM consultations WHERE id = 2")).scalar()
        conn.rollback()
        trans = conn.begin()
        with pytest.raises((sa.exc.DBAPIError, CarnetError)):
            conn.execute(
                sa.text("UPDATE patients SET practice_id = practice_id + 1 WHERE id = :p"),
                {"p": pid},
            )
        trans.rollback()
    sys.path.insert(0, str(out))
    try:
        final = importlib.import_module(f"{module}_final").Consultations
        carnet.configure(keys)
        with Session(engine) as s:
            rows = s.scalars(sa.select(final)).all()
            assert {r.id: r.comment for r in rows} == before
            assert {r.id: r.reason for r in rows} == reasons
        carnet.configure(None)
    finally:
        sys.path.remove(str(out))
        sys.modules.pop(f"{module}_final", None)
    with engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT comment FROM consultations")).scalars().all()
    assert all(v is None or v.startswith("carnet:") for v in raw)
