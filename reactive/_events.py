"""``anyio.Event`` without anyio's per-call backend lookup on the hot path.

``anyio.Event()`` asks which async library runs (sniffio, a context variable and a
task lookup) every time; the engine and the in-memory backend make one each time
a queue runs dry. On asyncio the concrete class is looked up once and reused.
"""

from __future__ import annotations

import asyncio

import anyio

__all__ = ["new_event"]

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
