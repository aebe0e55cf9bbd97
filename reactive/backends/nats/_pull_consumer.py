"""The supervised fetch loop on a durable pull consumer, and the messages it hands out.

nats-py does not re-create a pull subscription after a reconnect (its issue 504):
the loop does, and also when the server no longer has the durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from reactive.backends.base import InboundMessage
from reactive.backends.nats._errors import _mapped
from reactive.backends.nats._keeper import _Keeper
from reactive.backends.nats._supervised import _Supervised

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_PullConsumer"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend

_MIN_NAK_DELAY: Final = 0.1
_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})


class _JetStreamMessage:
    """A message from a durable consumer. A second ack / nak / term is a no-op.

    On the hot path (a change from a partition is one of these): its metadata (parsed
    from the reply subject) is read only when asked for, and an ack is one publish.
    Settled, it is no longer kept in progress by its context's ``_Keeper`` (if any).
    """

    __slots__ = ("_headers", "_keeper", "_meta", "_msg")

    def __init__(self, msg: Msg, keeper: _Keeper | None = None) -> None:
        self._msg = msg
        self._keeper = keeper
        self._meta: Msg.Metadata | None = None
        # (nats-py makes a dict of its own for each message: no copy needed.)
        self._headers: Mapping[str, str] = msg.headers or _NO_HEADERS

    @property
    def _metadata(self) -> Msg.Metadata:
        meta = self._meta
        if meta is None:
            meta = self._meta = self._msg.metadata
        return meta

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._headers

    @property
    def num_delivered(self) -> int:
        return self._metadata.num_delivered

    @property
    def stream(self) -> str | None:
        return self._metadata.stream

    @property
    def sequence(self) -> int | None:
        return self._metadata.sequence.stream

    @property
    def time(self) -> float | None:
        return self._metadata.timestamp.timestamp()

    async def ack(self) -> None:
        msg = self._msg
        if msg._ackd:
            return
        msg._ackd = True  # (as nats-py's own ack marks it: a nak or term after it is a no-op)
        if self._keeper is not None:
            self._keeper.release(msg)
        try:
            await msg._client.publish(msg.reply, b"")
        except Exception as exc:
            with _mapped(f"ack {self.subject}"):
                raise exc from None

    async def nak(self, delay: float) -> None:
        delay = max(float(delay), _MIN_NAK_DELAY)
        if self._keeper is not None:
            self._keeper.release(self._msg)
        with _mapped(f"nak {self.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._msg.nak(delay=delay)

    async def term(self) -> None:
        if self._keeper is not None:
            self._keeper.release(self._msg)
        with _mapped(f"term {self.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self._msg.term()

    async def in_progress(self) -> None:
        with _mapped(f"in_progress {self.subject}"):
            await self._msg.in_progress()

    def __repr__(self) -> str:
        return (
            f"<stream message {self.stream}#{self.sequence} {self.subject} "
            f"delivered={self.num_delivered}>"
        )


class _PullConsumer(_Supervised):
    """A supervised fetch loop on a durable pull consumer."""

    def __init__(
        self,
        backend: NatsBackend,
        stream: str,
        durable: str,
        filter_subject: str,
        ack_wait: float,
        keep_alive: bool = False,
    ) -> None:
        super().__init__(backend)
        self._stream = stream
        self._durable = durable
        self._what = f"consumer {stream}/{durable}"
        self._filter = filter_subject
        self._ack_wait = ack_wait
        self._sub: JetStreamContext.PullSubscription | None = None
        self._buffer: deque[Msg] = deque()
        self._keeper = _Keeper(ack_wait) if keep_alive else None

    def _config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self._durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self._ack_wait,
            max_deliver=-1,
            filter_subject=self._filter,
            deliver_policy=api.DeliverPolicy.ALL,
        )

    async def open(self) -> None:
        await self._subscribe()
        if self._keeper is not None:
            self._keeper.start()

    def _subscribed(self) -> bool:
        return self._sub is not None

    async def _subscribe(self) -> None:
        reconnects = self._conn.client().stats["reconnects"]
        js = self._conn.jetstream()
        with _mapped(f"consume {self._stream}/{self._durable}"):
            self._sub = await js.pull_subscribe(
                self._filter,
                durable=self._durable,
                stream=self._stream,
                config=self._config(),
            )
            # nats-py takes a durable that exists as it is: one made with another ack
            # wait (by an older engine, say) gets this one.
            info = await js.consumer_info(self._stream, self._durable)
            if info.config.ack_wait != self._ack_wait:
                info.config.ack_wait = self._ack_wait
                await js.add_consumer(self._stream, config=info.config)
        self._subscribed_now(reconnects)

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def aclose(self) -> None:
        self._closed = True
        if self._keeper is not None:
            await self._keeper.stop()
        # Hand fetched-but-unseen messages back at once so other members can take them.
        buffered, self._buffer = list(self._buffer), deque()
        for msg in buffered:
            with contextlib.suppress(Exception):
                await msg.nak()
        await self._unsubscribe()

    def __aiter__(self) -> _PullConsumer:
        return self

    async def __anext__(self) -> InboundMessage:
        backend = self._backend
        while True:
            if self._buffer:
                return _JetStreamMessage(self._buffer.popleft(), self._keeper)
            # (After a reconnect it is re-created: nats-py issue 504, pull subscriptions
            # do not recover by themselves.)
            if not await self._ready():
                continue
            nc = self._conn.client()
            sub = self._sub
            assert sub is not None
            try:
                msgs = await sub.fetch(backend._fetch_batch, timeout=backend._fetch_timeout)
            except TimeoutError:  # no messages (FetchTimeoutError) or no answer at all
                if await self._unhealthy(sub):
                    log.warning("consumer %s/%s is gone; re-creating", self._stream, self._durable)
                    await self._unsubscribe()
                continue
            except Exception as exc:
                if self._closed or self._conn.closing or nc.is_closed:
                    continue
                delay = self._backoff.next_delay()
                log.warning(
                    "fetch from %s/%s failed (%s: %s); re-subscribing in %.1fs",
                    self._stream,
                    self._durable,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._unsubscribe()
                await asyncio.sleep(delay)
                continue
            self._backoff.reset()
            self._buffer.extend(msgs)
            keeper = self._keeper
            if keeper is not None:
                for msg in msgs:
                    keeper.hold(msg)

    async def _unhealthy(self, sub: JetStreamContext.PullSubscription) -> bool:
        now = time.monotonic()
        if now - self._last_check < self._backend._health_check_interval:
            return False
        nc = self._conn.nc
        if nc is None or not nc.is_connected:
            return False  # a reconnect re-subscribes anyway
        self._last_check = now
        try:
            await sub.consumer_info()
        except nats.js.errors.NotFoundError:
            return True
        except Exception:
            return False
        return False
