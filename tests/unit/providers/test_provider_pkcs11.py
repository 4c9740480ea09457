"""pkcs11:// master keys against a real software HSM (SoftHSM2)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from carnet.errors import ConfigurationError, MasterKeyMismatch
from carnet.providers import create_master_key, open_master_key
from carnet.providers.pkcs11 import Pkcs11MasterKey
from support.paths import ROOT

if TYPE_CHECKING:
    from support.softhsm import SoftHsm


DEK = b"planted-dek-0123456789abcdefghij"
CTX = {"tenant": "practice-1", "key_id": "00112233445566778899aabbccddeeff"}
SRC = str(ROOT / "src")


@pytest.fixture(scope="module")
def second_master(softhsm: SoftHsm) -> str:
    uri = softhsm.uri("master-b")
    create_master_key(uri)
    return uri


def test_round_trip(hsm_master: str, hsm_pin: str) -> None:
    key = open_master_key(hsm_master)
    assert isinstance(key, Pkcs11MasterKey)
    wrapped = key.wrap(DEK, CTX)
    assert len(wrapped) == 1 + 12 + len(DEK) + 16
    assert wrapped[0] == 1
    assert DEK not in wrapped
    assert key.unwrap(wrapped, CTX) == DEK


def test_fresh_iv_per_wrap(hsm_master: str, hsm_pin: str) -> None:
    key = open_master_key(hsm_master)
    ivs = {key.wrap(DEK, CTX)[1:13] for _ in range(50)}
    assert len(ivs) == 50


def test_uri_is_canonical_without_pin_source_or_settings(
    softhsm: SoftHsm, hsm_master: str, hsm_pin: str
) -> None:
    key = open_master_key(hsm_master + "&pin-source=env:CARNET_PKCS11_PIN&lock_timeout=3")
    assert key.uri == hsm_master
    assert key.settings["lock_timeout"] == 3
    spaced = softhsm.uri("label with space/and slash")
    made = create_master_key(spaced)
    assert made.uri == spaced
    assert "%20" in made.uri and "%2F" in made.uri
    assert open_master_key(made.uri).unwrap(made.wrap(DEK, CTX), CTX) == DEK


@pytest.mark.parametrize(
    "other",
    [
        {"tenant": "practice-2", "key_id": CTX["key_id"]},
        {"tenant": CTX["tenant"], "key_id": "ff" * 16},
    ],
)
def test_context_is_bound(hsm_master: str, hsm_pin: str, other: dict[str, str]) -> None:
    key = open_master_key(hsm_master)
    with pytest.raises(MasterKeyMismatch):
        key.unwrap(key.wrap(DEK, CTX), other)


def test_wrap_from_another_master_key(hsm_master: str, second_master: str, hsm_pin: str) -> None:
    first, second = open_master_key(hsm_master), open_master_key(second_master)
    with pytest.raises(MasterKeyMismatch):
        second.unwrap(first.wrap(DEK, CTX), CTX)


def test_every_byte_of_the_blob_is_authenticated(hsm_master: str, hsm_pin: str) -> None:
    key = open_master_key(hsm_master)
    wrapped = key.wrap(DEK, CTX)
    for i in range(len(wrapped)):
        bad = bytearray(wrapped)
        bad[i] ^= 0x80
        with pytest.raises(MasterKeyMismatch):
            key.unwrap(bytes(bad), CTX)
    for cut in (b"", wrapped[:1], wrapped[:29], wrapped[:-1], wrapped + b"\0"):
        with pytest.raises(MasterKeyMismatch):
            key.unwrap(cut, CTX)
    # The key still works after all those failures (no session left poisoned).
    assert key.unwrap(wrapped, CTX) == DEK


def test_created_key_is_non_extractable(softhsm: SoftHsm, hsm_master: str, hsm_pin: str) -> None:
    key = open_master_key(hsm_master)
    assert isinstance(key, Pkcs11MasterKey)
    attrs = key.key_attributes()
    assert attrs["extractable"] is False
    assert attrs["sensitive"] is True
    assert attrs["never_extractable"] is True
    assert attrs["always_sensitive"] is True
    assert attrs["value_len"] == 32
    # And asked directly through PKCS#11: the token refuses to reveal the value.
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    lib = pkcs11.lib(softhsm.module)
    session = lib.get_token(token_label=softhsm.token).open()
    try:
        obj = session.get_key(object_class=ObjectClass.SECRET_KEY, label="master-a")
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            obj[Attribute.VALUE]
        assert obj[Attribute.EXTRACTABLE] is False
        assert obj[Attribute.WRAP] is False
    finally:
        session.close()


def test_extractable_key_is_refused(softhsm: SoftHsm, hsm_pin: str, hsm_master: str) -> None:
    import pkcs11
    from pkcs11 import Attribute, KeyType

    open_master_key(hsm_master)  # logs this process in
    lib = pkcs11.lib(softhsm.module)
    session = lib.get_token(token_label=softhsm.token).open(rw=True)
    try:
        session.generate_key(
            KeyType.AES,
            256,
            label="leaky",
            store=True,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
    finally:
        session.close()
    with pytest.raises(ConfigurationError, match="extractable"):
        open_master_key(softhsm.uri("leaky"))


def test_create_refuses_to_overwrite(hsm_master: str, hsm_pin: str) -> None:
    with pytest.raises(ConfigurationError, match="already holds"):
        create_master_key(hsm_master)


@pytest.mark.parametrize(
    "uri",
    [
        "pkcs11://",
        "pkcs11://token-only",
        "pkcs11://tok/",
        "pkcs11://tok/a/b?module=/usr/lib/softhsm/libsofthsm2.so",
        "pkcs11://tok/key",
        "pkcs11://tok/key?module=relative.so",
        "pkcs11://tok/key?module=/nonexistent/lib.so",
        "pkcs11://tok/key?module=/usr/lib/softhsm/libsofthsm2.so&colour=blue",
        "pkcs11://tok/key?module=/usr/lib/softhsm/libsofthsm2.so&pin-source=stdin",
        "pkcs11://tok/key?module=/usr/lib/softhsm/libsofthsm2.so&lock_timeout=0",
    ],
)
def test_bad_uris(
    softhsm: SoftHsm, hsm_pin: str, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CARNET_PKCS11_MODULE", raising=False)
    with pytest.raises(ConfigurationError):
        open_master_key(uri)


def test_unknown_token_and_key(softhsm: SoftHsm, hsm_pin: str) -> None:
    with pytest.raises(ConfigurationError, match="no PKCS#11 token"):
        open_master_key(f"pkcs11://no-such-token/k?module={softhsm.module}")
    with pytest.raises(ConfigurationError, match="carnet master new"):
        open_master_key(softhsm.uri("no-such-key"))


def test_pin_in_uri_is_refused_and_not_echoed(softhsm: SoftHsm, hsm_pin: str) -> None:
    for option in ("pin-value", "pin"):
        with pytest.raises(ConfigurationError) as info:
            open_master_key(softhsm.uri("master-a", **{option: softhsm.pin}))
        assert softhsm.pin not in str(info.value) and softhsm.pin not in repr(info.value)


def test_missing_pin(hsm_master: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARNET_PKCS11_PIN")
    with pytest.raises(ConfigurationError, match="CARNET_PKCS11_PIN"):
        open_master_key(hsm_master)


def test_pin_sources(
    softhsm: SoftHsm, hsm_master: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CARNET_PKCS11_PIN")
    monkeypatch.setenv("HSM_PIN_FOR_TEST", softhsm.pin)
    key = open_master_key(hsm_master + "&pin-source=env:HSM_PIN_FOR_TEST")
    assert key.unwrap(key.wrap(DEK, CTX), CTX) == DEK
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    key = open_master_key(hsm_master + f"&pin-source=file:{pin_file}")
    assert key.unwrap(key.wrap(DEK, CTX), CTX) == DEK
    with pytest.raises(ConfigurationError, match="PIN file"):
        open_master_key(hsm_master + f"&pin-source=file:{tmp_path / 'absent'}")


def _fresh_process(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Login state is per process, so a wrong PIN only shows in a new one.
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC, **env},
        timeout=60,
    )


def test_wrong_pin_in_a_fresh_process(softhsm: SoftHsm, hsm_master: str) -> None:
    wrong = "wrong-pin-planted-7731"
    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.DEBUG)\n"
        "from carnet.providers import open_master_key\n"
        "from carnet.errors import ConfigurationError\n"
        "try:\n"
        f"    open_master_key({hsm_master!r})\n"
        "except ConfigurationError as exc:\n"
        "    print(type(exc).__name__, exc, repr(exc))\n"
    )
    result = _fresh_process(
        code, {"CARNET_PKCS11_PIN": wrong, "SOFTHSM2_CONF": os.environ["SOFTHSM2_CONF"]}
    )
    assert "rejected the PIN" in result.stdout
    assert wrong not in result.stdout + result.stderr
    assert softhsm.pin not in result.stdout + result.stderr


def test_missing_extra_names_the_install_command(softhsm: SoftHsm) -> None:
    code = (
        "import sys; sys.modules['pkcs11'] = None\n"
        "from carnet.providers import open_master_key\n"
        "from carnet.errors import MissingDependency\n"
        "try:\n"
        f"    open_master_key('pkcs11://t/k?module={softhsm.module}')\n"
        "except MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    out = _fresh_process(code, {}).stdout
    assert "pip install 'carnet[pkcs11]'" in out
    assert "python-pkcs11" in out


def test_threads_share_the_session_safely(
    hsm_master: str, second_master: str, hsm_pin: str
) -> None:
    keys = [open_master_key(hsm_master), open_master_key(second_master)]
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            key = keys[n % 2]
            for i in range(100):
                ctx = {"tenant": f"t{n}", "key_id": f"{i:032x}"}
                dek = os.urandom(32)
                assert key.unwrap(key.wrap(dek, ctx), ctx) == dek
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_no_pin_or_key_material_in_errors_or_logs(
    softhsm: SoftHsm,
    hsm_master: str,
    second_master: str,
    hsm_pin: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    key, other = open_master_key(hsm_master), open_master_key(second_master)
    wrapped = key.wrap(DEK, CTX)
    errors: list[Exception] = []
    for attempt in (
        lambda: other.unwrap(wrapped, CTX),
        lambda: key.unwrap(wrapped, {**CTX, "tenant": "x"}),
        lambda: key.unwrap(wrapped[:-3], CTX),
    ):
        with pytest.raises(MasterKeyMismatch) as info:
            attempt()
        errors.append(info.value)
    texts = [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [repr(key), str(key.key_attributes()), caplog.text]
    for text in texts:
        for secret in (softhsm.pin, DEK.decode(), DEK.hex()):
            assert secret not in text
