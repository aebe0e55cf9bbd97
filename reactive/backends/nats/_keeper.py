"""Keeping what a process holds from coming again while it works on it (``keep_alive``).

The server sends a message again when its consumer's ``ack_wait`` passes without an
acknowledgement, whether the process that took it died or is merely busy with it (or
has it queued behind others). A short ack wait hands a dead process's messages on
soon; to keep it from sending a busy process's messages again, that process tells the
server, with ``+WPI`` ("work in progress": the consumer's ack timer starts over), that
it is alive and still has them.

One task per consume context does it every third of the ack wait, for each message the
context took at least one such period before and has not settled: a message gets its
first ``+WPI`` one to two periods after it arrived, and then one a period, so no gap
reaches the ack wait while the process's event loop runs. When the process dies, or the
context ends, the messages it did not settle come again one ack wait after the last
``+WPI``. A message settled within a period (almost all of them) costs no ``+WPI``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from nats.aio.msg import Msg

__all__ = ["_Keeper"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend

_WPI: Final = b"+WPI"


class _Keeper:
    """The messages a consume context holds, each with the period it arrived in."""

    __slots__ = ("_generation", "_held", "_period", "_task")

    def __init__(self, ack_wait: float) -> None:
        self._period = ack_wait / 3
        # reply subject (one per delivery) -> (the message, the period it arrived in)
        self._held: dict[str, tuple[Msg, int]] = {}
        self._generation = 0
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, msg: Msg) -> None:
        reply = msg.reply
        if reply:
            self._held[reply] = (msg, self._generation)

    def release(self, msg: Msg) -> None:
        self._held.pop(msg.reply, None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop keeping: what is held and not settled comes again after the ack wait."""
        task, self._task = self._task, None
        self._held.clear()
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._period)
            try:
                await self.tick()
            except Exception:  # (never expected: the held messages would come again)
                log.exception("keeping held messages in progress failed")

    async def tick(self) -> int:
        """One period: ``+WPI`` for what arrived before the last one and is still held.
        Returns how many were sent."""
        before = self._generation
        self._generation = before + 1
        held = self._held
        sent = 0
        for reply, (msg, arrived) in list(held.items()):
            if msg._ackd:  # settled (perhaps while this tick was sending)
                held.pop(reply, None)
            elif arrived < before:
                # (Not connected: the server has it until the ack wait; nothing to do.)
                with contextlib.suppress(Exception):
                    await msg._client.publish(reply, _WPI)
                sent += 1
        return sent
