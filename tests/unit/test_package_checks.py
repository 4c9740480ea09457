"""tests/package/pkgtest.py's archive checks fail on a bad package (make test-package).

A wheel and an sdist are written by hand here: one laid out as the real
ones are passes; each defect the checks exist for (no py.typed, test files
in the wheel, a cited vector missing from the sdist, no licence) fails.
"""

from __future__ import annotations

import importlib.util
import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from support.paths import ROOT

META = (
    "Metadata-Version: 2.4\nName: carnet\nLicense-Expression: Apache-2.0\nRequires-Python: >=3.10\n"
)


def _pkgtest() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "pkgtest", ROOT / "tests" / "package" / "pkgtest.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _wheel_files() -> dict[str, str]:
    return {
        "carnet/__init__.py": "",
        "carnet/py.typed": "",
        "carnet-0.1.0.dist-info/METADATA": META,
        "carnet-0.1.0.dist-info/licenses/LICENSE": "Apache License",
    }


def _sdist_files() -> dict[str, str]:
    files = {"LICENSE": "", "CHANGELOG.md": "", "pyproject.toml": ""}
    for p in (ROOT / "tests" / "vectors").rglob("*"):
        if p.is_file():
            files[str(p.relative_to(ROOT))] = ""
    for p in (ROOT / "tests" / "unit").glob("test_*.py"):
        files[str(p.relative_to(ROOT))] = ""
    return files


def _write(dist: Path, wheel: dict[str, str], sdist: dict[str, str]) -> None:
    dist.mkdir()
    with zipfile.ZipFile(dist / "carnet-0.1.0-py3-none-any.whl", "w") as z:
        for name, text in wheel.items():
            z.writestr(name, text)
    with tarfile.open(dist / "carnet-0.1.0.tar.gz", "w:gz") as t:
        for name, text in sdist.items():
            data = text.encode()
            info = tarfile.TarInfo(f"carnet-0.1.0/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_a_package_laid_out_as_built_passes(tmp_path: Path) -> None:
    _write(tmp_path / "dist", _wheel_files(), _sdist_files())
    _pkgtest().check(tmp_path / "dist")


def _no_py_typed(w: dict[str, str], s: dict[str, str]) -> None:
    del w["carnet/py.typed"]


def _tests_in_wheel(w: dict[str, str], s: dict[str, str]) -> None:
    w["tests/conftest.py"] = ""


def _support_in_wheel(w: dict[str, str], s: dict[str, str]) -> None:
    w["support/__init__.py"] = ""


def _no_vectors(w: dict[str, str], s: dict[str, str]) -> None:
    del s["tests/vectors/carnet_v2.json"]


def _no_wycheproof(w: dict[str, str], s: dict[str, str]) -> None:
    for name in [n for n in s if n.startswith("tests/vectors/wycheproof/")]:
        del s[name]


def _no_licence(w: dict[str, str], s: dict[str, str]) -> None:
    del w["carnet-0.1.0.dist-info/licenses/LICENSE"]


def _other_licence(w: dict[str, str], s: dict[str, str]) -> None:
    w["carnet-0.1.0.dist-info/METADATA"] = META.replace("Apache-2.0", "MIT")


@pytest.mark.parametrize(
    "defect",
    [
        _no_py_typed,
        _tests_in_wheel,
        _support_in_wheel,
        _no_vectors,
        _no_wycheproof,
        _no_licence,
        _other_licence,
    ],
)
def test_each_defect_fails(
    tmp_path: Path, defect: Callable[[dict[str, str], dict[str, str]], None]
) -> None:
    wheel, sdist = _wheel_files(), _sdist_files()
    defect(wheel, sdist)
    _write(tmp_path / "dist", wheel, sdist)
    with pytest.raises(SystemExit) as ei:
        _pkgtest().check(tmp_path / "dist")
    assert ei.value.code == 1
