"""A what-if experiment, NOT the engine as shipped: two small changes applied at run time.

Used only by the "engine + batching what-if" row of the report (``engine_nats.py
--what-if-batching``), to size the effect of a suggested change before anyone
makes it in ``reactive/``. Nothing here is imported by the real engine runs.

1. The KV watch iterator (``reactive.backends.nats._KVWatch.__anext__``) takes
   every entry already queued in nats-py's watcher without going through
   ``KeyWatcher.updates(timeout)`` -- that is ``asyncio.wait_for``, which in
   Python 3.11 creates a task and a timer and costs at least two event-loop
   iterations per entry, even when the entry is already there.
2. ``Engine._enqueue`` hands the item to the worker's stream with
   ``send_nowait`` (falling back to ``await send`` only when the stream is full):
   ``MemoryObjectSendStream.send`` starts with ``await checkpoint()``, one more
   loop iteration per entry.

Both keep the semantics (same order, same back-pressure when full); both make
the watch loop drain a burst of entries in one loop iteration, so the workers'
compare-and-set requests of that burst leave in one socket write.
"""

from __future__ import annotations

from typing import Any

import anyio


def apply() -> None:
    from nats.js.kv import KeyValue

    from reactive.backends import nats as nb
    from reactive.runtime import engine as eng

    orig_anext = nb._KVWatch.__anext__

    async def fast_anext(self: Any) -> Any:
        watcher = self._watcher
        if watcher is not None and not self._closed and not self._backend._closing:
            q = watcher._updates
            while q.qsize():
                head = q._queue[0]
                if head is None:  # end-of-replay marker: skip, as the original does
                    q.get_nowait()
                    continue
                if isinstance(head, KeyValue.Entry):
                    q.get_nowait()
                    return nb._to_entry(self._bucket, head)
                break  # a stop sentinel: let the original handle it
        return await orig_anext(self)

    nb._KVWatch.__anext__ = fast_anext  # type: ignore[method-assign]

    async def enqueue(self: Any, shard_key: str, item: tuple[Any, ...]) -> None:
        self._inflight += 1
        stream = self._senders[hash(shard_key) % len(self._senders)]
        try:
            try:
                stream.send_nowait(item)
            except anyio.WouldBlock:
                await stream.send(item)
        except BaseException:
            self._inflight -= 1
            raise

    eng.Engine._enqueue = enqueue  # type: ignore[method-assign]
