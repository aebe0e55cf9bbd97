"""What a KV watch and a pull consumer share: what they read from is re-created when lost.

nats-py does not recover them by itself in every case (nats-py issues 504, 510,
842, 898), so they are re-created with backoff after a reconnect, after an
error, when the connection is renewed, or when a periodic health check finds
their consumer gone.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from typing import TYPE_CHECKING

from reactive.backends.nats._connection import _Backoff
from reactive.errors import BackendError

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_Supervised"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend


class _Supervised(abc.ABC):
    """What a KV watch and a pull consumer share: what they read from is re-created when lost.

    After a reconnect (nats-py recovers neither a pull subscription nor, reliably, a
    watcher's push consumer), or when creating it failed (with backoff), or when the
    server no longer has its consumer (a subclass's health check).
    """

    _what: str  # "watch BUCKET/PATTERN", "consumer STREAM/DURABLE": for errors and logs

    def __init__(self, backend: NatsBackend) -> None:
        self._backend = backend
        self._conn = backend._conn
        self._reconnects = 0
        self._generation = self._conn.generation  # the connection it reads from (see _renew)
        self._last_check = 0.0
        self._backoff = _Backoff()
        self._closed = False

    @abc.abstractmethod
    def _subscribed(self) -> bool:
        """Whether there is a subscription (watcher, pull subscription) to read from."""

    @abc.abstractmethod
    async def _subscribe(self) -> None:
        """Create it (and call _subscribed_now)."""

    @abc.abstractmethod
    async def _unsubscribe(self) -> None:
        """Drop it, quietly."""

    def _subscribed_now(self, reconnects: int) -> None:
        self._reconnects = reconnects
        self._generation = self._conn.generation
        self._last_check = time.monotonic()

    async def _ready(self) -> bool:
        """Whether there is a subscription to read from; False after waiting or re-creating it.

        Raises StopAsyncIteration once closed, TransientBackendError once the
        connection is closed for good.
        """
        conn = self._conn
        if self._closed or conn.closing:
            raise StopAsyncIteration
        nc = conn.client()  # (raises while the connection is closed)
        if self._generation != conn.generation:
            # The connection was renewed: what it read from went with the old one.
            log.info("NATS connection renewed: re-creating %s", self._what)
            await self._unsubscribe()
            self._generation = conn.generation
            return False
        if not self._subscribed():
            if not nc.is_connected:
                await asyncio.sleep(0.1)
                return False
            try:
                await self._subscribe()
            except BackendError as exc:
                delay = self._backoff.next_delay()
                log.warning("re-creating %s failed (%s); retrying in %.1fs", self._what, exc, delay)
                await asyncio.sleep(delay)
                return False
            log.info("%s re-created", self._what)
        elif nc.stats["reconnects"] != self._reconnects:
            log.info("NATS reconnected: re-creating %s", self._what)
            await self._unsubscribe()
            return False
        return True
