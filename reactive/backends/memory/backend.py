"""``MemoryBackend``: the ``Backend`` protocol in process, over the buckets, streams and
durable consumers of this package's modules.

Everything runs on one event loop and mutates state synchronously (no ``await``
between reading and writing shared state), which is what makes the compare-and-set
and the "snapshot then subscribe" of a watch atomic without locks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING

import msgspec

from reactive.backends.base import SCHEDULE_HEADER, InboundMessage, KVEntry
from reactive.backends.memory._consumers import _Consumer, _ConsumerReader
from reactive.backends.memory._kv import (
    _EXPECTING,
    _Bucket,
    _bucket_append,
    _check_key,
    _expire,
    _expires_at,
    _Watcher,
)
from reactive.backends.memory._partitioned import (
    _PartitionedBuckets,
    _PartitionReader,
    _PartitionSet,
)
from reactive.backends.memory._streams import (
    _fan_out,
    _publish_subject_problem,
    _Stream,
    _Subscription,
)
from reactive.clock import Clock, SystemClock
from reactive.errors import BackendError, ConflictError, NotFoundError, PayloadTooLargeError
from reactive.subjects import (
    matches_pattern,
    subjects_overlap,
    validate_key_pattern,
    validate_subject,
)

if TYPE_CHECKING:
    from reactive.backends.base import Backend

__all__ = ["MSG_ID_HEADER", "MemoryBackend", "PublishedMessage"]

# The header NATS uses to carry a publish's deduplication id.
MSG_ID_HEADER = "Nats-Msg-Id"

_EMPTY_HEADERS: Mapping[str, str] = MappingProxyType({})


class PublishedMessage(msgspec.Struct, frozen=True, gc=False):
    """One call to ``publish``, recorded for tests to assert on.

    ``stream`` is the first stream (in creation order) whose subjects captured the
    subject, or None for a core-only publish; ``duplicate`` says whether that stream
    dropped it as a duplicate of an earlier ``msg_id``.
    """

    subject: str
    data: bytes
    headers: dict[str, str]
    msg_id: str | None
    duplicate: bool
    stream: str | None


def _check_name(name: str, what: str) -> None:
    # NATS stream / bucket / durable names: non-empty, no whitespace, dots or wildcards.
    if validate_subject(name, wildcards=False) is not None or "." in name:
        raise ValueError(f"invalid {what} name {name!r}")


class MemoryBackend(_PartitionedBuckets):
    """The ``Backend`` protocol in process, with NATS JetStream semantics.

    (Partitioned buckets are in ``_partitioned``.)
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        duplicate_window: float = 120.0,
        max_payload: int = 1024 * 1024,
    ) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.duplicate_window = duplicate_window
        # A value or message larger than this (headers included) is refused, as NATS does
        # (its default max payload: 1 MiB).
        self.max_payload = max_payload
        self.published: list[PublishedMessage] = []
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, _Stream] = {}
        self._subscriptions: list[_Subscription] = []
        self._round_robin: dict[str, int] = {}  # queue group -> deliveries so far
        self._consumers: dict[tuple[str, str], _Consumer] = {}
        self._readers: set[_ConsumerReader] = set()
        self._partition_sets: dict[str, _PartitionSet] = {}
        self._partition_readers: set[_PartitionReader] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._closed = False

    async def close(self) -> None:
        """End every open watch, subscription and consumer iterator. State is kept."""
        self._closed = True
        for bucket in self._buckets.values():
            for watcher in bucket.watchers:
                watcher.queue.close()
        for sub in self._subscriptions:
            sub.queue.close()
        for reader in self._readers:
            reader.closed = True
        for consumer in self._consumers.values():
            consumer.signal.fire()
        self._close_partitions()

    def _check_size(self, op: str, data: bytes, headers: Mapping[str, str]) -> None:
        """Refuse what NATS would: more than ``max_payload`` bytes, headers included."""
        size = len(data) + (
            12 + sum(len(k) + len(v) + 4 for k, v in headers.items()) if headers else 0
        )
        if size > self.max_payload:
            raise PayloadTooLargeError(
                f"{op}: {size} bytes (headers included) are more than the max payload "
                f"of {self.max_payload} bytes"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("the backend is closed")

    def idle(self) -> bool:
        """True when nothing is deliverable right now that its reader has not yet taken.

        Counts buffered watch entries, buffered subscription messages, and for every
        durable consumer with at least one open context, and for every partitioned
        bucket with a member: new matching messages, and redeliveries and message
        schedules already due on the clock. What is due in the future, and consumers
        nobody is reading, do not count.
        """
        for bucket in self._buckets.values():
            for watcher in bucket.watchers:
                if watcher.queue:
                    return False
        for sub in self._subscriptions:
            if sub.queue:
                return False
        now = self.clock.now()
        for consumer in self._consumers.values():
            if consumer.readers and consumer.has_deliverable(now):
                return False
        return self._partitions_idle(now)

    # -- KV ----------------------------------------------------------------

    def _bucket(self, bucket: str) -> _Bucket:
        b = self._buckets.get(bucket)
        if b is None:
            raise NotFoundError(f"bucket {bucket!r} not found")
        if b.expiring:
            _expire(b, self.clock.now())
        return b

    async def ensure_bucket(self, bucket: str) -> None:
        _check_name(bucket, "bucket")
        if bucket not in self._buckets:
            self._buckets[bucket] = _Bucket(bucket)

    def peek(self, bucket: str, key: str) -> KVEntry | None:
        """``kv_get`` without awaiting, for test assertions; None for a missing bucket too."""
        b = self._buckets.get(bucket)
        if b is not None and b.expiring:
            _expire(b, self.clock.now())
        entry = b.latest.get(key) if b is not None else None
        return entry if entry is not None and entry.operation == "PUT" else None

    def peek_keys(self, bucket: str, pattern: str = ">") -> list[str]:
        """``kv_keys`` without awaiting, for test assertions; [] for a missing bucket."""
        b = self._buckets.get(bucket)
        if b is None:
            return []
        if b.expiring:
            _expire(b, self.clock.now())
        return sorted(
            k for k, e in b.latest.items() if e.operation == "PUT" and matches_pattern(k, pattern)
        )

    async def kv_get(self, bucket: str, key: str, *, leader: bool = False) -> KVEntry | None:
        b = self._bucket(bucket)  # (one copy, the leader's: no replica lags here)
        entry = b.latest.get(key)
        if entry is None:
            _check_key(key)  # (a key that is stored was checked when it was first written)
            return None
        if entry.operation != "PUT":
            return None
        return entry

    async def kv_create(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> int:
        b = self._bucket(bucket)
        entry = b.latest.get(key)
        if entry is None:
            _check_key(key)
        elif entry.operation == "PUT":
            raise ConflictError(
                f"key {key!r} already exists in {bucket!r} (revision {entry.revision})"
            )
        if len(value) + 4096 > self.max_payload:
            self._check_size(f"create {bucket}/{key}", value, _EXPECTING)
        expires_at = _expires_at(self.clock.now(), ttl)
        return _bucket_append(b, key, bytes(value), False, expires_at).revision

    async def kv_update(
        self, bucket: str, key: str, value: bytes, revision: int, *, ttl: float | None = None
    ) -> int:
        b = self._buckets.get(bucket) or self._bucket(bucket)  # (the lookup inline, then its error)
        if b.expiring:
            _expire(b, self.clock.now())
        entry = b.latest.get(key)
        if entry is None:
            _check_key(key)
        # 0 stands for "no entry at all", as with Nats-Expected-Last-Subject-Sequence.
        latest = entry.revision if entry is not None else 0
        if latest != revision:
            raise ConflictError(
                f"key {key!r} in {bucket!r} is at revision {latest}, not {revision}"
            )
        if len(value) + 4096 > self.max_payload:
            self._check_size(f"update {bucket}/{key}", value, _EXPECTING)
        if ttl is not None:
            return _bucket_append(
                b, key, bytes(value), False, _expires_at(self.clock.now(), ttl)
            ).revision
        return _bucket_append(b, key, bytes(value), deleted=False).revision

    async def kv_put(self, bucket: str, key: str, value: bytes, *, ttl: float | None = None) -> int:
        b = self._bucket(bucket)
        if key not in b.latest:
            _check_key(key)
        if len(value) + 4096 > self.max_payload:
            self._check_size(f"put {bucket}/{key}", value, {})
        expires_at = _expires_at(self.clock.now(), ttl)
        return _bucket_append(b, key, bytes(value), False, expires_at).revision

    async def kv_put_unacked(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> None:
        b = self._buckets.get(bucket) or self._bucket(bucket)
        if b.expiring:
            _expire(b, self.clock.now())
        if ttl is not None:
            await self.kv_put(bucket, key, value, ttl=ttl)
            return
        if key not in b.latest:
            _check_key(key)
        if len(value) + 4096 > self.max_payload:
            self._check_size(f"put {bucket}/{key}", value, {})
        _bucket_append(b, key, bytes(value), deleted=False)

    async def kv_delete(self, bucket: str, key: str) -> None:
        # Like NATS, a delete marker is written even if the key never existed.
        b = self._bucket(bucket)
        _check_key(key)
        _bucket_append(b, key, b"", deleted=True)

    async def kv_keys(self, bucket: str, pattern: str = ">") -> list[str]:
        b = self._bucket(bucket)
        return sorted(
            key
            for key, entry in b.latest.items()
            if entry.operation == "PUT" and matches_pattern(key, pattern)
        )

    @asynccontextmanager
    async def kv_watch(
        self, bucket: str, pattern: str = ">"
    ) -> AsyncIterator[AsyncIterator[KVEntry]]:
        self._check_open()
        b = self._bucket(bucket)
        reason = validate_key_pattern(pattern)
        if reason is not None:
            raise ValueError(reason)
        watcher = _Watcher(pattern)
        # Snapshot and registration happen with no await in between, so no change
        # can fall between the replay and the live updates.
        replay = sorted(
            (e for k, e in b.latest.items() if matches_pattern(k, pattern)),
            key=lambda e: e.revision,
        )
        for entry in replay:
            watcher.queue.put(entry)
        b.watchers.append(watcher)
        try:
            yield watcher.queue
        finally:
            watcher.queue.close()
            b.watchers.remove(watcher)

    # -- streams and publishing -------------------------------------------

    async def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        work_queue: bool = False,
        schedules: bool = False,
    ) -> None:
        _check_name(name, "stream")
        for subject in subjects:
            reason = validate_subject(subject)
            if reason is not None:
                raise ValueError(reason)
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = _Stream(name, work_queue=work_queue, schedules=schedules)
        elif work_queue and not stream.work_queue:
            raise BackendError(
                f"stream {name} exists with limits retention; it must be a work queue: "
                "delete it, or give the engine another stream name"
            )
        stream.schedules = stream.schedules or schedules
        for subject in subjects:
            stream.add_subject(subject)

    def _stream(self, name: str) -> _Stream:
        s = self._streams.get(name)
        if s is None:
            raise NotFoundError(f"stream {name!r} not found")
        return s

    async def sync_schedules(
        self, stream: str, prefix: str, wanted: Mapping[str, Mapping[str, str]]
    ) -> None:
        for subject in self._stream(stream).resync(prefix, wanted):
            await self.publish(subject, b"", headers=wanted[subject])

    def next_schedule(self) -> float | None:
        """When the earliest pending message schedule of any stream fires (None: none pending).

        ``TestEngine.advance`` moves the clock from one to the next, as it does through
        the engine's own timers."""
        dues = [due for s in self._streams.values() if (due := s.next_schedule()) is not None]
        return min(dues, default=None)

    def peek_stream(
        self, stream: str, subject: str = ">"
    ) -> list[tuple[str, bytes, Mapping[str, str]]]:
        """The messages a stream holds (subject, data, headers) on ``subject``, for test
        assertions: neither removed (acknowledged from a work queue) nor fired schedules;
        schedules due on the clock have fired."""
        return self._stream(stream).held(subject, self.clock.now())

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> None:
        reason = _publish_subject_problem(subject)
        if reason is not None:
            raise ValueError(reason)
        data = bytes(data)
        given = dict(headers) if headers else {}
        if len(data) + 4096 > self.max_payload:
            sent = {**given, MSG_ID_HEADER: msg_id} if msg_id is not None else given
            self._check_size(f"publish {subject}", data, sent)
        # On the wire the id travels as the Nats-Msg-Id header, so readers see it too;
        # an id given only as that header deduplicates as well.
        delivered: Mapping[str, str]
        if msg_id is not None:
            delivered = MappingProxyType({**given, MSG_ID_HEADER: msg_id})
        else:
            delivered = MappingProxyType(given) if given else _EMPTY_HEADERS
        dedupe_id = msg_id if msg_id is not None else given.get(MSG_ID_HEADER)

        first_stream: str | None = None
        first_duplicate = False
        now = self.clock.now()
        scheduling = bool(given) and SCHEDULE_HEADER in given
        for stream in self._streams.values():
            if not stream.captures(subject):
                continue
            if scheduling:
                at, target = stream.check_schedule(given, now)
            duplicate = dedupe_id is not None and stream.is_duplicate(
                dedupe_id, now, self.duplicate_window
            )
            if not duplicate:
                stored = stream.store(subject, data, delivered, now)
                if dedupe_id is not None:
                    stream.remember(dedupe_id, now)
                if scheduling:
                    stream.schedule(stored, at, target)
                    stream.fire_due(now)  # (a time that has passed fires at once)
            if first_stream is None:
                first_stream, first_duplicate = stream.name, duplicate

        self.published.append(
            PublishedMessage(subject, data, given, msg_id, first_duplicate, first_stream)
        )
        if self._subscriptions:
            _fan_out(self._subscriptions, self._round_robin, subject, data, delivered)

    @asynccontextmanager
    async def subscribe(
        self, subject: str, *, queue: str | None = None
    ) -> AsyncIterator[AsyncIterator[InboundMessage]]:
        self._check_open()
        reason = validate_subject(subject)
        if reason is not None:
            raise ValueError(reason)
        sub = _Subscription(subject, queue)
        self._subscriptions.append(sub)
        try:
            yield sub.queue
        finally:
            sub.queue.close()
            self._subscriptions.remove(sub)

    # -- durable consumers -------------------------------------------------

    @asynccontextmanager
    async def consume(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        keep_alive: bool = False,
    ) -> AsyncIterator[AsyncIterator[InboundMessage]]:
        self._check_open()
        s = self._stream(stream)
        _check_name(durable, "durable")
        reason = validate_subject(filter_subject)
        if reason is not None:
            raise ValueError(reason)
        consumer = self._consumers.get((stream, durable))
        _check_unique(s, consumer, durable, filter_subject)
        if consumer is None:
            consumer = _Consumer(s, durable, filter_subject, ack_wait, self.clock)
            self._consumers[(stream, durable)] = consumer
            s.consumers.append(consumer)
        else:
            # Reopening updates the config, as a consumer update on the server does;
            # the delivery position and pending set are kept.
            consumer.filter_subject = filter_subject
            consumer.ack_wait = ack_wait
        reader = _ConsumerReader(consumer, keep_alive)
        consumer.readers += 1
        self._readers.add(reader)
        try:
            yield reader
        finally:
            # Messages this context took but did not ack stay pending and come back
            # after ack_wait, as on a real server.
            reader.closed = True
            consumer.readers -= 1
            self._readers.discard(reader)
            consumer.signal.fire()


if TYPE_CHECKING:

    def _conforms(backend: MemoryBackend) -> Backend:
        return backend


def _check_unique(
    s: _Stream, consumer: _Consumer | None, durable: str, filter_subject: str
) -> None:
    """A work queue refuses a consumer whose filter overlaps another's, as the server does."""
    if not s.work_queue:
        return
    for other in s.consumers:
        if other is not consumer and subjects_overlap(other.filter_subject, filter_subject):
            raise BackendError(
                f"consume {s.name}/{durable}: filtered consumer not unique on workqueue "
                f"stream (10100): {filter_subject!r} overlaps {other.durable}'s "
                f"{other.filter_subject!r}"
            )
