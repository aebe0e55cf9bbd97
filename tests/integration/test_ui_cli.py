"""``python -m reactive ui`` as a user runs it: alone, against a NATS server, no workflow code."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from reactive.backends.server import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REACTIVE_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _ui(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reactive", "ui", *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ui_serves_alone_on_loopback_and_stops_on_sigterm(nats_url: str) -> None:
    proc = _ui("--nats-url", nats_url, "--port", "0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.match(r"web view on (http://127\.0\.0\.1:\d+)/ \(NATS at ", line)
        assert found, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = found.group(1)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ui/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the web view did not answer"
                time.sleep(0.05)
        with urllib.request.urlopen(f"{url}/executions", timeout=5) as r:
            assert "actions off" in r.read().decode()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ui_refuses_actions_beyond_loopback_without_a_token(nats_url: str) -> None:
    proc = _ui("--nats-url", nats_url, "--host", "0.0.0.0", "--port", "0", "--allow-actions")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "--allow-actions on 0.0.0.0 (not loopback) needs a token" in err


def test_ui_names_a_port_that_is_taken(nats_url: str) -> None:
    import socket

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        proc = _ui("--nats-url", nats_url, "--port", str(port))
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"cannot serve the web view on 127.0.0.1:{port}" in err
