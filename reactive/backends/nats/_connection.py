"""The backend's connection: connecting (failing fast where retrying cannot help), and a
new connection when nats-py gives one up for good.

By default the connection reconnects forever (with a short wait); the first
connection gives up after ``initial_connect_attempts`` tries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from reactive.backends.nats._errors import _mapped
from reactive.errors import BackendError, ConnectionLostError, TransientBackendError

__all__ = ["_Backoff", "_Connection"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend


class _Backoff:
    """Exponential backoff: 0.1 s doubling up to 2 s (as the runtime's RETRY_CAP: a
    consumer or watch that failed while a cluster elected a leader is made again
    within 2 s of the election; up to 5 s it could wait 5 s more)."""

    def __init__(self, initial: float = 0.1, maximum: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay

    async def sleep(self) -> None:
        await asyncio.sleep(self.next_delay())


async def _connect_or_fail_fast(
    servers: list[str], attempts: int, options: dict[str, Any]
) -> Client:
    """``nats.connect``, but a failure that retrying cannot heal ends it at once, named.

    An untrusted certificate or refused credentials: nats-py reports them to
    ``error_cb``, retries, and in the end raises "no servers available", which says
    nothing of why. Worse, after a failed TLS handshake it waits forever for the
    half-open transport to close, so the first connection would hang. Those errors
    are raised as they come; any other failure names the last error reported.
    """
    fatal: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
    reported: list[Exception] = []
    error_cb = options.get("error_cb")

    async def on_error(exc: Exception) -> None:
        reported.append(exc)
        if _refused(exc) and not fatal.done():
            fatal.set_result(exc)
        if error_cb is not None:
            await error_cb(exc)

    connecting = asyncio.ensure_future(
        nats.connect(servers, max_reconnect_attempts=attempts, **{**options, "error_cb": on_error})
    )
    waiting: set[asyncio.Future[Any]] = {connecting, fatal}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        connecting.cancel()
        raise
    where = f"connect to {', '.join(servers)}"
    if not connecting.done():
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        exc = fatal.result()
        raise BackendError(f"{where}: {type(exc).__name__}: {exc}") from exc
    try:
        return connecting.result()  # (on_error stays its error_cb, passing errors on)
    except nats.errors.NoServersError as e:
        if not reported:
            raise
        # The server's own word (an -ERR) says more than the connection resets after it.
        last = next((x for x in reversed(reported) if not isinstance(x, OSError)), reported[-1])
        raise TransientBackendError(
            f"{where}: {e}; the last error: {type(last).__name__}: {last}"
        ) from last


def _refused(exc: Exception) -> bool:
    """Whether connecting failed for a reason that retrying with the same settings cannot heal."""
    if isinstance(exc, ssl.SSLError | nats.errors.AuthorizationError):
        return True
    # The server's "-ERR 'Authorization Violation'" reaches error_cb as a plain nats error.
    # (Not "Authentication Timeout": a slow client may well get in on the next try.)
    text = str(exc).lower()
    return isinstance(exc, nats.errors.Error) and (
        "authorization violation" in text
        or "authentication expired" in text
        or "authentication revoked" in text
    )


class _Connection:
    """The nats-py connection a backend reads and writes through.

    Made by :meth:`start`, or given (``nc``: then never closed nor renewed here).
    One that nats-py closes for good (after a protocol error, or when its
    reconnects run out) is replaced by a new one; ``generation`` counts the
    replacements, and ``on_renewed`` drops what the backend bound to the old one.
    """

    def __init__(
        self,
        url: str | list[str],
        *,
        connect_options: dict[str, Any],
        nc: Client | None,
        initial_connect_attempts: int,
        on_renewed: Callable[[], Awaitable[None]],
        api_timeout: float = 5.0,
    ) -> None:
        self._url = url
        self._api_timeout = api_timeout
        self._connect_options = connect_options
        self.nc: Client | None = nc
        self.owns_nc = nc is None
        self.js: JetStreamContext | None = (
            nc.jetstream(timeout=api_timeout) if nc is not None else None
        )
        self._initial_connect_attempts = initial_connect_attempts
        self._on_renewed = on_renewed
        self.closing = False
        # Counts the connections this backend has made: one closed for good (nats-py gives a
        # connection up after a protocol error, or when its reconnects run out) is renewed.
        self.generation = 0
        self._renewing: asyncio.Task[None] | None = None

    def client(self) -> Client:
        """The connection; raises while there is none to use."""
        if self.nc is None:
            raise BackendError("NatsBackend is not started: call start() first")
        if self.nc.is_closed:
            if not self.owns_nc:
                raise ConnectionLostError(
                    "the NATS connection given to NatsBackend(nc=...) is closed; "
                    "only a connection the backend made itself is renewed"
                )
            raise TransientBackendError("the NATS connection is closed; renewing it")
        return self.nc

    def jetstream(self) -> JetStreamContext:
        self.client()
        assert self.js is not None
        return self.js

    async def start(self) -> None:
        self.closing = False
        if self.nc is not None and not self.nc.is_closed:
            if self.js is None:
                self.js = self.nc.jetstream(timeout=self._api_timeout)
            return
        nc = await self._connect(max(1, self._initial_connect_attempts))
        self.nc = nc
        self.owns_nc = True
        self.js = nc.jetstream(timeout=self._api_timeout)

    async def _connect(self, first_attempts: int) -> Client:
        """A new connection: ``first_attempts`` tries, then reconnects as configured."""
        options: dict[str, Any] = {
            "reconnect_time_wait": 0.5,
            "ping_interval": 10,
            "max_outstanding_pings": 3,
            "drain_timeout": 5,
            "name": "reactive",
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        options.update(self._connect_options)
        user_closed_cb = options.get("closed_cb")

        async def on_closed() -> None:
            self._on_closed()
            if user_closed_cb is not None:
                await user_closed_cb()

        options["closed_cb"] = on_closed
        wanted_attempts = options.pop("max_reconnect_attempts", -1)
        # With max_reconnect_attempts=-1 nats-py retries the *first* connection
        # forever too; bound the first one, then switch to the wanted policy.
        if wanted_attempts >= 0:
            first_attempts = wanted_attempts
        servers = self._url if isinstance(self._url, list) else [self._url]
        with _mapped(f"connect to {', '.join(servers)}"):
            nc = await _connect_or_fail_fast(servers, first_attempts, options)
        nc.options["max_reconnect_attempts"] = wanted_attempts
        return nc

    def _on_closed(self) -> None:
        """nats-py gave the connection up for good: make a new one (unless closing)."""
        if self.closing or not self.owns_nc or self.nc is None or not self.nc.is_closed:
            return
        if self._renewing is None or self._renewing.done():
            log.warning("nats: the connection is closed for good; making a new one")
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Connect again, with backoff, until connected or closing; then drop what the old one held.

        Watches and consumers see the new generation and re-create themselves on it;
        core subscriptions end with the old connection and are opened again.
        """
        backoff = _Backoff(0.1, 5.0)
        while not self.closing:
            try:
                nc = await self._connect(1)
            except BackendError as exc:
                delay = backoff.next_delay()
                log.warning("nats: renewing the connection failed (%s); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            if self.closing:
                await nc.close()
                return
            self.nc = nc
            self.js = nc.jetstream(timeout=self._api_timeout)
            self.generation += 1
            await self._on_renewed()
            log.info("nats: connected again (connection %d)", self.generation + 1)
            return

    async def _on_error(self, exc: Exception) -> None:
        if not self.closing:
            log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if not self.closing:
            log.warning("nats: disconnected from the server; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("nats: reconnected")

    async def stop_renewing(self) -> None:
        """The backend is closing: no new connection from now on, nor one under way."""
        self.closing = True
        renewing, self._renewing = self._renewing, None
        if renewing is not None and not renewing.done():
            renewing.cancel()
            with contextlib.suppress(BaseException):
                await renewing

    async def close(self) -> None:
        """Drain and close the connection, if the backend made it."""
        nc = self.nc
        if nc is None or not self.owns_nc:
            return
        self.nc = None
        self.js = None
        if nc.is_closed:
            return
        try:
            await nc.drain()
        except Exception:
            with contextlib.suppress(Exception):
                await nc.close()
