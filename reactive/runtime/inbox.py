"""The bounded queue between the triggers and one worker.

An anyio memory object stream yields to the event loop on every receive (its
checkpoint) and looks up the async backend each time; at tens of thousands of
events a second that hop is a large share of the engine's cost. This queue
touches the event loop only when it has to wait: a worker takes queued items
without suspending, and a trigger hands an item over without suspending while
there is room.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio

from reactive._events import Waiter, new_event, new_waiter

T = TypeVar("T")


class Inbox(Generic[T]):
    """A bounded FIFO for one consumer (a worker) and any number of producers."""

    __slots__ = ("_capacity", "_items", "_not_empty", "_not_full")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an inbox needs room for at least one item")
        self._items: deque[T] = deque()
        self._capacity = capacity
        self._not_empty: Waiter | None = None  # the one consumer's
        self._not_full: anyio.Event | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> bool:
        """Queue ``item`` if there is room; False (and nothing queued) if the inbox is full."""
        if len(self._items) >= self._capacity:
            return False
        self._items.append(item)
        waiter = self._not_empty
        if waiter is not None:
            self._not_empty = None
            waiter.set()
        return True

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting for room if the inbox is full."""
        while not self.put_nowait(item):
            waiter = self._not_full
            if waiter is None:
                waiter = self._not_full = new_event()
            await waiter.wait()

    def get_nowait(self) -> T:
        """The oldest item; IndexError if there is none."""
        item = self._items.popleft()
        waiter = self._not_full
        if waiter is not None and len(self._items) < self._capacity:
            self._not_full = None
            waiter.set()
        return item

    async def get(self) -> T:
        """The oldest item, waiting for one if the inbox is empty."""
        while not self._items:
            # A fresh one each time: a waiter left by a cancelled get is spent.
            waiter = self._not_empty = new_waiter()
            await waiter.wait()
        return self.get_nowait()
