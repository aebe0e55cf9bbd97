"""The reply inbox of JetStream requests: publishes awaiting their acks, and direct gets."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

__all__ = ["_PubAck", "_Replies"]


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_ack_decoder: Final = msgspec.json.Decoder(_PubAck)


class _Replies:
    """JetStream requests (publishes awaiting their acks, direct gets) on one wildcard inbox.

    What ``JetStreamContext.publish`` does, without what it costs per call on
    the engine's hot path (a NUID and random token, ``asyncio.wait_for``, the
    ack parsed by ``json`` into a dataclass): a counter names the reply, one
    sweep every 0.25 s times out the overdue, msgspec reads the ack.
    """

    def __init__(self, nc: Client, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._pending: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._next = 0
        self._sub: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        for fut, _ in self._pending.values():
            if not fut.done():
                fut.set_exception(nats.errors.ConnectionClosedError())
        self._pending.clear()

    async def _on_reply(self, msg: Msg) -> None:
        found = self._pending.pop(msg.subject[self._cut :], None)
        if found is not None and not found[0].done():
            found[0].set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            late = [t for t, (_, deadline) in self._pending.items() if deadline <= now]
            for token in late:
                fut, _ = self._pending.pop(token)
                if not fut.done():
                    fut.set_exception(nats.errors.TimeoutError())

    async def request(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
        timeout: float | None = None,
    ) -> Msg:
        """Publish with a reply subject of this inbox and return the reply (nats-py's
        TimeoutError after ``timeout`` seconds, the inbox's own by default)."""
        self._next += 1
        token = str(self._next)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Msg] = loop.create_future()
        self._pending[token] = (fut, loop.time() + (timeout or self._timeout))
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
            return await fut
        finally:
            self._pending.pop(token, None)

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> _PubAck:
        """Publish to a stream's subject and return its ack; APIError if JetStream refused it."""
        msg = await self.request(subject, data, headers)
        if not msg.data:
            if msg.headers and msg.headers.get("Status") == "503":
                raise nats.js.errors.NoStreamResponseError
            raise nats.js.errors.APIError(description=f"empty reply to a publish on {subject}")
        try:
            ack = _ack_decoder.decode(msg.data)
        except msgspec.DecodeError:
            raise nats.js.errors.APIError(
                description=f"unreadable ack: {msg.data[:200]!r}"
            ) from None
        if ack.error is not None:
            raise nats.js.errors.APIError.from_error(msgspec.structs.asdict(ack.error))
        return ack
