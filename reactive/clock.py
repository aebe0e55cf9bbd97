"""Time for the runtime: the wall clock, or a manual one that tests move by hand."""

from __future__ import annotations

import time
from typing import Protocol

import anyio

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Where the runtime reads the time and waits for it."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline``."""
        ...


class SystemClock:
    """The wall clock."""

    # time.time itself: the engine reads the clock several times per event.
    now = staticmethod(time.time)

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.time()
        if delay > 0:
            await anyio.sleep(delay)


class ManualClock:
    """A clock that only moves when told to, so timeouts run in tests without sleeping."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = start
        self._changed = anyio.Event()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        while self._now < deadline:
            changed = self._changed
            await changed.wait()

    def advance(self, seconds: float) -> None:
        """Move time forward and wake everything whose deadline has passed."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        changed, self._changed = self._changed, anyio.Event()
        changed.set()
