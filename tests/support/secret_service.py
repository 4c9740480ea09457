"""A real Secret Service for the tests: gnome-keyring-daemon on a private D-Bus session bus.

Each test gets its own ``dbus-daemon`` (a config written here: no service
directories, so nothing on the bus is D-Bus-activated from the system) and its
own ``gnome-keyring-daemon`` whose HOME, XDG data, config, cache and runtime
directories all live in one fresh temporary directory. The daemon creates and
unlocks a ``login`` keyring with a password fed on stdin; that keyring is the
``default`` alias the ``keyring`` library's SecretService backend writes to.
No user session, user keyring or user bus is seen or touched.

Both daemons run in the foreground as children of the test process, so
teardown can stop them by pid and reap them.

Used as a pytest plugin (``pytest_plugins = ("secret_service",)``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

UNLOCK_PASSWORD = "carnet-test-login-password"
START_TIMEOUT = 10.0

# Only the session bus's own socket; no <servicedir>, so a locked collection
# cannot make the bus start a GUI prompter and the unlock prompt is dismissed
# at once instead of waiting for a user.
BUS_CONFIG = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:dir={socket_dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


class SecretServiceUnavailable(RuntimeError):
    pass


@dataclass
class SecretService:
    root: Path
    address: str
    bus: subprocess.Popen[bytes]
    daemon: subprocess.Popen[bytes]

    @property
    def keyrings(self) -> Path:
        return self.root / "data" / "keyrings"

    @contextmanager
    def default_collection(self) -> Iterator[Any]:
        """The ``default`` collection through secretstorage, on its own connection."""
        import secretstorage

        with closing(secretstorage.dbus_init()) as connection:
            yield secretstorage.get_default_collection(connection)

    def lock(self) -> None:
        with self.default_collection() as collection:
            collection.lock()
            assert collection.is_locked()

    def stop_daemon(self) -> None:
        _stop(self.daemon)

    def stop_bus(self) -> None:
        _stop(self.daemon)
        _stop(self.bus)

    def logs(self) -> str:
        parts = []
        for name in ("dbus-daemon.log", "gnome-keyring-daemon.log"):
            path = self.root / name
            text = path.read_text(errors="replace").strip() if path.exists() else ""
            parts.append(f"--- {name}\n{text or '(empty)'}")
        return "\n".join(parts)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _short_tempdir() -> Path:
    # A unix socket path is limited to ~107 bytes; pytest's tmp_path under a
    # long test name or TMPDIR can exceed that, /tmp keeps it short.
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix="carnet-ss-", dir=base))


def start(root: Path) -> SecretService:
    """Start both daemons under ``root``; raises SecretServiceUnavailable with their logs."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(root / "home"),
        "XDG_DATA_HOME": str(root / "data"),
        "XDG_CONFIG_HOME": str(root / "config"),
        "XDG_CACHE_HOME": str(root / "cache"),
        "XDG_RUNTIME_DIR": str(root / "run"),
    }
    for name in ("home", "data", "config", "cache", "run"):
        (root / name).mkdir(mode=0o700)
    conf = root / "bus.conf"
    conf.write_text(BUS_CONFIG.format(socket_dir=root))

    with open(root / "dbus-daemon.log", "wb") as log:
        bus = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--nosyslog", "--print-address=1", f"--config-file={conf}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    # From here on any failure, including a daemon that cannot be executed,
    # must stop what was started: an orphaned bus would outlive the test run.
    daemon = None
    try:
        assert bus.stdout is not None
        address = bus.stdout.readline().decode().strip()
        bus.stdout.close()
        if not address.startswith("unix:"):
            _stop(bus)
            log_text = (root / "dbus-daemon.log").read_text(errors="replace")
            raise SecretServiceUnavailable(f"dbus-daemon printed no bus address\n{log_text}")
        env["DBUS_SESSION_BUS_ADDRESS"] = address

        with open(root / "gnome-keyring-daemon.log", "wb") as log:
            # --unlock reads the login keyring's password from stdin and
            # creates that keyring when it does not exist yet.
            daemon = subprocess.Popen(
                ["gnome-keyring-daemon", "--foreground", "--unlock", "--components=secrets"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        assert daemon.stdin is not None
        try:
            daemon.stdin.write(UNLOCK_PASSWORD.encode())
            daemon.stdin.close()
        except BrokenPipeError:
            pass  # it already exited; the wait below reports its status and log

        service = SecretService(root=root, address=address, bus=bus, daemon=daemon)
        _wait_ready(service)
    except BaseException:
        if daemon is not None:
            _stop(daemon)
        _stop(bus)
        raise
    return service


def _wait_ready(service: SecretService) -> None:
    import secretstorage

    previous = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    os.environ["DBUS_SESSION_BUS_ADDRESS"] = service.address
    problem = "no answer"
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < deadline:
            for name, proc in (
                ("dbus-daemon", service.bus),
                ("gnome-keyring-daemon", service.daemon),
            ):
                if proc.poll() is not None:
                    raise SecretServiceUnavailable(
                        f"{name} exited with status {proc.returncode}\n{service.logs()}"
                    )
            # The name org.freedesktop.secrets appears before the login
            # keyring is necessarily loaded, so wait for an unlocked default.
            try:
                with service.default_collection() as collection:
                    if collection.get_label() == "Login" and not collection.is_locked():
                        return
                    problem = f"default collection {collection.get_label()!r} not unlocked"
            except (secretstorage.exceptions.SecretStorageException, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.02)
    finally:
        if previous is None:
            os.environ.pop("DBUS_SESSION_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SESSION_BUS_ADDRESS"] = previous
    raise SecretServiceUnavailable(
        f"no unlocked login collection within {START_TIMEOUT:.0f}s ({problem})\n{service.logs()}"
    )


def _unavailable(message: str) -> NoReturn:
    # CI installs the packages (.ci/run), so there a missing daemon is a
    # broken setup, never a reason to quietly skip the Secret Service tests.
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def secret_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[SecretService]:
    """A running, unlocked Secret Service selected as the ``keyring`` backend."""
    missing = [b for b in ("dbus-daemon", "gnome-keyring-daemon") if shutil.which(b) is None]
    if missing:
        _unavailable(
            f"not installed: {', '.join(missing)} (apt-get install dbus-daemon gnome-keyring)"
        )
    try:
        import keyring
        import keyring.core
        from keyring.backends.SecretService import Keyring as SecretServiceKeyring
    except ImportError as exc:
        _unavailable(f"keyring's SecretService backend cannot load: {exc}")

    root = _short_tempdir()
    try:
        failure = None
        try:
            service = start(root)
        except (SecretServiceUnavailable, OSError) as exc:
            failure = f"could not start a private Secret Service: {exc}"
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        try:
            monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", service.address)
            # Read the module global rather than get_keyring(): that would run
            # backend detection now and leave later tests a backend bound to
            # this bus, which is gone after teardown.
            previous = keyring.core._keyring_backend
            # Explicitly, so that neither keyring's backend detection nor a
            # PYTHON_KEYRING_BACKEND in the environment picks another store.
            keyring.set_keyring(SecretServiceKeyring())
            try:
                yield service
            finally:
                keyring.core._keyring_backend = previous
        finally:
            service.stop_bus()
    finally:
        shutil.rmtree(root, ignore_errors=True)
