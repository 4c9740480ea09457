"""The layout docs/development.md describes, held by reading the source.

One engine factory (``_engines.make_engine``), one ``module:attr`` loader
(``_loader.py``), nothing in the core importing ``migrate/``, one ``keys``
fixture (tests/conftest.py), and a unit tier that runs no command: each rule
is a place a newcomer is told to look, so a second copy elsewhere is a bug.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.paths import ROOT

SRC = ROOT / "src" / "carnet"
TESTS = ROOT / "tests"


def _modules(root: Path) -> Iterator[tuple[Path, ast.Module]]:
    for path in sorted(root.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def _called(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines calling a function of one of ``names`` (``f(...)`` or ``x.f(...)``)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in names:
                lines.append(node.lineno)
    return lines


def _imported(path: Path, tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports, absolute (``carnet.migrate.run``)."""
    package = ["carnet", *path.relative_to(SRC).parts[:-1]]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            for alias in node.names:  # from . import migrate
                yield node.lineno, f"{module}.{alias.name}"


@pytest.mark.parametrize(
    ("owner", "calls"),
    [
        # Engines are made by carnet._engines.make_engine only.
        ("_engines.py", {"create_engine", "create_async_engine"}),
        # module:attr specs are loaded by carnet._loader only.
        ("_loader.py", {"import_module", "__import__"}),
    ],
)
def test_one_place_makes_engines_and_one_loads_named_code(owner: str, calls: set[str]) -> None:
    found = [
        f"{path.relative_to(SRC)}:{line}"
        for path, tree in _modules(SRC)
        if path.name != owner
        for line in _called(tree, calls)
    ]
    assert found == [], f"only {owner} calls {sorted(calls)}"


def test_nothing_in_the_core_imports_the_migration() -> None:
    # The command line mounts `carnet migrate`; nothing else outside migrate/
    # may depend on it (the migration builds on the core, never the reverse).
    found = [
        f"{path.relative_to(SRC)}:{line} {name}"
        for path, tree in _modules(SRC)
        if path.relative_to(SRC).parts[0] != "migrate" and path.name != "cli.py"
        for line, name in _imported(path, tree)
        if name == "carnet.migrate" or name.startswith("carnet.migrate.")
    ]
    assert found == []


def test_the_keys_fixture_is_defined_once() -> None:
    def fixtures(tree: ast.AST) -> Iterator[tuple[int, str]]:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for dec in node.decorator_list:
                    target = dec.func if isinstance(dec, ast.Call) else dec
                    if "fixture" in ast.unparse(target):
                        yield node.lineno, node.name

    defined = [
        f"{path.relative_to(TESTS)}:{line}"
        for path, tree in _modules(TESTS)
        for line, name in fixtures(tree)
        if name == "keys"
    ]
    assert [d.split(":")[0] for d in defined] == ["conftest.py"], defined


def test_the_unit_tier_runs_no_command_and_no_docs_example() -> None:
    # tests/unit is the quick loop (make test-fast): a test that runs carnet's
    # command line or a docs example in a subprocess belongs to tests/cli or
    # tests/docs. A fresh interpreter to see an import as a new process does
    # is allowed.
    found = []
    for path, tree in _modules(TESTS / "unit"):
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef):
                continue
            text = ast.unparse(node)
            runs = "subprocess." in text
            if runs and ("'carnet'" in text or "'docs'" in text):
                found.append(f"{path.relative_to(TESTS)}::{node.name}")
    assert found == []


def test_private_names_crossing_modules_are_the_documented_ones() -> None:
    # docs/development.md lists every place one module reaches into another's
    # private names; a new one is either a layout to fix or a line to add there.
    doc = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    listed = doc.split("<!-- private:start -->")[1].split("<!-- private:end -->")[0]
    documented = set(re.findall(r"`(\w+\._\w+)`", listed))
    names = "context|manager|keys|store|cache|typ|orm|searchable|lifecycle"
    pattern = re.compile(rf"\b(?:{names})\._[a-z]\w*")
    used = {
        m.group(0)
        for path in SRC.rglob("*.py")
        for m in pattern.finditer(path.read_text(encoding="utf-8"))
    }
    assert used == documented
