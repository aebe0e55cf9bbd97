"""An in-process twin of the NATS JetStream backend, for fast unit and property tests.

It keeps the semantics the runtime depends on (see /work/shared/NATS-NOTES.md):

* KV buckets are streams: one revision counter per bucket, shared by all its keys;
  deletes write a ``DEL`` marker; compare-and-set against the key's latest
  revision (0 meaning "no entry at all", as ``Nats-Expected-Last-Subject-Sequence: 0``).
* Watches replay the latest entry of every matching key (delete markers included,
  in revision order), then every later change; their buffers are unbounded so a
  slow reader never blocks a writer.
* Streams store what their subjects capture, deduplicated by ``msg_id`` within
  ``duplicate_window`` seconds of *clock* time.
* Core subscriptions are at-most-once; queue groups deliver to exactly one member
  (round-robin here, random on a real server). A group is its name, whatever the
  subjects: a message matching members on ``a.*`` and ``a.>`` reaches one of them.
* Durable pull consumers persist across contexts, share messages between every open
  context, and redeliver on ``nak(delay)`` or after ``ack_wait`` — all measured on the
  injected clock, so a ``ManualClock`` drives redelivery deterministically.

Everything runs on one event loop and mutates state synchronously (no ``await``
between reading and writing shared state), which is what makes the compare-and-set
and the "snapshot then subscribe" of a watch atomic without locks.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Generic, TypeVar

import anyio
import anyio.lowlevel
import msgspec

from reactive._events import Waiter, new_event, new_waiter
from reactive.backends.base import InboundMessage, KVEntry
from reactive.clock import Clock, SystemClock
from reactive.errors import BackendError, ConflictError, NotFoundError, PayloadTooLargeError
from reactive.subjects import (
    MAX_STORED_KEY_LENGTH,
    MAX_SUBJECT_LENGTH,
    matches_pattern,
    preview,
    validate_key_pattern,
    validate_subject,
)

if TYPE_CHECKING:
    from reactive.backends.base import Backend

__all__ = ["MemoryBackend", "PublishedMessage"]

T = TypeVar("T")

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


# ---------------------------------------------------------------------------
# A wake-up signal and an unbounded queue, both built lazily on anyio.Event.
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# KV
# ---------------------------------------------------------------------------


class _Watcher:
    __slots__ = ("pattern", "queue")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.queue: _Queue[KVEntry] = _Queue()


class _Bucket:
    __slots__ = ("latest", "name", "revision", "watchers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.revision = 0  # the bucket's stream sequence: shared by all keys
        # Latest entry per key, delete markers included (history=1, like a default KV bucket).
        self.latest: dict[str, KVEntry] = {}
        self.watchers: list[_Watcher] = []


def _bucket_append(bucket: _Bucket, key: str, value: bytes, deleted: bool) -> KVEntry:
    """Store a new revision of ``key`` and hand it to every matching watcher."""
    bucket.revision += 1
    entry = (
        KVEntry(bucket.name, key, b"", bucket.revision, "DEL")
        if deleted
        else KVEntry(bucket.name, key, value, bucket.revision)
    )
    bucket.latest[key] = entry
    for watcher in bucket.watchers:  # empty list: O(1) put
        if watcher.pattern == ">" or matches_pattern(key, watcher.pattern):
            watcher.queue.put(entry)
    return entry


# ---------------------------------------------------------------------------
# Streams and core subscriptions
# ---------------------------------------------------------------------------


class _StoredMessage:
    __slots__ = ("data", "headers", "sequence", "subject")

    def __init__(
        self, sequence: int, subject: str, data: bytes, headers: Mapping[str, str]
    ) -> None:
        self.sequence = sequence
        self.subject = subject
        self.data = data
        self.headers = headers


class _Stream:
    __slots__ = ("consumers", "dedupe", "dedupe_order", "messages", "name", "subjects")

    def __init__(self, name: str) -> None:
        self.name = name
        self.subjects: list[str] = []
        self.messages: list[_StoredMessage] = []  # messages[i].sequence == i + 1 (no limits)
        # msg_id -> clock time it was stored, plus the same in insertion order so that
        # expired ids are dropped from the front in amortised O(1).
        self.dedupe: dict[str, float] = {}
        self.dedupe_order: deque[tuple[float, str]] = deque()
        self.consumers: list[_Consumer] = []

    def captures(self, subject: str) -> bool:
        return any(matches_pattern(subject, s) for s in self.subjects)

    def is_duplicate(self, msg_id: str, now: float, window: float) -> bool:
        order, dedupe = self.dedupe_order, self.dedupe
        while order and now - order[0][0] >= window:
            stored_at, old_id = order.popleft()
            if dedupe.get(old_id) == stored_at:
                del dedupe[old_id]
        stored_at_or_none = dedupe.get(msg_id)
        return stored_at_or_none is not None and now - stored_at_or_none < window

    def remember(self, msg_id: str, now: float) -> None:
        self.dedupe[msg_id] = now
        self.dedupe_order.append((now, msg_id))


class _CoreMessage:
    """A message from a core subscription: at-most-once, so acknowledgements do nothing."""

    __slots__ = ("data", "headers", "subject")

    num_delivered = 1
    stream: str | None = None
    sequence: int | None = None

    def __init__(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers

    async def ack(self) -> None:
        pass

    async def nak(self, delay: float) -> None:
        pass

    async def term(self) -> None:
        pass

    async def in_progress(self) -> None:
        pass


class _Subscription:
    __slots__ = ("pattern", "queue", "queue_group")

    def __init__(self, pattern: str, queue_group: str | None) -> None:
        self.pattern = pattern
        self.queue_group = queue_group
        self.queue: _Queue[InboundMessage] = _Queue()


# ---------------------------------------------------------------------------
# Durable consumers
# ---------------------------------------------------------------------------


class _Pending:
    """A delivered, not yet acknowledged (nor terminated) message of a consumer."""

    __slots__ = ("deadline", "delivered", "stored", "token")

    def __init__(self, stored: _StoredMessage) -> None:
        self.stored = stored
        self.delivered = 0  # deliveries so far
        self.deadline = 0.0  # when it becomes due for (re)delivery
        self.token = 0  # identifies the live heap entry; older entries are stale


_tokens = itertools.count(1)


class _Consumer:
    """A durable pull consumer: a delivery pointer plus the pending (unacked) set.

    Readers pull: a message counts as delivered only when a reader takes it, so
    "deliverable but not taken" is exactly what ``idle()`` has to look at.
    """

    def __init__(
        self, stream: _Stream, durable: str, filter_subject: str, ack_wait: float, clock: Clock
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.durable = durable
        self.filter_subject = filter_subject
        self.ack_wait = ack_wait
        self.next_index = 0  # index into stream.messages of the next never-delivered message
        self.pending: dict[int, _Pending] = {}
        # (deadline, sequence, token): the earliest live entry is the next redelivery.
        # Entries go stale when a message is acked or re-timed; they are skipped lazily.
        self.timers: list[tuple[float, int, int]] = []
        self.readers = 0  # open consume contexts
        self.signal = _Signal()

    # -- scheduling -------------------------------------------------------

    def _schedule(self, p: _Pending, deadline: float) -> None:
        p.deadline = deadline
        p.token = next(_tokens)
        heapq.heappush(self.timers, (deadline, p.stored.sequence, p.token))

    def next_deadline(self) -> float | None:
        """The earliest redelivery time among pending messages, dropping stale timers."""
        timers = self.timers
        while timers:
            deadline, seq, token = timers[0]
            p = self.pending.get(seq)
            if p is not None and p.token == token:
                return deadline
            heapq.heappop(timers)
        return None

    def _peek_new(self) -> _StoredMessage | None:
        """The next never-delivered message matching the filter.

        Non-matching messages are skipped for good (the pointer moves past them),
        so repeated calls are amortised O(1).
        """
        messages = self.stream.messages
        while self.next_index < len(messages):
            stored = messages[self.next_index]
            if matches_pattern(stored.subject, self.filter_subject):
                return stored
            self.next_index += 1
        return None

    def has_deliverable(self, now: float) -> bool:
        deadline = self.next_deadline()
        return (deadline is not None and deadline <= now) or self._peek_new() is not None

    def take(self, now: float) -> _ConsumerMessage | None:
        """Hand out the next deliverable message: due redeliveries first, then new ones."""
        deadline = self.next_deadline()
        if deadline is not None and deadline <= now:
            _, seq, _ = heapq.heappop(self.timers)
            p = self.pending[seq]
        else:
            stored = self._peek_new()
            if stored is None:
                return None
            self.next_index += 1
            p = self.pending[stored.sequence] = _Pending(stored)
        p.delivered += 1
        self._schedule(p, now + self.ack_wait)
        return _ConsumerMessage(self, p.stored, p.delivered)

    # -- acknowledgements --------------------------------------------------

    # The server applies every acknowledgement by stream sequence, whichever delivery
    # sends it: an ack, nak or in_progress from an older delivery that has since been
    # redelivered elsewhere acts on the live one (checked against nats-server 2.15).

    def ack(self, seq: int) -> None:
        # No wake-up needed: an ack never makes anything deliverable, and a reader
        # sleeping until this message's old deadline just wakes and re-checks.
        self.pending.pop(seq, None)

    def term(self, seq: int) -> None:
        self.ack(seq)

    def nak(self, seq: int, delay: float, now: float) -> None:
        p = self.pending.get(seq)
        if p is not None:
            self._schedule(p, now + max(0.0, delay))
            self.signal.fire()  # readers may need an earlier wake-up

    def in_progress(self, seq: int, now: float) -> None:
        p = self.pending.get(seq)
        if p is not None:
            self._schedule(p, now + self.ack_wait)


class _ConsumerMessage:
    __slots__ = ("_consumer", "_stored", "num_delivered")

    def __init__(self, consumer: _Consumer, stored: _StoredMessage, num_delivered: int) -> None:
        self._consumer = consumer
        self._stored = stored
        self.num_delivered = num_delivered

    @property
    def subject(self) -> str:
        return self._stored.subject

    @property
    def data(self) -> bytes:
        return self._stored.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._stored.headers

    @property
    def stream(self) -> str | None:
        return self._consumer.stream.name

    @property
    def sequence(self) -> int | None:
        return self._stored.sequence

    def __repr__(self) -> str:
        return (
            f"<message {self._consumer.stream.name}#{self._stored.sequence} "
            f"{self._stored.subject!r} delivery {self.num_delivered}>"
        )

    async def ack(self) -> None:
        self._consumer.ack(self._stored.sequence)

    async def nak(self, delay: float) -> None:
        c = self._consumer
        c.nak(self._stored.sequence, delay, c.clock.now())

    async def term(self) -> None:
        self._consumer.term(self._stored.sequence)

    async def in_progress(self) -> None:
        c = self._consumer
        c.in_progress(self._stored.sequence, c.clock.now())


class _ConsumerReader:
    """The iterator of one consume context: pulls from the shared durable."""

    __slots__ = ("_consumer", "closed")

    def __init__(self, consumer: _Consumer) -> None:
        self._consumer = consumer
        self.closed = False

    def __aiter__(self) -> _ConsumerReader:
        return self

    async def __anext__(self) -> InboundMessage:
        await anyio.lowlevel.checkpoint_if_cancelled()
        consumer = self._consumer
        clock = consumer.clock
        while True:
            if self.closed:
                raise StopAsyncIteration
            # Take the event before looking, so a change made after the look wakes us.
            woken = consumer.signal.event()
            msg = consumer.take(clock.now())
            if msg is not None:
                return msg
            deadline = consumer.next_deadline()
            if deadline is None:
                await woken.wait()
                continue
            # Wait for whichever comes first: a change to the consumer (new message,
            # nak, ack, close) or the clock reaching the next redelivery deadline.
            async with anyio.create_task_group() as tg:

                async def timer(deadline: float = deadline) -> None:
                    await clock.sleep_until(deadline)
                    tg.cancel_scope.cancel()

                tg.start_soon(timer)
                await woken.wait()
                tg.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------


# A compare-and-set travels with this header (its sequence is sized generously here).
_EXPECTING: Mapping[str, str] = MappingProxyType(
    {"Nats-Expected-Last-Subject-Sequence": "18446744073709551615"}
)


def _check_key(key: str) -> None:
    if type(key) is str and len(key) <= MAX_STORED_KEY_LENGTH and _plain_key(key):
        return  # the common case, in one regex match; _key_problem explains the rest
    reason = _key_problem(key)
    if reason is not None:
        raise ValueError(reason)


@functools.lru_cache(maxsize=65536)
def _publish_subject_problem(subject: str) -> str | None:
    if len(subject) > MAX_SUBJECT_LENGTH:
        return f"subject {preview(subject)} is longer than {MAX_SUBJECT_LENGTH} characters"
    return validate_subject(subject, wildcards=False)


_plain_key = re.compile(r"[A-Za-z0-9_\-=/]+(?:\.[A-Za-z0-9_\-=/]+)*").fullmatch


def _key_problem(key: str) -> str | None:
    if isinstance(key, str) and len(key) > MAX_STORED_KEY_LENGTH:
        # (On NATS it would make the server close the connection: refused in both.)
        return f"key {preview(key)} is longer than {MAX_STORED_KEY_LENGTH} characters"
    if isinstance(key, str) and _plain_key(key):
        return None
    reason = validate_key_pattern(key)
    # A valid pattern only has '*' and '>' as whole tokens, so any such char is a wildcard.
    if reason is None and ("*" in key or ">" in key):
        reason = f"key {key!r} must not contain wildcards"
    return reason


def _check_name(name: str, what: str) -> None:
    # NATS stream / bucket / durable names: non-empty, no whitespace, dots or wildcards.
    if validate_subject(name, wildcards=False) is not None or "." in name:
        raise ValueError(f"invalid {what} name {name!r}")


class MemoryBackend:
    """The ``Backend`` protocol in process, with NATS JetStream semantics."""

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
        durable consumer with at least one open context: new matching messages and
        redeliveries already due on the clock. Redeliveries due in the future, and
        consumers nobody is reading, do not count.
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
        return True

    # -- KV ----------------------------------------------------------------

    def _bucket(self, bucket: str) -> _Bucket:
        b = self._buckets.get(bucket)
        if b is None:
            raise NotFoundError(f"bucket {bucket!r} not found")
        return b

    async def ensure_bucket(self, bucket: str) -> None:
        _check_name(bucket, "bucket")
        if bucket not in self._buckets:
            self._buckets[bucket] = _Bucket(bucket)

    def peek(self, bucket: str, key: str) -> KVEntry | None:
        """``kv_get`` without awaiting, for test assertions; None for a missing bucket too."""
        b = self._buckets.get(bucket)
        entry = b.latest.get(key) if b is not None else None
        return entry if entry is not None and entry.operation == "PUT" else None

    def peek_keys(self, bucket: str, pattern: str = ">") -> list[str]:
        """``kv_keys`` without awaiting, for test assertions; [] for a missing bucket."""
        b = self._buckets.get(bucket)
        if b is None:
            return []
        return sorted(
            k for k, e in b.latest.items() if e.operation == "PUT" and matches_pattern(k, pattern)
        )

    async def kv_get(self, bucket: str, key: str) -> KVEntry | None:
        b = self._bucket(bucket)
        entry = b.latest.get(key)
        if entry is None:
            _check_key(key)  # (a key that is stored was checked when it was first written)
            return None
        if entry.operation != "PUT":
            return None
        return entry

    async def kv_create(self, bucket: str, key: str, value: bytes) -> int:
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
        return _bucket_append(b, key, bytes(value), deleted=False).revision

    async def kv_update(self, bucket: str, key: str, value: bytes, revision: int) -> int:
        b = self._buckets.get(bucket) or self._bucket(bucket)  # (the lookup inline, then its error)
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
        return _bucket_append(b, key, bytes(value), deleted=False).revision

    async def kv_put(self, bucket: str, key: str, value: bytes) -> int:
        b = self._bucket(bucket)
        if key not in b.latest:
            _check_key(key)
        if len(value) + 4096 > self.max_payload:
            self._check_size(f"put {bucket}/{key}", value, {})
        return _bucket_append(b, key, bytes(value), deleted=False).revision

    async def kv_put_unacked(self, bucket: str, key: str, value: bytes) -> None:
        b = self._buckets.get(bucket) or self._bucket(bucket)
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

    async def ensure_stream(self, name: str, subjects: list[str]) -> None:
        _check_name(name, "stream")
        for subject in subjects:
            reason = validate_subject(subject)
            if reason is not None:
                raise ValueError(reason)
        stream = self._streams.get(name)
        if stream is None:
            stream = self._streams[name] = _Stream(name)
        for subject in subjects:
            if subject not in stream.subjects:
                stream.subjects.append(subject)

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
        for stream in self._streams.values():
            if not stream.captures(subject):
                continue
            duplicate = dedupe_id is not None and stream.is_duplicate(
                dedupe_id, now, self.duplicate_window
            )
            if not duplicate:
                stored = _StoredMessage(len(stream.messages) + 1, subject, data, delivered)
                stream.messages.append(stored)
                if dedupe_id is not None:
                    stream.remember(dedupe_id, now)
                for consumer in stream.consumers:
                    consumer.signal.fire()
            if first_stream is None:
                first_stream, first_duplicate = stream.name, duplicate

        self.published.append(
            PublishedMessage(subject, data, given, msg_id, first_duplicate, first_stream)
        )
        if self._subscriptions:
            self._fan_out(subject, data, delivered)

    def _fan_out(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        """Core NATS delivery: every plain subscriber, one member per queue group."""
        groups: dict[str, list[_Subscription]] | None = None
        for sub in self._subscriptions:
            if not matches_pattern(subject, sub.pattern):
                continue
            if sub.queue_group is None:
                sub.queue.put(_CoreMessage(subject, data, headers))
            else:
                if groups is None:
                    groups = {}
                groups.setdefault(sub.queue_group, []).append(sub)
        if groups is None:
            return
        for group, members in groups.items():
            n = self._round_robin.get(group, 0)
            self._round_robin[group] = n + 1
            members[n % len(members)].queue.put(_CoreMessage(subject, data, headers))

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
        self, stream: str, durable: str, filter_subject: str, *, ack_wait: float = 30.0
    ) -> AsyncIterator[AsyncIterator[InboundMessage]]:
        self._check_open()
        s = self._streams.get(stream)
        if s is None:
            raise NotFoundError(f"stream {stream!r} not found")
        _check_name(durable, "durable")
        reason = validate_subject(filter_subject)
        if reason is not None:
            raise ValueError(reason)
        consumer = self._consumers.get((stream, durable))
        if consumer is None:
            consumer = _Consumer(s, durable, filter_subject, ack_wait, self.clock)
            self._consumers[(stream, durable)] = consumer
            s.consumers.append(consumer)
        else:
            # Reopening updates the config, as a consumer update on the server does;
            # the delivery position and pending set are kept.
            consumer.filter_subject = filter_subject
            consumer.ack_wait = ack_wait
        reader = _ConsumerReader(consumer)
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
