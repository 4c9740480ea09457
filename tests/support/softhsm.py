"""A real HSM for the tests: SoftHSM2 with tokens in a private temporary directory.

``SOFTHSM2_CONF`` points at a softhsm2.conf written here with its own
``tokendir``, so the tests never see or touch a system token. SoftHSM reads
that file when the library is initialised, and a PKCS#11 library is loaded
once per process, so the environment is set for the whole session before
anything loads the module.

Used as a pytest plugin (``pytest_plugins = ("softhsm",)``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "carnet-test"
USER_PIN = "4711-test-pin"
SO_PIN = "so-pin-0000"


@dataclass(frozen=True)
class SoftHsm:
    module: str
    token: str
    pin: str
    tokendir: Path

    def uri(self, key_label: str, **options: str) -> str:
        query = "&".join([f"module={self.module}", *(f"{k}={v}" for k, v in options.items())])
        return f"pkcs11://{quote(self.token, safe='')}/{quote(key_label, safe='')}?{query}"


def find_module() -> str | None:
    for path in MODULE_CANDIDATES:
        if os.path.isfile(path):
            return path
    return None


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """An initialised SoftHSM2 token; ``CARNET_PKCS11_PIN`` holds its user PIN."""
    pytest.importorskip("pkcs11")
    module = find_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2)")
    root = tmp_path_factory.mktemp("softhsm")
    tokendir = root / "tokens"
    tokendir.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    saved = {name: os.environ.get(name) for name in ("SOFTHSM2_CONF", "CARNET_PKCS11_PIN")}
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN, "--so-pin", SO_PIN, "--pin", USER_PIN],
        check=True,
        capture_output=True,
    )
    os.environ["CARNET_PKCS11_PIN"] = USER_PIN
    yield SoftHsm(module=module, token=TOKEN, pin=USER_PIN, tokendir=tokendir)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def hsm_master(softhsm: SoftHsm) -> str:
    """URI of a master key created on the token by carnet itself."""
    from carnet.providers.pkcs11 import Pkcs11MasterKey

    uri = softhsm.uri("master-a")
    Pkcs11MasterKey.create(uri)
    return uri


@pytest.fixture
def hsm_pin(softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> str:
    """The user PIN in ``CARNET_PKCS11_PIN`` for this test (restored afterwards)."""
    monkeypatch.setenv("CARNET_PKCS11_PIN", softhsm.pin)
    return softhsm.pin
