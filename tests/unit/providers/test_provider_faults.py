"""Failure handling of the remote master keys: bounded time-outs, retries of transient faults only.

KMS faults are real network behaviour produced by a relay in front of moto
(see ``kms_server.FaultProxy``); HSM faults are the token directory vanishing
and the library being re-initialised under a live provider.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import TYPE_CHECKING

import pytest

from carnet.errors import MasterKeyMismatch, MasterKeyUnavailable
from carnet.providers import open_master_key

if TYPE_CHECKING:
    from support.kms_server import FaultProxy
    from support.softhsm import SoftHsm


DEK = b"planted-dek-0123456789abcdefghij"
CTX = {"tenant": "practice-1", "key_id": "00112233445566778899aabbccddeeff"}
FAST = "connect_timeout=0.5&read_timeout=0.5&max_attempts=4&backoff=0.02"


def kms_uri(arn: str, options: str = FAST) -> str:
    return f"aws-kms://{arn}?{options}"


# --- AWS KMS ---------------------------------------------------------------


def test_endpoint_down_is_unavailable_within_bounded_time(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]
) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    wrapped = key.wrap(DEK, CTX)
    kms_proxy.stop()
    started = time.monotonic()
    with pytest.raises(MasterKeyUnavailable, match="after 4 attempt"):
        key.unwrap(wrapped, CTX)
    # 4 refused connections and three short back-offs: far below this bound.
    assert time.monotonic() - started < 10


def test_connection_dropped_is_retried_a_bounded_number_of_times(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]
) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    kms_proxy.fault = lambda n, target: ("drop",)
    with pytest.raises(MasterKeyUnavailable):
        key.wrap(DEK, CTX)
    assert kms_proxy.count("Encrypt") == 4


def test_read_timeout_is_bounded(kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0], "read_timeout=0.3&max_attempts=2&backoff=0.01"))
    kms_proxy.fault = lambda n, target: ("hang", 3)
    started = time.monotonic()
    with pytest.raises(MasterKeyUnavailable, match="ReadTimeout"):
        key.wrap(DEK, CTX)
    elapsed = time.monotonic() - started
    assert kms_proxy.count("Encrypt") == 2
    assert elapsed < 2.5  # two 0.3 s reads, not the server's 3 s hang


def test_total_timeout_caps_retries(kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]) -> None:
    key = open_master_key(
        kms_uri(kms_key_arns[0], "read_timeout=0.4&max_attempts=50&backoff=0.01&total_timeout=1")
    )
    kms_proxy.fault = lambda n, target: ("hang", 2)
    started = time.monotonic()
    with pytest.raises(MasterKeyUnavailable):
        key.wrap(DEK, CTX)
    assert time.monotonic() - started < 3
    assert kms_proxy.count("Encrypt") <= 4


@pytest.mark.parametrize(
    "status,error",
    [
        (500, "KMSInternalException"),
        (503, "ServiceUnavailableException"),
        (400, "ThrottlingException"),
        (429, "TooManyRequestsException"),
    ],
)
def test_transient_errors_succeed_after_retry(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str], status: int, error: str
) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    # Fail two calls out of every three.
    kms_proxy.fault = lambda n, target: None if n % 3 == 0 else ("status", status, error)
    wrapped = key.wrap(DEK, CTX)
    assert key.unwrap(wrapped, CTX) == DEK
    assert kms_proxy.count("Encrypt") == 3
    assert kms_proxy.count("Decrypt") == 3


def test_persistent_5xx_gives_up(kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    kms_proxy.fault = lambda n, target: ("status", 503, "ServiceUnavailableException")
    with pytest.raises(MasterKeyUnavailable, match="503"):
        key.wrap(DEK, CTX)
    assert kms_proxy.count("Encrypt") == 4


def test_access_denied_is_not_retried(kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    kms_proxy.fault = lambda n, target: ("status", 400, "AccessDeniedException")
    with pytest.raises(MasterKeyUnavailable, match="AccessDenied"):
        key.wrap(DEK, CTX)
    assert kms_proxy.count("Encrypt") == 1


def test_decrypt_denied_on_own_key_is_a_permission_error(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]
) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    wrapped = key.wrap(DEK, CTX)
    kms_proxy.requests.clear()
    # As with an IAM policy that grants kms:Encrypt but not kms:Decrypt.
    kms_proxy.fault = lambda n, target: (
        ("status", 400, "AccessDeniedException") if target.endswith(".Decrypt") else None
    )
    with pytest.raises(MasterKeyUnavailable, match="kms:Decrypt"):
        key.unwrap(wrapped, CTX)
    assert kms_proxy.count("Decrypt") == 2  # the unwrap, then one probe; no retries


@pytest.mark.parametrize("error", ["InvalidCiphertextException", "IncorrectKeyException"])
def test_mismatch_is_not_retried(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str], error: str
) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    wrapped = key.wrap(DEK, CTX)
    kms_proxy.fault = lambda n, target: ("status", 400, error)
    with pytest.raises(MasterKeyMismatch):
        key.unwrap(wrapped, CTX)
    assert kms_proxy.count("Decrypt") == 1


@pytest.mark.parametrize("error", ["DisabledException", "KMSInvalidStateException"])
def test_disabled_or_pending_deletion_key(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str], error: str
) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    wrapped = key.wrap(DEK, CTX)
    kms_proxy.fault = lambda n, target: ("status", 400, error)
    with pytest.raises(MasterKeyUnavailable, match="disabled or pending deletion"):
        key.unwrap(wrapped, CTX)
    assert kms_proxy.count("Decrypt") == 1


def test_recovers_when_the_endpoint_returns(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str]
) -> None:
    key = open_master_key(kms_uri(kms_key_arns[0]))
    wrapped = key.wrap(DEK, CTX)
    kms_proxy.fault = lambda n, target: ("drop",)
    with pytest.raises(MasterKeyUnavailable):
        key.unwrap(wrapped, CTX)
    kms_proxy.fault = lambda n, target: None
    assert key.unwrap(wrapped, CTX) == DEK


def test_no_key_material_in_unavailable_errors(
    kms_proxy: FaultProxy, kms_key_arns: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    key = open_master_key(kms_uri(kms_key_arns[0]))
    kms_proxy.fault = lambda n, target: ("status", 503, "ServiceUnavailableException")
    with pytest.raises(MasterKeyUnavailable) as info:
        key.wrap(DEK, CTX)
    import base64

    for text in (str(info.value), repr(info.value), caplog.text):
        assert DEK.decode() not in text
        assert base64.b64encode(DEK).decode() not in text


# --- PKCS#11 -----------------------------------------------------------------


def _token_dirs(softhsm: SoftHsm) -> list[str]:
    return [p.name for p in softhsm.tokendir.iterdir()]


def test_token_goes_away_and_comes_back(softhsm: SoftHsm, hsm_master: str, hsm_pin: str) -> None:
    key = open_master_key(hsm_master + "&max_attempts=3&backoff=0.01")
    wrapped = key.wrap(DEK, CTX)
    away = softhsm.tokendir.parent / "token-away"
    away.mkdir(exist_ok=True)
    moved = _token_dirs(softhsm)
    for name in moved:
        shutil.move(str(softhsm.tokendir / name), str(away / name))
    try:
        started = time.monotonic()
        with pytest.raises(MasterKeyUnavailable, match="after 3 attempt"):
            key.unwrap(wrapped, CTX)
        assert time.monotonic() - started < 10
    finally:
        for name in moved:
            shutil.move(str(away / name), str(softhsm.tokendir / name))
    # The provider reopens the library and its session by itself.
    assert key.unwrap(wrapped, CTX) == DEK
    assert key.unwrap(key.wrap(DEK, CTX), CTX) == DEK


def test_library_reinitialised_under_a_live_provider(
    softhsm: SoftHsm, hsm_master: str, hsm_pin: str
) -> None:
    import pkcs11

    key = open_master_key(hsm_master)
    wrapped = key.wrap(DEK, CTX)
    # Any code in the process may finalise and re-initialise the library
    # (a network HSM client does so on reconnect): every handle goes stale.
    pkcs11.lib(softhsm.module).reinitialize()
    assert key.unwrap(wrapped, CTX) == DEK


def test_waiting_for_the_session_is_bounded(
    softhsm: SoftHsm, hsm_master: str, hsm_pin: str
) -> None:
    from carnet.providers import pkcs11 as provider

    key = open_master_key(hsm_master + "&lock_timeout=0.2")
    wrapped = key.wrap(DEK, CTX)
    module = provider._module(softhsm.module)
    release = threading.Event()

    def hog() -> None:
        with module.lock:
            release.wait(5)

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        time.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(MasterKeyUnavailable, match="waiting for the PKCS#11 session"):
            key.unwrap(wrapped, CTX)
        assert time.monotonic() - started < 2
    finally:
        release.set()
        thread.join()
    assert key.unwrap(wrapped, CTX) == DEK
