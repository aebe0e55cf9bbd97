"""The NATS backend's keeper of held messages (``keep_alive``), without a server: which
messages get a ``+WPI`` at each period, and a settle in the middle of a period's sends."""

from __future__ import annotations

from typing import Any

import pytest

from reactive.backends.nats._keeper import _Keeper

pytestmark = pytest.mark.anyio


class _Client:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.on_send: Any = None

    async def publish(self, subject: str, payload: bytes) -> None:
        self.sent.append((subject, payload))
        if self.on_send is not None:
            self.on_send()


class _Msg:
    def __init__(self, client: _Client, reply: str) -> None:
        self._client = client
        self.reply = reply
        self._ackd = False


async def test_a_held_message_gets_in_progress_from_its_second_period_on() -> None:
    client = _Client()
    keeper = _Keeper(3.0)
    old, settled = _Msg(client, "r.old"), _Msg(client, "r.settled")
    keeper.hold(old)  # type: ignore[arg-type]
    keeper.hold(settled)  # type: ignore[arg-type]
    assert await keeper.tick() == 0  # (arrived in this period: nothing yet)
    late = _Msg(client, "r.late")
    keeper.hold(late)  # type: ignore[arg-type]
    settled._ackd = True
    keeper.release(settled)  # type: ignore[arg-type]
    assert await keeper.tick() == 1
    assert client.sent == [("r.old", b"+WPI")]
    assert await keeper.tick() == 2
    assert len(keeper) == 2


async def test_a_message_settled_while_a_period_sends_is_dropped_once() -> None:
    client = _Client()
    keeper = _Keeper(3.0)
    first, second = _Msg(client, "r.1"), _Msg(client, "r.2")
    keeper.hold(first)  # type: ignore[arg-type]
    keeper.hold(second)  # type: ignore[arg-type]
    await keeper.tick()

    def ack_second() -> None:  # acknowledged while the +WPI of the first goes out
        second._ackd = True
        keeper.release(second)  # type: ignore[arg-type]

    client.on_send = ack_second
    assert await keeper.tick() == 1
    assert client.sent == [("r.1", b"+WPI")]
    assert len(keeper) == 1
