"""``serve`` and the client commands against a nats-server that wants TLS and a password.

The certificates are made for the test by ``openssl`` (a throwaway CA and a server
certificate for 127.0.0.1); the server is a real nats-server with JetStream, TLS
and user/password authorization, started on a free loopback port.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_cli import WORKFLOWS, Serve, cli

from reactive import NatsServer
from reactive.backends.server import free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
]

USER, PASSWORD = "alice", "s3cret-pass"


@dataclass
class Secured:
    url: str
    ca: Path
    server: NatsServer

    def auth(self) -> list[str]:
        """The client arguments that get in."""
        return ["--nats-url", self.url, "--tls-ca", str(self.ca), "--user", USER]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certificates(d: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1 / localhost."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=reactive test CA", cwd=d)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)  # fmt: skip
    return d / "ca.pem", d / "server.pem", d / "server.key"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    d = tmp_path_factory.mktemp("tls")
    ca, cert, key = _make_certificates(d)
    server = NatsServer(
        port=free_port(),
        extra_args=["--tls", "--tlscert", str(cert), "--tlskey", str(key),
                    "--user", USER, "--pass", PASSWORD],
    )  # fmt: skip
    server.start()
    try:
        yield Secured(f"tls://127.0.0.1:{server.port}", ca, server)
    finally:
        server.stop()


def _secured_cli(
    secured: Secured, *args: str, password: str = PASSWORD
) -> subprocess.CompletedProcess[str]:
    return cli(*args, *secured.auth(), "--password", password)


def test_serve_and_the_client_commands_work_over_tls_with_a_password(
    secured: Secured, tmp_path: Path
) -> None:
    serve = Serve(tmp_path / "data", 0, WORKFLOWS, nats=[*secured.auth(), "--password", PASSWORD])
    try:
        serve.wait_healthy()
        listed = _secured_cli(secured, "list")
        assert listed.returncode == 0, listed.stderr
        code, _ = serve.terminate()
        assert code == 0, serve.stderr
    finally:
        serve.kill()


def test_without_the_ca_the_server_is_not_trusted(secured: Secured) -> None:
    result = cli("list", "--nats-url", secured.url, "--user", USER, "--password", PASSWORD)
    assert result.returncode != 0
    err = result.stderr.lower()
    assert "cannot connect" in err and "certificate" in err, result.stderr
    assert "--tls-ca" in result.stderr  # the hint names the fix
    assert "eof_received" not in result.stderr  # (asyncio's chatter about nats-py's TLS)


def test_a_wrong_password_is_refused_with_a_clear_error(secured: Secured) -> None:
    result = _secured_cli(secured, "list", password="wrong")
    assert result.returncode != 0
    err = result.stderr.lower()
    assert "cannot connect" in err and "authorization" in err, result.stderr
    assert "--password" in result.stderr  # the hint names the fix
    assert "eof_received" not in result.stderr
    assert result.stderr.count("\n") <= 4, result.stderr  # the error and its hint, nothing more
