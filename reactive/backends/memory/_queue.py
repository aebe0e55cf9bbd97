"""Wake-ups and unbounded queues for the in-memory backend, built lazily on anyio."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

from reactive._events import Waiter, new_event, new_waiter

__all__ = ["_Queue", "_Signal"]

T = TypeVar("T")


class _Signal:
    """Wakes everyone currently waiting; cheap to fire when nobody waits.

    The Event is created only when someone waits, so firing with no waiters
    allocates nothing and constructing the backend needs no running event loop.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: anyio.Event | None = None

    def fire(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    def event(self) -> anyio.Event:
        """The event the next ``fire`` sets; take it *before* re-checking state, then wait."""
        if self._event is None:
            self._event = new_event()
        return self._event


class _Queue(Generic[T]):
    """An unbounded single-reader FIFO whose iterator ends when the queue is closed."""

    __slots__ = ("_items", "_waiter", "closed")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: Waiter | None = None  # the reader's, while it waits
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    def put(self, item: T) -> None:
        if not self.closed:
            self._items.append(item)
            if self._waiter is not None:
                self._wake()

    def close(self) -> None:
        # Buffered items are dropped, as a closed NATS subscription drops its pending messages.
        self.closed = True
        self._items.clear()
        self._wake()

    def __aiter__(self) -> _Queue[T]:
        return self

    async def __anext__(self) -> T:
        # No checkpoint when an item is there (a burst is taken in one loop turn); an
        # empty queue waits, and the wait is where cancellation arrives.
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._items:
                return self._items.popleft()
            waiter = self._waiter = new_waiter()  # fresh: one left by a cancelled wait is spent
            await waiter.wait()
