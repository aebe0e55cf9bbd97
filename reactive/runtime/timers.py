"""One timer heap for deadlines, task timeouts, cooldown ends and outbox hand-overs.

Timers are kept only in memory; they are rebuilt from state whenever an
execution is evaluated (and the KV watch replays every execution at start), so
a restart loses none.

With a ``horizon``, a timer due later than that is offered to ``on_far``
instead; when it takes it (returns True) the timer is not kept: the engine then
evaluates the execution again (a replay) before it is due, and its timer is set
then. So the engine holds nothing per execution that waits far ahead.
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

    def __init__(
        self,
        clock: Clock,
        fire: Callable[[Hashable], None],
        *,
        horizon: float | None = None,
        on_far: Callable[[float, Hashable], bool] | None = None,
    ) -> None:
        self._clock = clock
        self._fire = fire
        self.horizon = horizon
        self._on_far = on_far
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
        if (
            self.horizon is not None
            and self._on_far is not None
            and when > self._clock.now() + self.horizon
            and self._on_far(when, target)
        ):
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
