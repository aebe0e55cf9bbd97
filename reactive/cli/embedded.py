"""serve's embedded nats-server: JetStream in ``--data-dir``, its URL and port remembered there."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from reactive.cli.common import (
    URL_FILE,
    CLIError,
)

if TYPE_CHECKING:
    from reactive.backends.server import NatsServer

__all__ = ["DEFAULT_NATS_PORT", "PORT_FILE", "start_embedded"]

log = logging.getLogger("reactive.serve")

DEFAULT_NATS_PORT = 4222
PORT_FILE = "nats.port"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    if not parts.hostname or not parts.port:
        return False
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=0.5):
            return True
    except OSError:
        return False


def start_embedded(args: argparse.Namespace) -> tuple[NatsServer, Path]:
    """Start nats-server with JetStream, its store in ``--data-dir``; write ``nats.url`` there."""
    from reactive.backends.server import NatsServer, NatsServerError, free_port

    data_dir = Path(args.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create the data dir {data_dir}: {e.strerror or e}") from e
    url_file = data_dir / URL_FILE
    with contextlib.suppress(OSError):
        previous = url_file.read_text().strip()
        if previous and _reachable(previous):
            raise CLIError(
                f"another serve runs an embedded nats-server on {data_dir} ({previous})",
                [
                    f"join it with --nats-url {previous}, or use another --data-dir",
                ],
            )
    bind = args.host if args.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    port_file = data_dir / PORT_FILE
    port = args.port
    if port is None:
        remembered = _remembered_port(port_file)
        if remembered is not None:
            # Workers and the CLI know this URL: never move it silently.
            if not _port_free(bind, remembered):
                url = NatsServer(port=remembered, host=args.host).url
                raise CLIError(
                    f"port {remembered} is taken: the embedded nats-server of {data_dir} "
                    f"listened there ({url}), and workers and the CLI may use that URL",
                    [
                        f"free port {remembered} (what holds it? e.g. `ss -ltnp 'sport = :{remembered}'`)",
                        f"or move the server on purpose with --port (it is remembered in "
                        f"{port_file}), and point workers at the new URL",
                    ],
                )
            port = remembered
        else:
            port = DEFAULT_NATS_PORT if _port_free(bind, DEFAULT_NATS_PORT) else free_port(bind)
    server = NatsServer(port=port, data_dir=data_dir, host=args.host, new_session=True)
    try:
        server.start()
    except NatsServerError as e:
        raise CLIError(f"could not start the embedded nats-server: {e}") from e
    try:
        url_file.write_text(server.url + "\n")
        port_file.write_text(f"{server.port}\n")
    except OSError as e:
        server.stop()
        raise CLIError(f"cannot write into {data_dir}: {e.strerror or e}") from e
    return server, url_file


def _remembered_port(port_file: Path) -> int | None:
    """The port the data dir's server listened on last time (``nats.port``), if any."""
    try:
        text = port_file.read_text().strip()
    except OSError:
        return None
    if not text.isdigit() or not 0 < int(text) < 65536:
        log.warning("ignoring %s: not a port number (%r)", port_file, text[:20])
        return None
    return int(text)
