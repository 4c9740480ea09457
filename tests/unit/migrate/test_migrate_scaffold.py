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

import datetime as dt
import importlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from sqlalchemy.orm import Session

import carnet
from carnet.cli import cli as carnet_cli
from carnet.errors import InvalidCiphertext
from support.paths import EXAMPLES

sys.path.insert(0, str(EXAMPLES))

from legacy_practice import app as legacy_app  # noqa: E402
from legacy_practice.generate import populate  # noqa: E402

IDENTIFIERS = ["phone", "last_name", "first_name", "birth_date"]
# The example's indexes, spelt for scaffold: same transforms, same bits.
INDEXES = [
    f"phone_bidx=phone:phone_fr:{legacy_app.PHONE_BITS}",
    f"name_bidx=first_name,last_name:initial_lastname:{legacy_app.NAME_BITS}",
    f"birth_date_bidx=birth_date:date_iso:{legacy_app.BIRTH_BITS}",
]


def scaffold_args(out: Path, module: str, *extra: str) -> list[str]:
    args = ["migrate", "scaffold", "--table", "patients", "--tenant", "practice_id"]
    for c in IDENTIFIERS:
        args += ["--column", c, "--into", f"{c}={c}_enc"]
    for ix in INDEXES:
        args += ["--index", ix]
    return [*args, "--model-class", "MigratingPatient", "--module", module, "--out", str(out),
            *extra]  # fmt: skip


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
    """True when the database itself refuses ``value`` in ``patients.column`` (rolled back)."""
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            conn.execute(sa.text(f"UPDATE patients SET {column} = :v WHERE id = 1"), {"v": value})
        except (sa.exc.DBAPIError, InvalidCiphertext):
            # carnet names the refusal of its checks (errors.InvalidCiphertext)
            return True
        finally:
            trans.rollback()
    return False


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
    assert len(seen["gen"]) == 30
    assert all(isinstance(r[4], dt.date) for r in seen["gen"])
    assert [r for r in seen["gen"] if r[0] == 5][0][5] == "01 99 00 77 66"
    eng_gen.dispose()
    eng_ex.dispose()


def test_generated_files_pass_the_project_linters(
    engine: sa.Engine, db_url: str, tmp_path: Path
) -> None:
    populate(engine, seed=3, practices_n=2, patients_n=5, consultations_n=0, lookalike=False)
    out = tmp_path / "gen"
    res = invoke(scaffold_args(out, "patients_lint"), db_url)
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
        [str(mypy), "--strict", "--no-incremental", "--cache-dir", "/dev/null",
         str(out / "patients_lint.py")],
    ):  # fmt: skip
        env = {**os.environ, "MYPYPATH": str(root / "src")}
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
