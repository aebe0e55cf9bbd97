"""Wake-ups for the hot path, without anyio's per-call backend lookup.

``anyio.Event()`` asks which async library runs (sniffio, a context variable and a
task lookup) every time; the engine and the in-memory backend make one each time
a queue runs dry. On asyncio the concrete class is looked up once and reused.

A queue with one reader needs less than an event: ``new_waiter()`` is, on
asyncio, a bare future the reader awaits and a producer resolves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol

import anyio

__all__ = ["Waiter", "new_event", "new_waiter"]

_asyncio_event: type[anyio.Event] | None = None


def new_event() -> anyio.Event:
    """A new ``anyio.Event`` for the running async library."""
    global _asyncio_event
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # not on asyncio (trio, or no loop): the general way
        return anyio.Event()
    cls = _asyncio_event
    if cls is None:
        cls = _asyncio_event = type(anyio.Event())
    return cls()


class Waiter(Protocol):
    """A one-shot wake-up for one waiting task."""

    def set(self) -> None: ...

    def wait(self) -> Awaitable[object]: ...


class _FutureWaiter:
    """A ``Waiter`` on asyncio: the future itself is awaited (no event, no coroutine).

    Only one task may wait: cancelling a task cancels the future it awaits, which
    would wake any other task awaiting the same future.
    """

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future: asyncio.Future[None] = loop.create_future()

    def set(self) -> None:
        if not self._future.done():  # (cancelled with its waiter: nobody to wake)
            self._future.set_result(None)

    def wait(self) -> Awaitable[object]:
        return self._future


def new_waiter() -> Waiter:
    """A wake-up for one waiting task of the running async library."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return anyio.Event()
    return _FutureWaiter(loop)
