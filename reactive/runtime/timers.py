"""One timer heap for what is this process's own business: the claim sweep, and the retry of
a key after a transient failure (with backoff), or after its worker was saturated.

An execution's time (its deadline, its task's timeout, a cooldown's end, another
engine's grace period) is not kept here: it is a message schedule in NATS
(``reactive.runtime.schedules``), which fires once whichever engine is alive.
What is kept here is lost with the process, and needs not outlive it: a new
process sweeps at its start, and a failed evaluation comes again from NATS (a
timer's message is handed back, a message redelivered, a revision replayed).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Hashable

import anyio

from reactive.clock import Clock

__all__ = ["Timers"]


class Timers:
    """Earliest-first timers, at most one pending per target (the earliest wins)."""

    def __init__(self, clock: Clock, fire: Callable[[Hashable], None]) -> None:
        self._clock = clock
        self._fire = fire
        self._heap: list[tuple[float, int, Hashable]] = []
        self._at: dict[Hashable, float] = {}
        self._seq = itertools.count()
        self._wake = anyio.Event()
        self._sleeping: anyio.CancelScope | None = None
        self._sleeping_until = float("inf")

    def __len__(self) -> int:
        return len(self._at)

    def schedule(self, when: float, target: Hashable) -> None:
        """Fire ``target`` at ``when`` unless it already has an earlier timer."""
        current = self._at.get(target)
        if current is not None and current <= when:
            return
        self._at[target] = when
        heapq.heappush(self._heap, (when, next(self._seq), target))
        if when < self._sleeping_until:
            if self._sleeping is not None:
                self._sleeping.cancel()
            self._wake.set()

    def next_due(self) -> float | None:
        while self._heap and self._at.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def run(self) -> None:
        while True:
            due = self.next_due()
            if due is None:
                self._wake = anyio.Event()
                self._sleeping_until = float("inf")
                await self._wake.wait()
                continue
            if due <= self._clock.now():
                when, _, target = heapq.heappop(self._heap)
                if self._at.get(target) == when:
                    del self._at[target]
                    self._fire(target)
                continue
            self._wake = anyio.Event()
            self._sleeping_until = due
            with anyio.CancelScope() as scope:
                self._sleeping = scope
                await self._clock.sleep_until(due)
            self._sleeping = None
