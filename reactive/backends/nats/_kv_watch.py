"""The supervised KV watch: every key's latest value, then every change, surviving a lost watcher.

A re-created watcher replays the bucket again, so watch delivery is at-least-once.
Listing keys is a watch too: one that replays headers only, and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.kv import KeyValue, StopIterSentinel

from reactive.backends.base import KVEntry, Operation
from reactive.backends.nats._errors import _mapped
from reactive.backends.nats._supervised import _Supervised
from reactive.errors import TransientBackendError

if TYPE_CHECKING:
    from reactive.backends.nats.backend import NatsBackend

__all__ = ["_KVWatch", "_list_keys", "_to_entry"]

log = logging.getLogger("reactive.backends.nats")  # one logger for the whole backend

_KV_OPERATIONS: Final[dict[str | None, Operation]] = {
    None: "PUT",
    "DEL": "DEL",
    "PURGE": "PURGE",
}


def _to_entry(bucket: str, entry: KeyValue.Entry) -> KVEntry:
    return KVEntry(
        bucket=bucket,
        key=entry.key,
        value=entry.value or b"",
        revision=int(entry.revision or 0),
        operation=_KV_OPERATIONS.get(entry.operation, "PUT"),
    )


class _KVWatch(_Supervised):
    """A supervised KV watch: an async iterator of KVEntry that survives a lost watcher.

    A re-created watcher replays the bucket: a key's latest revision may come again.
    """

    def __init__(self, backend: NatsBackend, bucket: str, pattern: str) -> None:
        super().__init__(backend)
        self._bucket = bucket
        self._pattern = pattern
        self._what = f"watch {bucket}/{pattern}"
        self._watcher: KeyValue.KeyWatcher | None = None

    async def open(self) -> None:
        """Start the first watcher; errors here (e.g. a missing bucket) reach the caller."""
        await self._subscribe()

    def _subscribed(self) -> bool:
        return self._watcher is not None

    async def _subscribe(self) -> None:
        kv = await self._backend._kv(self._bucket)
        reconnects = self._conn.client().stats["reconnects"]
        with _mapped(self._what):
            self._watcher = await kv.watch(self._pattern)
        self._subscribed_now(reconnects)

    async def _unsubscribe(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        self._closed = True
        await self._unsubscribe()

    def __aiter__(self) -> _KVWatch:
        return self

    async def __anext__(self) -> KVEntry:
        backend = self._backend
        conn = self._conn
        while True:
            watcher = self._watcher
            nc = conn.nc
            if (
                watcher is None
                or self._closed
                or conn.closing
                or nc is None
                or nc.is_closed
                or nc.stats["reconnects"] != self._reconnects
                or self._generation != conn.generation
            ):  # (the common case is decided here, without a coroutine per entry)
                if not await self._ready():
                    continue
                watcher = self._watcher
            assert watcher is not None
            queue = cast("asyncio.Queue[Any]", watcher._updates)
            try:
                # Entries already queued are taken at once: updates() is asyncio.wait_for,
                # a task and a timer per entry, which splits a burst over many loop turns.
                item = (
                    queue.get_nowait()
                    if queue.qsize()
                    else await watcher.updates(timeout=backend._poll_interval)  # type: ignore[no-untyped-call]
                )
            except TimeoutError:
                if await self._unhealthy(watcher):
                    log.warning(
                        "watch %s/%s lost its consumer; re-creating", self._bucket, self._pattern
                    )
                    await self._unsubscribe()
                    await self._backoff.sleep()
                continue
            if item is None:  # the end-of-replay marker: not reliable, so only a marker
                self._backoff.reset()
                continue
            if isinstance(item, StopIterSentinel):
                if watcher is self._watcher:
                    await self._unsubscribe()
                continue
            self._backoff.reset()
            return _to_entry(self._bucket, cast(KeyValue.Entry, item))

    async def _unhealthy(self, watcher: KeyValue.KeyWatcher) -> bool:
        """Periodically ask the server whether the watcher's consumer still delivers to us."""
        now = time.monotonic()
        if now - self._last_check < self._backend._health_check_interval:
            return False
        nc = self._conn.nc
        if nc is None or not nc.is_connected:
            return False  # a reconnect re-creates the watcher anyway
        self._last_check = now
        sub = cast("JetStreamContext.PushSubscription | None", watcher._sub)
        if sub is None:
            return True
        try:
            info = await sub.consumer_info()
        except nats.js.errors.NotFoundError:
            return True
        except Exception:  # transient; look again next time
            return False
        return info.push_bound is False


async def _list_keys(kv: KeyValue, js: JetStreamContext, bucket: str, pattern: str) -> list[str]:
    """The keys (not deleted) that match ``pattern``, read by a watch that replays headers only.

    Not ``kv.keys(filters=...)``: in nats-py 2.16 its filters are substring matches
    done client-side (issue 768), and it stops at the end-of-replay marker, which
    can come early (issue 842).
    """
    stream = f"KV_{bucket}"
    subject = f"$KV.{bucket}.{pattern}"
    what = f"keys {bucket}/{pattern}"
    with _mapped(what):
        try:
            await js.get_msg(stream, seq=1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return []  # no message at all on a matching subject
        watcher = await kv.watch(pattern, meta_only=True)
    alive: dict[str, bool] = {}
    marker_seen = False
    try:
        while True:
            try:
                with _mapped(what):
                    item = await watcher.updates(timeout=2.0)  # type: ignore[no-untyped-call]
            except TransientBackendError:
                if marker_seen:
                    break  # nothing more is coming (entries expired meanwhile)
                raise
            if item is None:
                marker_seen = True
                continue
            if isinstance(item, StopIterSentinel):
                raise TransientBackendError(f"{what}: watcher stopped")
            entry = cast(KeyValue.Entry, item)
            alive[entry.key] = entry.operation not in ("DEL", "PURGE")
            if entry.delta == 0:
                break
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
    return sorted(key for key, is_alive in alive.items() if is_alive)
