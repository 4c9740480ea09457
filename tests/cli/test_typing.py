"""carnet's types as type checkers see them: mypy --strict and pyright (strict mode).

Both checkers run as subprocesses, over tests/typing/search_types.py (search
generic in the model, a BlindIndex attribute typed as what it holds) and
over the Python examples of README.md, docs/quickstart.md,
docs/searchable.md and docs/data-shapes.md as a reader copies them. They check ``src/`` of this
checkout, not an installed carnet. A file with a wrong ``assert_type`` must
fail under both, so a checker that silently sees ``Any`` cannot pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import ROOT

TYPING = ROOT / "tests" / "typing"
SRC = ROOT / "src"
BIN = Path(sys.executable).parent

BLOCK = re.compile(
    r"(?:<!--\s*(?P<mark>illustrative|example)[^>]*-->\s*\n)?```python[^\n]*\n(?P<code>.*?)```",
    re.S,
)

# What a page's examples take from its prose: declared with their types, as
# the reader's application has them (after the page's first block).
PREAMBLE = {
    "searchable.md": (
        "from sqlalchemy.orm import Session\n"
        "engine: sa.Engine = sa.create_engine('sqlite://')\n"
        "keys: carnet.KeyManager = carnet.KeyManager(engine, master_key='file:///m.key')\n"
        "old_root_key_id: bytes = bytes(16)\n"
    ),
}
# What the examples' results are, checked after them.
AFTER = {
    "data-shapes.md": (
        "from typing_extensions import assert_type\n"
        "def read_back(row: Letter) -> None:\n"
        "    assert_type(row.scan, bytes | None)\n"
        "    assert_type(row.vitals, dict[str, Any] | None)\n"
        "    assert_type(row.codes, list[Any] | None)\n"
    ),
    "searchable.md": (
        "from typing_extensions import assert_type\n"
        "assert_type(found, list[Patient])\n"
        "assert_type(named, list[Patient])\n"
        "assert_type(Patient.phone_bidx, carnet.searchable.BlindIndexAttribute[Patient])\n"
    ),
}


def _checker(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (pip install -e '.[dev]')", pytrace=False)
    return found


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    env["MYPYPATH"] = str(SRC)  # this checkout's carnet, before any installed one
    return env


def mypy(files: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    # A config of its own: the project's [tool.mypy] checks src/carnet. carnet's
    # own errors are ignored, as for an installed package: the user's code is judged.
    config = cwd / "mypy.ini"
    config.write_text(
        "[mypy]\nstrict = True\ncache_dir = .mypy_cache\n[mypy-carnet.*]\nignore_errors = True\n",
        encoding="utf-8",
    )
    return subprocess.run(
        [_checker("mypy"), "--config-file", str(config), *map(str, files)],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def pyright(files: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    config = cwd / "pyrightconfig.json"
    config.write_text(
        json.dumps(
            {
                "typeCheckingMode": "strict",
                # A page's blocks are joined into one file; each imports what it uses.
                "reportDuplicateImport": False,
                "extraPaths": [str(SRC)],
                "pythonVersion": f"{sys.version_info.major}.{sys.version_info.minor}",
            }
        ),
        encoding="utf-8",
    )
    return subprocess.run(
        [_checker("pyright"), "-p", str(config), "--pythonpath", sys.executable]
        + [str(f) for f in files],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _both(files: list[Path], cwd: Path) -> tuple[subprocess.CompletedProcess[str], ...]:
    return mypy(files, cwd), pyright(files, cwd)


def test_search_is_generic_and_blind_index_typed(tmp_path: Path) -> None:
    snippet = tmp_path / "search_types.py"
    shutil.copy(TYPING / "search_types.py", snippet)
    m, p = _both([snippet], tmp_path)
    assert m.returncode == 0, m.stdout + m.stderr
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 errors" in p.stdout


def test_a_wrong_type_fails_under_both(tmp_path: Path) -> None:
    # The same snippet with the model swapped in one assertion: both checkers
    # must see carnet's types (not Any) to reject it.
    text = (TYPING / "search_types.py").read_text(encoding="utf-8")
    right = 'assert_type(carnet.search(session, Letter.phone_index, "0612345678", tenant="p1"), '
    assert right + "list[Letter])" in text
    wrong = tmp_path / "wrong.py"
    wrong.write_text(text.replace(right + "list[Letter])", right + "list[Note])"), "utf-8")
    wrong_row = tmp_path / "wrong_row.py"
    wrong_row.write_text(
        text.replace(
            "assert_type(note.phone_index, int | None)", "assert_type(note.phone_index, int)"
        ),
        "utf-8",
    )
    for f in (wrong, wrong_row):
        m, p = _both([f], tmp_path)
        assert m.returncode != 0 and "assert-type" in m.stdout, m.stdout
        assert p.returncode != 0 and "reportAssertTypeFailure" in p.stdout, p.stdout


def _doc_module(doc: Path) -> str:
    code = [
        c.group("code")
        for c in BLOCK.finditer(doc.read_text(encoding="utf-8"))
        if c.group("mark") is None and not c.group("code").lstrip().startswith(">>>")
    ]
    assert code, doc
    # The first block imports what the preamble uses.
    first, rest = code[0], code[1:]
    return "\n\n".join([first, PREAMBLE.get(doc.name, ""), *rest, AFTER.get(doc.name, "")])


def test_docs_examples_pass_both_checkers(tmp_path: Path) -> None:
    files = []
    for doc in (
        ROOT / "README.md",
        ROOT / "docs" / "quickstart.md",
        ROOT / "docs" / "searchable.md",
        ROOT / "docs" / "data-shapes.md",
    ):
        f = tmp_path / f"doc_{doc.stem.lower()}.py"
        f.write_text(_doc_module(doc), encoding="utf-8")
        files.append(f)
    m, p = _both(files, tmp_path)
    assert m.returncode == 0, m.stdout + m.stderr
    assert p.returncode == 0, p.stdout + p.stderr
