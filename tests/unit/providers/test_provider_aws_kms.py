"""aws-kms:// master keys against a real KMS API (moto's server over HTTP)."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from carnet.errors import ConfigurationError, MasterKeyMismatch
from carnet.providers import open_master_key
from carnet.providers.aws_kms import AwsKmsMasterKey
from support.paths import ROOT

if TYPE_CHECKING:
    from support.kms_server import MotoServer


DEK = b"planted-dek-0123456789abcdefghij"
CTX = {"tenant": "practice-1", "key_id": "00112233445566778899aabbccddeeff"}
SRC = str(ROOT / "src")


def test_round_trip_by_arn(kms_env: MotoServer, kms_key_arns: tuple[str, str]) -> None:
    key = open_master_key(f"aws-kms://{kms_key_arns[0]}")
    assert isinstance(key, AwsKmsMasterKey)
    wrapped = key.wrap(DEK, CTX)
    assert DEK not in wrapped
    assert key.unwrap(wrapped, CTX) == DEK


def test_round_trip_by_alias_and_key_id(kms_env: MotoServer, kms_key_arns: tuple[str, str]) -> None:
    by_alias = open_master_key("aws-kms://alias/carnet-test-b")
    key_id = kms_key_arns[1].rsplit("/", 1)[1]
    by_id = open_master_key(f"aws-kms://{key_id}")
    wrapped = by_alias.wrap(DEK, CTX)
    # Both names reach the same KMS key, so either opens the other's wraps.
    assert by_id.unwrap(wrapped, CTX) == DEK
    assert by_alias.unwrap(by_id.wrap(DEK, CTX), CTX) == DEK


def test_each_wrap_is_fresh(kms_env: MotoServer, kms_key_arns: tuple[str, str]) -> None:
    key = open_master_key(f"aws-kms://{kms_key_arns[0]}")
    assert key.wrap(DEK, CTX) != key.wrap(DEK, CTX)


def test_uri_is_canonical_and_holds_no_settings(
    kms_env: MotoServer, kms_key_arns: tuple[str, str]
) -> None:
    arn = kms_key_arns[0]
    key = open_master_key(f"aws-kms://{arn}?read_timeout=1.5&max_attempts=2")
    assert key.uri == f"aws-kms://{arn}"
    assert key.settings["read_timeout"] == 1.5
    assert key.settings["max_attempts"] == 2
    aliased = open_master_key("aws-kms://alias/carnet-test-b?region=eu-west-3&connect_timeout=1")
    assert aliased.uri == "aws-kms://alias/carnet-test-b?region=eu-west-3"
    assert repr(key) == f"<AwsKmsMasterKey aws-kms://{arn}>"


def test_settings_from_environment(
    kms_env: MotoServer, kms_key_arns: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CARNET_KMS_READ_TIMEOUT", "0.75")
    monkeypatch.setenv("CARNET_KMS_MAX_ATTEMPTS", "7")
    key = open_master_key(f"aws-kms://{kms_key_arns[0]}?max_attempts=3")
    assert key.settings["read_timeout"] == 0.75
    assert key.settings["max_attempts"] == 3  # the URI wins over the environment


@pytest.mark.parametrize(
    "other",
    [
        {"tenant": "practice-2", "key_id": CTX["key_id"]},
        {"tenant": CTX["tenant"], "key_id": "ff" * 16},
        {"tenant": CTX["tenant"], "key_id": CTX["key_id"], "extra": "x"},
    ],
)
def test_context_is_bound(
    kms_env: MotoServer, kms_key_arns: tuple[str, str], other: dict[str, str]
) -> None:
    key = open_master_key(f"aws-kms://{kms_key_arns[0]}")
    wrapped = key.wrap(DEK, CTX)
    with pytest.raises(MasterKeyMismatch):
        key.unwrap(wrapped, other)


def test_wrap_from_another_master_key(kms_env: MotoServer, kms_key_arns: tuple[str, str]) -> None:
    first = open_master_key(f"aws-kms://{kms_key_arns[0]}")
    second = open_master_key(f"aws-kms://{kms_key_arns[1]}")
    with pytest.raises(MasterKeyMismatch):
        second.unwrap(first.wrap(DEK, CTX), CTX)
    with pytest.raises(MasterKeyMismatch):
        first.unwrap(second.wrap(DEK, CTX), CTX)


def test_tampered_blob(kms_env: MotoServer, kms_key_arns: tuple[str, str]) -> None:
    key = open_master_key(f"aws-kms://{kms_key_arns[0]}")
    wrapped = key.wrap(DEK, CTX)
    # Every header byte, then a spread over the KMS ciphertext blob.
    positions = sorted({*range(9), *range(9, len(wrapped), 5), len(wrapped) - 1})
    for i in positions:
        bad = bytearray(wrapped)
        bad[i] ^= 0x01
        with pytest.raises(MasterKeyMismatch):
            key.unwrap(bytes(bad), CTX)
    for cut in (b"", wrapped[:1], wrapped[:9], wrapped[:-1]):
        with pytest.raises(MasterKeyMismatch):
            key.unwrap(cut, CTX)


@pytest.mark.parametrize(
    "uri",
    [
        "aws-kms://",
        "aws-kms://not-a-key",
        "aws-kms://alias/",
        "aws-kms://arn:aws:kms:eu-west-3:123:key/abc",
        "aws-kms://alias/x?colour=blue",
        "aws-kms://alias/x?read_timeout=-1",
        "aws-kms://alias/x?read_timeout=soon",
        "aws-kms://alias/x?max_attempts=2.5",
        "aws-kms://alias/x?region=narnia",
        "aws-kms://arn:aws:kms:eu-west-3:111122223333:alias/x?region=us-east-1",
        "aws-kms://alias/x#frag",
    ],
)
def test_bad_uris_fail_at_construction(kms_env: MotoServer, uri: str) -> None:
    with pytest.raises(ConfigurationError):
        open_master_key(uri)


def test_credentials_in_uri_are_refused_and_not_echoed(kms_env: MotoServer) -> None:
    secret = "wJalrXUtnFEMI-planted-secret"
    with pytest.raises(ConfigurationError) as info:
        open_master_key(f"aws-kms://AKIAEXAMPLE:{secret}@alias/x")
    assert secret not in str(info.value) and secret not in repr(info.value)


def test_no_region_fails_at_construction(
    kms_env: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_REGION")
    with pytest.raises(ConfigurationError, match="region"):
        open_master_key("aws-kms://alias/carnet-test-b")
    # An ARN carries its region.
    open_master_key("aws-kms://arn:aws:kms:eu-west-3:123456789012:alias/carnet-test-b")


def test_unknown_key_is_a_clear_error(kms_env: MotoServer) -> None:
    key = open_master_key("aws-kms://alias/no-such-key")
    with pytest.raises(ConfigurationError, match="NotFoundException"):
        key.wrap(DEK, CTX)


def test_no_credentials(
    kms_env: MotoServer, kms_key_arns: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    key = open_master_key(f"aws-kms://{kms_key_arns[0]}")
    with pytest.raises(ConfigurationError, match="credentials"):
        key.wrap(DEK, CTX)


def test_missing_extra_names_the_install_command() -> None:
    # A fresh interpreter where boto3 cannot be imported, as without the extra.
    code = (
        "import sys; sys.modules['boto3'] = None; sys.modules['boto3.session'] = None\n"
        "from carnet.providers import open_master_key\n"
        "from carnet.errors import MissingDependency\n"
        "try:\n    open_master_key('aws-kms://alias/x')\n"
        "except MissingDependency as exc:\n    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        check=True,
    ).stdout
    assert "pip install 'carnet[aws]'" in out
    assert "boto3" in out


def test_no_key_material_in_errors_or_logs(
    kms_env: MotoServer, kms_key_arns: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = open_master_key(f"aws-kms://{kms_key_arns[0]}")
    other = open_master_key(f"aws-kms://{kms_key_arns[1]}")
    wrapped = key.wrap(DEK, CTX)
    assert key.unwrap(wrapped, CTX) == DEK
    errors: list[Exception] = []
    for attempt in (
        lambda: other.unwrap(wrapped, CTX),
        lambda: key.unwrap(wrapped, {**CTX, "tenant": "x"}),
        lambda: key.unwrap(wrapped[:-3], CTX),
    ):
        with pytest.raises(MasterKeyMismatch) as info:
            attempt()
        errors.append(info.value)
    forms = [DEK, base64.b64encode(DEK), DEK.hex().encode(), repr(DEK).encode()]
    texts = [str(e) for e in errors] + [repr(e) for e in errors] + [repr(key)]
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    assert caplog.records, "botocore debug logging should have produced records"
    for text in texts:
        for form in forms:
            assert form.decode("latin-1") not in text
