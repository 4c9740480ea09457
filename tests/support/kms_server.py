"""A real KMS for the tests: moto's server in a subprocess, and a fault proxy.

boto3 talks HTTP to ``moto.server`` on a free loopback port, exactly as it
would to AWS. Faults (endpoint down, time-outs, 5xx, throttling, access
denied) come from :class:`FaultProxy`, a small HTTP relay placed between
boto3 and moto: nothing in carnet or botocore is patched.

Used as a pytest plugin (``pytest_plugins = ("kms_server",)``) so that its
fixtures are shared by every module that needs them.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REGION = "eu-west-3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class MotoServer:
    """``python -m moto.server`` on a loopback port, stoppable and restartable."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "kms",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@dataclass
class FaultProxy:
    """An HTTP relay in front of moto that can misbehave on purpose.

    ``fault`` decides per request: return None to relay, or one of
    ``("status", code, error_type)`` to answer with a KMS-style JSON error,
    ``("hang", seconds)`` to hold the request past the client's read
    time-out, ``("slow", seconds)`` to relay after a delay (a distant KMS),
    ``("drop",)`` to close the connection without an answer.
    """

    upstream_port: int
    port: int = field(default_factory=free_port)
    fault: Callable[[int, str], tuple[object, ...] | None] = lambda n, target: None
    requests: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _conns: set[socket.socket] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, operation: str) -> int:
        return sum(1 for target in self.requests if target.endswith("." + operation))

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def setup(self) -> None:
                super().setup()
                with proxy._lock:
                    proxy._conns.add(self.connection)

            def finish(self) -> None:
                with proxy._lock:
                    proxy._conns.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                target = self.headers.get("X-Amz-Target", "")
                with proxy._lock:
                    proxy.requests.append(target)
                    n = len(proxy.requests)
                action = proxy.fault(n, target)
                if action is None:
                    self._relay(body)
                elif action[0] == "status":
                    _, code, error_type = action
                    self._answer(int(code), {"__type": error_type, "message": "injected"})  # type: ignore[call-overload]
                elif action[0] == "slow":
                    time.sleep(float(action[1]))  # type: ignore[arg-type]
                    self._relay(body)
                elif action[0] == "hang":
                    time.sleep(float(action[1]))  # type: ignore[arg-type]
                    self.close_connection = True
                elif action[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _relay(self, body: bytes) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in (
                        "content-length",
                        "connection",
                        "transfer-encoding",
                        "date",
                        "server",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            def _answer(self, code: int, payload: dict[str, str]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket and live connections: the endpoint refuses connections."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture(scope="session")
def moto_kms() -> Iterator[MotoServer]:
    """One moto server for the whole run (starting one costs about a second)."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kms_key_arns(moto_kms: MotoServer) -> tuple[str, str]:
    """Two symmetric keys on the moto server; the second one has an alias."""
    client = moto_kms.client()
    first = client.create_key(Description="carnet test master key A")["KeyMetadata"]["Arn"]
    second = client.create_key(Description="carnet test master key B")["KeyMetadata"]["Arn"]
    client.create_alias(AliasName="alias/carnet-test-b", TargetKeyId=second)
    return first, second


def _aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    # Hermetic: no host profile, credentials file or instance metadata leak in.
    for name in list(os.environ):
        if name.startswith(("AWS_", "CARNET_KMS_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)


@pytest.fixture
def kms_env(moto_kms: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """AWS settings in the environment point boto3 straight at moto."""
    _aws_env(monkeypatch, tmp_path, moto_kms.url)
    return moto_kms


@pytest.fixture
def kms_proxy(
    moto_kms: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[FaultProxy]:
    """AWS settings point boto3 at a :class:`FaultProxy` in front of moto."""
    proxy = FaultProxy(upstream_port=moto_kms.port).start()
    _aws_env(monkeypatch, tmp_path, proxy.url)
    yield proxy
    proxy.stop()
