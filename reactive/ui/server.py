"""Serving the web view with uvicorn, in the caller's event loop (``ui`` and ``serve``)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import uvicorn

from reactive.cli.common import CLIError
from reactive.ui.app import UIConfig, create_app
from reactive.ui.index import ExecutionIndex

if TYPE_CHECKING:
    from reactive.backends.base import Backend

__all__ = ["UIServer", "bind", "check_exposure", "is_loopback"]

log = logging.getLogger("reactive.ui")


#: The names a view bound to loopback answers to (a page asked for by any other is refused).
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "[::1]"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, allow_actions: bool, token: str | None) -> None:
    """Actions beyond this machine need a token: refuse to start without one."""
    if allow_actions and not token and not is_loopback(host):
        raise CLIError(
            f"--allow-actions on {host} (not loopback) needs a token",
            [
                "give one with --ui-token (or $REACTIVE_UI_TOKEN): every cancel and start "
                "then asks for it",
                "or bind to 127.0.0.1 (the default) and reach the view through an SSH tunnel",
            ],
        )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a taken port is a clear error before anything
    starts (uvicorn would exit the process)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise CLIError(
            f"cannot serve the web view on {host}:{port}: {e.strerror or e}",
            ["choose another port (0: any free one)"],
        ) from e
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the command that runs it handles the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class UIServer:
    """The web view on a bound socket: ``run`` serves it (and keeps its index live) until
    its stop event is set."""

    sock: socket.socket
    allow_actions: bool = False
    token: str | None = None
    timer_stream: str = "REACTIVE_TIMERS"

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{port}"

    async def run(self, backend: Backend, meta_bucket: str, stop: anyio.Event) -> None:
        """Serve until ``stop`` is set (open connections get a second to finish)."""
        index = ExecutionIndex(backend, meta_bucket)
        config = UIConfig(
            backend=backend,
            index=index,
            allow_actions=self.allow_actions,
            token=self.token,
            timer_stream=self.timer_stream,
            hosts=LOOPBACK_NAMES if is_loopback(self.sock.getsockname()[0]) else None,
        )
        server = _Server(
            uvicorn.Config(
                create_app(config),
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )

        async def stop_on_event() -> None:
            await stop.wait()
            server.should_exit = True

        async with anyio.create_task_group() as tg:
            tg.start_soon(index.run)
            tg.start_soon(stop_on_event)
            try:
                await server.serve(sockets=[self.sock])
            finally:
                tg.cancel_scope.cancel()

    def close(self) -> None:
        self.sock.close()
