"""``python -m reactive serve`` as an operator runs it: its endpoints, its embedded server
across restarts, and its start against a cluster that is not there yet.

Each test runs a ``serve`` of its own (the ``Serve`` helper of test_cli.py).
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import WORKFLOWS, Serve, cli

from reactive.backends.server import NatsServer, find_nats_server_binary, free_port
from reactive.cli.embedded import DEFAULT_NATS_PORT

pytestmark = pytest.mark.integration


def _listening(port: int) -> set[str]:
    """The addresses a TCP socket listens on at ``port`` on this machine (Linux /proc)."""
    found: set[str] = set()
    for name in ("tcp", "tcp6"):
        table = Path("/proc/net") / name
        if not table.exists():
            pytest.skip("needs /proc/net/tcp to see which address a socket listens on")
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            if len(address) == 8:  # IPv4, little-endian
                found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
            else:
                found.add("::1" if address.endswith("01000000") else f"ipv6:{address}")
    return found


# --------------------------------------------------------------------------- metrics


def test_metrics_listen_on_loopback_by_default(tmp_path: Path) -> None:
    served = Serve(tmp_path / "data", free_port(), WORKFLOWS, metrics_host=None)
    try:
        served.wait_healthy()
        assert _listening(served.metrics_port) == {"127.0.0.1"}
    finally:
        code, _ = served.terminate()
        served.kill()
    assert code == 0, served.stderr
    help_text = " ".join(cli("serve", "--help").stdout.split())
    assert "--metrics-host HOST the address of the metrics endpoint (default: 127.0.0.1" in (
        help_text
    )


# --------------------------------------------------------------------------- the embedded server


@contextlib.contextmanager
def _holding(port: int) -> Iterator[bool]:
    """Listen on 127.0.0.1:``port`` meanwhile, if it is free: whether it was."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            yield False
            return
        sock.listen()
        yield True


def _serve_once(data_dir: Path) -> str:
    """serve with no --port until healthy, then SIGTERM: the URL it served on."""
    served = Serve(data_dir, None, WORKFLOWS)
    try:
        served.wait_healthy()
        url = served.url
        assert (data_dir / "nats.url").read_text().strip() == url
    finally:
        code, _ = served.terminate()
        served.kill()
    assert code == 0, served.stderr
    return url


@pytest.mark.timeout(300)  # (subprocesses one after another: a slow machine)
def test_the_embedded_server_keeps_its_url_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # The first serve may not take the default port (4222): a restart must come back on the
    # port it got, not on the default that is free again by then.
    with _holding(DEFAULT_NATS_PORT):
        first = _serve_once(data_dir)
    assert first != f"nats://127.0.0.1:{DEFAULT_NATS_PORT}"
    assert _serve_once(data_dir) == first
    assert _serve_once(data_dir) == first


@pytest.mark.timeout(300)  # (subprocesses one after another: a slow machine)
def test_a_restart_refuses_to_move_when_its_port_is_taken(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    url = _serve_once_on(data_dir, port)
    with _holding(port) as held:
        assert held
        refused = Serve(data_dir, None, WORKFLOWS)
        code = _exit_code(refused)
    assert code == 1, refused.stdout + refused.stderr
    assert f"port {port} is taken" in refused.stderr
    assert url in refused.stderr  # the URL workers and the CLI know
    assert "--port" in refused.stderr  # how to move it on purpose
    assert "Traceback" not in refused.stderr
    # Told to move, it moves, and keeps the new port from then on.
    moved = free_port()
    assert _serve_once_on(data_dir, moved) == f"nats://127.0.0.1:{moved}"
    assert _serve_once(data_dir) == f"nats://127.0.0.1:{moved}"


def _serve_once_on(data_dir: Path, port: int) -> str:
    served = Serve(data_dir, port, WORKFLOWS)
    try:
        served.wait_healthy()
    finally:
        code, _ = served.terminate()
        served.kill()
    assert code == 0, served.stderr
    return served.url


def _exit_code(served: Serve, timeout: float = 30.0) -> int:
    """The exit status of a serve expected to exit by itself (stopped cleanly if it does not)."""
    try:
        return served.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        served.terminate()
        pytest.fail(f"serve did not exit within {timeout}s:\n{served.stdout}\n{served.stderr}")


# --------------------------------------------------------------------------- starting up


@contextlib.contextmanager
def _server_without_jetstream(port: int) -> Iterator[None]:
    """A real nats-server on ``port`` with JetStream off: it connects, nothing answers JetStream."""
    proc = subprocess.Popen(
        [find_nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no nats-server"
                time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _SilentJetStream(socketserver.ThreadingTCPServer):
    """Speaks just enough NATS to be connected to (INFO, PONG), and answers no request:
    every JetStream call times out, whatever the machine's speed. It says it is ``version``,
    with JetStream."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, version: str = "2.12.0") -> None:
        self.version = version
        super().__init__(("127.0.0.1", 0), _SilentHandler)
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _SilentHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        port = self.server.server_address[1]
        version = getattr(self.server, "version", "2.12.0")
        info = {"server_id": "SILENT", "version": version, "proto": 1, "headers": True,
                "jetstream": True, "max_payload": 1048576, "host": "127.0.0.1",
                "port": port}  # fmt: skip
        with contextlib.suppress(OSError):
            self.wfile.write(f"INFO {json.dumps(info)}\r\n".encode())
            for line in self.rfile:
                if line.strip() == b"PING":
                    self.wfile.write(b"PONG\r\n")


@pytest.mark.timeout(300)  # (subprocesses one after another: a slow machine)
def test_serve_waits_for_the_server_and_its_jetstream_at_start(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    served = Serve(tmp_path / "data", port, WORKFLOWS, nats=("--nats-url", url))
    try:
        # Nothing listens yet: it retries, saying what failed.
        line = served.wait_for_log("level=warning", "retrying", f"cannot connect to NATS at {url}")
        assert "retry=1 " in line
        # A server, but no JetStream yet: it retries, naming the call and the hint.
        with _server_without_jetstream(port):
            line = served.wait_for_log(
                "level=warning", "retrying", "JetStream is not enabled", "-js"
            )
        # Then the real thing (JetStream on), on the same URL: it comes up and serves.
        with NatsServer(port=port, data_dir=tmp_path / "store"):
            served.wait_healthy(timeout=60)
            proc = cli("start", "countdown", "--input", '{"steps": 1}', "--wait",
                       "--nats-url", url)  # fmt: skip
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "completed" in proc.stdout
            code, _ = served.terminate()
    finally:
        served.kill()
    assert code == 0, served.stderr
    assert "msg=ready" in served.stderr


def test_serve_gives_up_after_the_startup_timeout_naming_what_failed(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    with _server_without_jetstream(port):
        served = Serve(tmp_path / "data", port, WORKFLOWS,
                       nats=("--nats-url", url, "--startup-timeout", "5"))  # fmt: skip
        code = _exit_code(served)
    assert code == 1, served.stderr
    err = served.stderr
    assert "retrying" in err  # it tried more than once
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: serve gave up starting after 5s (--startup-timeout): the last failure: "
        "JetStream is not enabled on the server (start nats-server with -js)"
    ], err
    hint = err.split(errors[0], 1)[1]
    assert "JetStream" in hint and "-js" in hint, err
    assert "Traceback" not in err


def test_a_jetstream_call_that_times_out_at_start_is_retried(tmp_path: Path) -> None:
    silent = _SilentJetStream()
    try:
        url = f"nats://127.0.0.1:{silent.port}"
        served = Serve(tmp_path / "data", silent.port, WORKFLOWS, nats=("--nats-url", url))
        try:
            line = served.wait_for_log(
                "level=warning", "retrying", "ensure bucket REACTIVE_META", "no answer in 0.5s"
            )
            assert "did not answer" in line  # the hint: JetStream, not the connection
            code, _ = served.terminate()  # a signal ends the retries at once
        finally:
            served.kill()
    finally:
        silent.close()
    assert code == 0, served.stderr


def test_serve_refuses_a_server_too_old_for_what_the_engine_uses(tmp_path: Path) -> None:
    old = _SilentJetStream(version="2.10.7")
    try:
        url = f"nats://127.0.0.1:{old.port}"
        served = Serve(tmp_path / "data", old.port, WORKFLOWS, nats=("--nats-url", url))
        code = _exit_code(served)
    finally:
        old.close()
    assert code == 1, served.stderr
    err = served.stderr
    assert "nats-server 2.10.7 lacks what the engine uses: per-message TTLs" in err, err
    assert "needs nats-server 2.12.0 or later" in err, err
    assert "retrying" not in err  # not something a retry heals
    assert "Traceback" not in err


def test_serve_ends_naming_a_stream_it_cannot_use(tmp_path: Path) -> None:
    # The timer stream exists with limits retention (made by hand, say): the timer consumer
    # cannot start however often it tries, so serve ends with the reason (a trigger's start
    # is retried a few times first: on a cluster, what another engine has just made can be
    # "not found" for a moment).
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    with NatsServer(port=port, data_dir=tmp_path / "store"):
        import asyncio

        import nats

        async def make() -> None:
            nc = await nats.connect(url)
            await nc.jetstream().add_stream(name="REACTIVE_TIMERS", subjects=["elsewhere.>"])
            await nc.close()

        asyncio.run(make())
        served = Serve(tmp_path / "data", free_port(), WORKFLOWS, nats=("--nats-url", url))
        code = _exit_code(served)
    assert code == 1, served.stderr
    errors = [line for line in served.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, served.stderr
    assert errors[0].startswith("error: cannot start the timer consumer for "), errors
    assert "REACTIVE_TIMERS exists with limits retention" in errors[0], errors
    assert "Traceback" not in served.stderr
