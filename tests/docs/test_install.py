"""The install instructions work: a wheel built from the checkout, installed in a new venv.

The wheel (and a git URL install) go into a brand-new virtual environment,
and `import carnet` and `carnet --help` run from there, away from the source
tree. The dependencies come from the environment running the tests (a path
entry, so nothing is downloaded for them); the wheel itself is installed
with --ignore-installed, which never touches that environment.
"""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import ROOT

EXTRAS = ("postgres", "mysql", "aws", "pkcs11", "alembic", "asyncio")

pytestmark = pytest.mark.slow


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _wheel(tmp_path: Path) -> Path:
    out = tmp_path / "wheels"
    r = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", out, ROOT, cwd=tmp_path)
    if r.returncode != 0:
        # Build isolation fetches hatchling from the package index.
        pytest.skip(f"cannot build the wheel here (no package index?): {r.stderr[-300:]}")
    (wheel,) = out.glob("carnet-*.whl")
    return wheel


def _venv(tmp_path: Path, name: str) -> Path:
    venv = tmp_path / name
    assert _run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    py = venv / "bin" / "python"
    purelib = _run(
        py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
    ).stdout.strip()
    # The test environment's packages as a path entry: dependencies resolve
    # without a download, and its own .pth files (an editable carnet) are not run.
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (Path(purelib) / "zz_test_deps.pth").write_text("\n".join(deps) + "\n")
    return venv


def _check_installed(venv: Path, where: Path) -> None:
    py = venv / "bin" / "python"
    r = _run(py, "-c", "import carnet, sys; print(carnet.__file__)", cwd=where)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(venv)), r.stdout  # the installed copy, not src/
    r = _run(venv / "bin" / "carnet", "--help", cwd=where)
    assert r.returncode == 0, r.stderr
    assert "doctor" in r.stdout and "reencrypt" in r.stdout
    # Every documented extra is declared, and what it asks for is installable here.
    code = (
        "import importlib.metadata as m, re\n"
        "d = m.distribution('carnet')\n"
        "reqs = d.requires or []\n"
        f"for extra in {EXTRAS!r}:\n"
        "    mine = [r for r in reqs if re.search(r'extra == .' + extra + '.', r)]\n"
        "    assert mine, extra\n"
        "    for r in mine:\n"
        "        name = re.split(r'[ \\[<>=;!~]', r, maxsplit=1)[0]\n"
        "        m.version(name)\n"
        "print('extras ok')\n"
    )
    r = _run(py, "-c", code, cwd=where)
    assert r.returncode == 0 and "extras ok" in r.stdout, r.stderr


def test_wheel_installs_in_a_fresh_venv(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path)
    venv = _venv(tmp_path, "fresh")
    r = _run(
        venv / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--ignore-installed",
        wheel,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _check_installed(venv, elsewhere)


def test_git_url_install(tmp_path: Path) -> None:
    if _run("git", "-C", ROOT, "rev-parse", "HEAD", cwd=tmp_path).returncode != 0:
        pytest.skip("not a git checkout")
    venv = _venv(tmp_path, "fromgit")
    # The documented form, `carnet[EXTRAS] @ git+URL`, with the checkout as the URL.
    spec = f"carnet[{','.join(EXTRAS)}] @ git+file://localhost{ROOT}"
    r = _run(
        venv / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--ignore-installed",
        spec,
        cwd=tmp_path,
    )
    if r.returncode != 0 and re.search(r"hatchling|index|connect", r.stderr, re.I):
        pytest.skip(f"cannot build from git here (no package index?): {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _check_installed(venv, elsewhere)


def test_documented_install_commands_name_every_extra() -> None:
    text = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "pip install carnet\n" not in install  # not on PyPI
    for extra in EXTRAS:
        assert f"[{extra}]" in install or f",{extra}" in install or f"{extra}," in install, extra
    assert "git+" in install and "pip install '.[" in install
