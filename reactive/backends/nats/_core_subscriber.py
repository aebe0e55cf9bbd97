"""Core NATS subscriptions: at-most-once, so a message's acknowledgements do nothing.

A subscriber that is not connected when a message is published never sees it.
Use a stream where that matters.
"""

from __future__ import annotations

from collections.abc import Mapping

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from reactive.backends.base import InboundMessage

__all__ = ["_CoreIterator"]


class _CoreMessage:
    """A core NATS message: acknowledgements do nothing."""

    __slots__ = ("_headers", "_msg")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._headers: dict[str, str] = dict(msg.headers) if msg.headers else {}

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
        return 1

    @property
    def stream(self) -> str | None:
        return None

    @property
    def sequence(self) -> int | None:
        return None

    @property
    def time(self) -> float | None:
        return None

    async def ack(self) -> None:
        return None

    async def nak(self, delay: float) -> None:
        return None

    async def term(self) -> None:
        return None

    async def in_progress(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<core message {self.subject} {len(self.data)}B>"


class _CoreIterator:
    def __init__(self, sub: Subscription) -> None:
        self._messages = sub.messages

    def __aiter__(self) -> _CoreIterator:
        return self

    async def __anext__(self) -> InboundMessage:
        msg = await self._messages.__anext__()
        return _CoreMessage(msg)
