"""docs/providers.md's headless keyring walkthrough, run as written in a throw-away home."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import ROOT


def headless_block() -> str:
    text = (ROOT / "docs" / "providers.md").read_text(encoding="utf-8")
    block = text.split("<!-- keyring-headless:start -->")[1].split("<!-- keyring-headless:end -->")[
        0
    ]
    return block.strip().removeprefix("```sh").removesuffix("```")


@pytest.mark.skipif(
    not (shutil.which("dbus-run-session") and shutil.which("gnome-keyring-daemon")),
    reason="needs dbus-run-session and gnome-keyring-daemon",
)
def test_headless_keyring_walkthrough(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run = tmp_path / "run"
    home.mkdir()
    run.mkdir(mode=0o700)
    # Nothing of the user's own session: a new home, runtime directory and bus.
    env = {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(run),
        "PYTHONPATH": str(ROOT / "src"),
        "KEYRING_PASSWORD": "walkthrough-password",
    }
    r = subprocess.run(
        ["sh", "-c", headless_block()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "created master key keyring://carnet/master" in r.stdout
    assert "cabinet-lyon-3: now v1" in r.stdout
    keyrings = list((home / ".local" / "share" / "keyrings").glob("*.keyring"))
    assert keyrings  # the key went to the Secret Service's store, in this home only
    assert b"carnet-master-key-v1" not in b"".join(p.read_bytes() for p in keyrings)
