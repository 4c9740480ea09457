"""The package as released: `make test-package` and `make test-pythons`.

    pkgtest.py check DIST                     what the wheel and the sdist carry
    pkgtest.py smoke DIST --python PY         the wheel in a brand-new virtualenv,
                                              `carnet demo` and smoke.py run from it
    pkgtest.py pythons DIST --versions 3.10 3.12 --tests FILE...
                                              the wheel under other Pythons, with
                                              a subset of the unit tests

Nothing here imports carnet: each check runs the installed wheel in a
virtualenv of its own, from a directory outside the checkout, so a file
missing from the package fails instead of being found in src/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PYENV_ROOT = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
# The extras the unit tests need under another Python (drivers of the three databases).
TEST_EXTRAS = "postgres,mysql"
TEST_DEPS = ["pytest", "pytest-timeout", "hypothesis"]


def fail(msg: str) -> None:
    print(f"pkgtest: {msg}", file=sys.stderr)
    raise SystemExit(1)


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        fail(f"expected one {pattern} in {dist}, found {[p.name for p in found]}")
    return found[0]


def wheel_of(dist: Path) -> Path:
    return _one(dist, "carnet-*-py3-none-any.whl")


def sdist_of(dist: Path) -> Path:
    return _one(dist, "carnet-*.tar.gz")


def _clean_env() -> dict[str, str]:
    # Nothing of the calling environment's Python setup leaks into the new one.
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(cmd: list[str | Path], cwd: Path, **kw: Any) -> None:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), check=False, **kw)
    if r.returncode != 0:
        fail(f"{' '.join(map(str, cmd))} exited {r.returncode}")


# -- what the archives carry ---------------------------------------------------------------


def cited_paths(doc: Path) -> list[str]:
    """The tests/ paths a document cites (files, or directories ending in /)."""
    return sorted(set(re.findall(r"tests/[A-Za-z0-9_./-]*[A-Za-z0-9_/]", doc.read_text("utf-8"))))


def check(dist: Path) -> None:
    wheel, sdist = wheel_of(dist), sdist_of(dist)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
    problems = []
    if "carnet/py.typed" not in names:
        problems.append("wheel: carnet/py.typed missing (type checkers would ignore carnet)")
    strays = [n for n in names if not (n.startswith(("carnet/", "carnet-")))]
    strays += [n for n in names if "/tests/" in n or n.startswith(("tests/", "support/"))]
    if strays:
        problems.append(f"wheel: files outside the carnet package: {strays[:5]}")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        problems.append("wheel: LICENSE missing from the dist-info")
    for field in ("License-Expression: Apache-2.0", "Requires-Python: >=3.10"):
        if field not in meta:
            problems.append(f"wheel METADATA: no {field!r}")
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        members = {n.removeprefix(top + "/") for n in t.getnames()}
    for path in cited_paths(ROOT / "docs" / "format.md") + ["LICENSE", "CHANGELOG.md"]:
        if not (path in members or any(m.startswith(path.rstrip("/") + "/") for m in members)):
            problems.append(f"sdist: {path} missing (docs/format.md cites it)")
    vectors = sorted(p.name for p in (ROOT / "tests" / "vectors").glob("*.json"))
    for name in vectors:
        if f"tests/vectors/{name}" not in members:
            problems.append(f"sdist: tests/vectors/{name} missing")
    if problems:
        fail("package contents:\n  " + "\n  ".join(problems))
    print(
        f"pkgtest: {wheel.name}: {len(names)} files, py.typed, no tests; "
        f"{sdist.name}: {len(vectors)} vector files and what docs/format.md cites"
    )


# -- the wheel in a fresh virtualenv -------------------------------------------------------


def venv(python: str, where: Path) -> Path:
    run([python, "-m", "venv", where], cwd=where.parent)
    return where / "bin" / "python"


def smoke(dist: Path, python: str) -> None:
    wheel, sdist = wheel_of(dist), sdist_of(dist)
    with tempfile.TemporaryDirectory(prefix="carnet-pkg-") as tmp:
        tmpdir = Path(tmp)
        py = venv(python, tmpdir / "venv")
        # The wheel file, not the checkout: dependencies come from the index.
        run([py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel], tmpdir)
        with tarfile.open(sdist) as t:
            t.extractall(tmpdir / "sdist", filter="data")
        (vectors,) = (tmpdir / "sdist").glob("carnet-*/tests/vectors")
        work = tmpdir / "work"
        work.mkdir()
        shutil.copy(HERE / "smoke.py", work / "smoke.py")
        run([tmpdir / "venv" / "bin" / "carnet", "demo"], work, stdout=subprocess.DEVNULL)
        run([py, "smoke.py", vectors], work)
    print(
        f"pkgtest: {wheel.name} installed in a new virtualenv ({python}): demo and smoke test ran"
    )


# -- other Pythons -------------------------------------------------------------------------


def interpreter(version: str) -> str:
    """Python ``version`` (``3.12``): pyenv's newest patch release, else ``python3.12`` on PATH."""
    found = sorted(
        PYENV_ROOT.glob(f"versions/{version}.*/bin/python"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parts[-3])],
    )
    if found:
        return str(found[-1])
    on_path = shutil.which(f"python{version}")
    if on_path:
        return on_path
    fail(
        f"Python {version} not found (looked in {PYENV_ROOT}/versions and for python{version}): "
        f"install it, or leave it out of PY_VERSIONS and mark it untested in README.md"
    )
    raise AssertionError  # unreachable


def pythons(dist: Path, versions: list[str], tests: list[str]) -> None:
    wheel = wheel_of(dist)
    # Inside .venv: ignored by git and removed by `make clean`.
    base = ROOT / ".venv" / "pythons"
    deps = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    failed = []
    for version in versions:
        start = time.monotonic()
        python = interpreter(version)
        where = base / version
        stamp = where / ".stamp"
        if not stamp.exists() or stamp.read_text() != deps:
            shutil.rmtree(where, ignore_errors=True)
            where.parent.mkdir(parents=True, exist_ok=True)
            py = venv(python, where)
            run([py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], ROOT)
            run(
                [py, "-m", "pip", "install", "--quiet", f"{wheel}[{TEST_EXTRAS}]", *TEST_DEPS], ROOT
            )
            stamp.write_text(deps)
        py = where / "bin" / "python"
        # This build's wheel, whatever an earlier run installed.
        run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", wheel], ROOT)
        probe = subprocess.run(
            [
                py,
                "-c",
                "import carnet, json, sys; print(json.dumps([carnet.__file__, sys.version]))",
            ],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode != 0:
            fail(f"Python {version}: import carnet failed:\n{probe.stderr}")
        where_from, full = json.loads(probe.stdout)
        if not where_from.startswith(str(where)):
            fail(f"Python {version}: carnet imported from {where_from}, not the installed wheel")
        print(f"pkgtest: Python {full.split()[0]}: {len(tests)} test files", flush=True)
        r = subprocess.run(
            [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
            cwd=ROOT,
            env=_clean_env(),
            check=False,
        )
        took = time.monotonic() - start
        verdict = "passed" if r.returncode == 0 else "FAILED"
        print(f"pkgtest: Python {version}: {verdict} in {took:.0f}s")
        if r.returncode != 0:
            failed.append(version)
    if failed:
        fail(f"tests failed under Python {', '.join(failed)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("dist", type=Path)
    s = sub.add_parser("smoke")
    s.add_argument("dist", type=Path)
    s.add_argument("--python", default=sys.executable)
    p = sub.add_parser("pythons")
    p.add_argument("dist", type=Path)
    p.add_argument("--versions", nargs="+", required=True)
    p.add_argument("--tests", nargs="+", required=True)
    a = ap.parse_args()
    dist = a.dist.resolve()
    if a.cmd == "check":
        check(dist)
    elif a.cmd == "smoke":
        smoke(dist, a.python)
    else:
        pythons(dist, a.versions, a.tests)


if __name__ == "__main__":
    main()
