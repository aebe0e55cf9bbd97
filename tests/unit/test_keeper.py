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


def _held(*replies: str) -> tuple[_Client, _Keeper, list[_Msg]]:
    """A keeper (3 s ack wait) holding a message for each of ``replies``."""
    client, keeper = _Client(), _Keeper(3.0)
    msgs = [_Msg(client, reply) for reply in replies]
    for msg in msgs:
        keeper.hold(msg)  # type: ignore[arg-type]
    return client, keeper, msgs


async def test_a_held_message_gets_in_progress_from_its_second_period_on() -> None:
    client, keeper, (_, settled) = _held("r.old", "r.settled")
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
    client, keeper, (_, second) = _held("r.1", "r.2")
    await keeper.tick()

    def ack_second() -> None:  # acknowledged while the +WPI of the first goes out
        second._ackd = True
        keeper.release(second)  # type: ignore[arg-type]

    client.on_send = ack_second
    assert await keeper.tick() == 1
    assert client.sent == [("r.1", b"+WPI")]
    assert len(keeper) == 1
