"""For a test that judges a claim bounded in time on a real server: how long its own event
loop stalled meanwhile (a loaded machine), so that it judges only what it can.

A keep-alive sent late because the test's process was not scheduled says nothing about
the code: such a test measures the stall and, past its budget, skips with the reason
instead of failing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest

__all__ = ["LoopWatch", "stall_excused", "watched_loop"]


class LoopWatch:
    """The longest a tick of the loop came late while watched, in seconds."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def _run(self, tick: float) -> None:
        while True:
            start = time.monotonic()
            await anyio.sleep(tick)
            self.longest = max(self.longest, time.monotonic() - start - tick)

    def judge(self, budget: float, what: str) -> None:
        """Skip the test if the loop stalled longer than ``budget`` seconds."""
        if self.longest > budget:
            pytest.skip(
                f"the test's event loop stalled {self.longest:.1f} s (over {budget} s): "
                f"{what} cannot be judged on this machine now"
            )


@asynccontextmanager
async def watched_loop(tick: float = 0.05) -> AsyncIterator[LoopWatch]:
    watch = LoopWatch()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch._run, tick)
        try:
            yield watch
        finally:
            tg.cancel_scope.cancel()


@asynccontextmanager
async def stall_excused(budget: float, what: str) -> AsyncIterator[LoopWatch]:
    """Around a part that a stall of the test's own process longer than ``budget`` seconds
    could fail (an acknowledgement sent after the ack wait, on a real server): a failure
    there after such a stall skips the test, saying why. Any other failure stands."""
    async with watched_loop() as loop:
        try:
            yield loop
        except (AssertionError, TimeoutError):
            loop.judge(budget, what)
            raise
