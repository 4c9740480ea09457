"""Third-party master-key providers through the ``carnet.master_keys`` entry-point group.

The provider installed here is the example printed in docs/providers.md,
read from the file, so the documented example is known to work.
"""

from __future__ import annotations

import base64
import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from carnet.errors import ConfigurationError, MasterKeyMismatch
from carnet.providers import create_master_key, open_master_key
from carnet.providers.base import MasterKey
from support.paths import ROOT

DOC = ROOT / "docs" / "providers.md"
CTX = {"tenant": "practice-1", "key_id": "00112233445566778899aabbccddeeff"}


def doc_example(name: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"<!-- example: {re.escape(name)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert match, f"docs/providers.md lost its {name} example"
    return match.group(1)


def entry_points_txt(pyproject: str) -> str:
    """The entry_points.txt that an installer writes for the pyproject's entry points."""
    section = re.search(
        r'\[project\.entry-points\."carnet\.master_keys"\]\n(.*?)(?:\n\[|\Z)', pyproject, re.S
    )
    assert section
    lines = [
        re.sub(r'\s*=\s*"(.*)"', r" = \1", line) for line in section.group(1).strip().splitlines()
    ]
    return "[carnet.master_keys]\n" + "\n".join(lines) + "\n"


def install_distribution(
    root: Path, name: str, version: str, modules: dict[str, str], entry_points: str
) -> None:
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source, encoding="utf-8")
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(entry_points, encoding="utf-8")


@pytest.fixture
def envkey_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    install_distribution(
        tmp_path,
        "carnet-envkey",
        "1.0",
        {"carnet_envkey": doc_example("carnet_envkey.py")},
        entry_points_txt(doc_example("pyproject.toml")),
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop("carnet_envkey", None)


def test_entry_point_provider_opens_by_uri(
    envkey_plugin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_MASTER_SECRET", base64.b64encode(b"s" * 32).decode())
    key = open_master_key("envkey://TEST_MASTER_SECRET")
    assert isinstance(key, MasterKey)
    assert type(key).__module__ == "carnet_envkey"
    assert key.uri == "envkey://TEST_MASTER_SECRET"
    dek = bytes(range(32))
    wrapped = key.wrap(dek, CTX)
    assert key.unwrap(wrapped, CTX) == dek
    with pytest.raises(MasterKeyMismatch):
        key.unwrap(wrapped, {**CTX, "tenant": "practice-2"})


def test_entry_point_provider_create(envkey_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Set then unset, so that monkeypatch removes what create() will write.
    monkeypatch.setenv("TEST_NEW_SECRET", "placeholder")
    monkeypatch.delenv("TEST_NEW_SECRET")
    made = create_master_key("envkey://TEST_NEW_SECRET")
    assert open_master_key(made.uri).unwrap(made.wrap(b"k" * 32, CTX), CTX) == b"k" * 32


def test_entry_point_provider_validates_at_construction(
    envkey_plugin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = base64.b64encode(b"planted-secret-short").decode()
    monkeypatch.setenv("TEST_BAD_SECRET", planted)
    with pytest.raises(ConfigurationError) as info:
        open_master_key("envkey://TEST_BAD_SECRET")
    assert planted not in str(info.value)


def test_unknown_scheme_lists_the_plugins(envkey_plugin: Path) -> None:
    with pytest.raises(ConfigurationError, match="envkey"):
        open_master_key("nosuchscheme://x")


def test_without_the_distribution_the_scheme_is_unknown() -> None:
    with pytest.raises(ConfigurationError, match="unknown master key scheme"):
        open_master_key("envkey://X")


def test_entry_point_must_name_a_master_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_distribution(
        tmp_path,
        "carnet-bogus",
        "0.1",
        {"carnet_bogus": "class NotAKey:\n    pass\n"},
        "[carnet.master_keys]\nbogus = carnet_bogus:NotAKey\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    try:
        with pytest.raises(ConfigurationError, match="not a carnet MasterKey"):
            open_master_key("bogus://x")
    finally:
        sys.modules.pop("carnet_bogus", None)


def test_builtin_schemes_cannot_be_taken_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_distribution(
        tmp_path,
        "carnet-hijack",
        "0.1",
        {"carnet_hijack": "raise RuntimeError('must not be imported')\n"},
        "[carnet.master_keys]\nfile = carnet_hijack:Evil\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    with pytest.raises(ConfigurationError, match="does not exist"):
        open_master_key(f"file://{tmp_path}/absent.key")
    assert "carnet_hijack" not in sys.modules
