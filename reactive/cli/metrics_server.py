"""serve's HTTP endpoint: ``/metrics`` (Prometheus text format) and ``/healthz``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reactive.cli.common import (
    CLIError,
)

__all__ = ["MetricsServer"]

log = logging.getLogger("reactive.serve")


class _Handler(BaseHTTPRequestHandler):
    server_version = "reactive"
    is_ready: Callable[[], tuple[bool, str]] = staticmethod(lambda: (False, "starting"))

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            from reactive.runtime.metrics import REGISTRY

            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, why = type(self).is_ready()
            self._send(200 if ok else 503, f"{why}\n".encode(), "text/plain; charset=utf-8")
        elif path == "/":
            self._send(200, b"reactive: /metrics /healthz\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)


class MetricsServer:
    """``/metrics`` and ``/healthz`` on a ThreadingHTTPServer in a daemon thread."""

    def __init__(self, host: str, port: int, is_ready: Callable[[], tuple[bool, str]]) -> None:
        handler = type("Handler", (_Handler,), {"is_ready": staticmethod(is_ready)})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise CLIError(
                f"cannot serve metrics on {host}:{port}: {e.strerror or e}",
                ["choose another port with --metrics-port (0 turns the endpoint off)"],
            ) from e
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self.host = host
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="reactive-metrics", daemon=True
        )

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # shutdown() waits for serve_forever() to return: only if it was started.
        if self._thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()
