"""``python -m reactive serve`` as an operator runs it: its endpoints, its embedded server
across restarts, and its start against a cluster that is not there yet.

Each test runs a ``serve`` of its own (the ``Serve`` helper of test_cli.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import WORKFLOWS, Serve, cli

from reactive.backends.server import free_port

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
