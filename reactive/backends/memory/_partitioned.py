"""Partitioned buckets in memory: what the NATS backend gets from a work-queue stream
sourcing the bucket, one durable per partition and pinned-client priority groups.

Every change of the bucket is taken in (as the server sources it) into one stream,
under ``<partition>.$KV.<bucket>.<key>`` with the headers the server writes, and
each partition's durable (:class:`_Consumer`, timed on the injected clock) hands it
out. Every open ``consume_partitions`` context is a member; a partition is pinned
to one member at a time, the first time it has something to deliver, to the member
holding the fewest partitions (the earliest to join on a tie). A member joining
takes the excess of those above ``ceil(partitions / members)`` at once (the NATS
backend gets there by giving pins up); a member leaving frees its partitions at
once. What a member took and did not acknowledge comes again after ``ack_wait``.
Here a member holds its partitions until its context closes (there is no
``pin_timeout``: nothing in one process dies alone).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, cast

import anyio.lowlevel

from reactive.backends.base import KVEntry, PartitionedConsumer, PartitionedMessage
from reactive.backends.memory._consumers import _Consumer, _ConsumerMessage, _Holder, _next
from reactive.backends.memory._kv import _Watcher
from reactive.backends.memory._queue import _Queue, _Signal
from reactive.backends.memory._streams import _StoredMessage, _Stream
from reactive.backends.partitions import (
    ALL_DEPTHS,
    check_depths,
    check_partitions,
    consumer_name,
    depth_of,
    partition_of,
    partitioned_stream,
    source_transforms,
)
from reactive.clock import Clock
from reactive.errors import NotFoundError, PartitionCountError

if TYPE_CHECKING:
    from reactive.backends.memory.backend import MemoryBackend

__all__ = ["_PartitionedBuckets"]

_SOURCE_HEADER: Final = "Nats-Stream-Source"
_OPERATION_HEADER: Final = "KV-Operation"


class _SourcedMessage(_StoredMessage):
    """A change as the partitioned stream stores it, with the change itself."""

    __slots__ = ("entry", "partition")

    def __init__(
        self,
        sequence: int,
        subject: str,
        headers: Mapping[str, str],
        entry: KVEntry,
        partition: int,
    ) -> None:
        super().__init__(sequence, subject, entry.value, headers, 0.0)  # (no one reads its time)
        self.entry = entry
        self.partition = partition


class _Member:
    __slots__ = ("cursor", "held", "order")

    def __init__(self, order: int) -> None:
        self.order = order  # when it joined: the earlier wins a tie
        self.held: set[int] = set()
        self.cursor = 0  # the partition to look at first next time (round robin)


class _PartitionSet:
    """One partitioned bucket: its stream, a durable per partition, the members and pins."""

    def __init__(
        self,
        bucket: str,
        group: str,
        partitions: int,
        depths: Collection[int],
        ack_wait: float,
        clock: Clock,
    ) -> None:
        self.bucket = bucket
        self.partitions = partitions
        self.clock = clock
        self.stream = _Stream(partitioned_stream(bucket, group))
        self.signal = _Signal()  # one for every partition: a reader looks at them all
        self.consumers = [
            _Consumer(self.stream, consumer_name(p), f"{p}.>", ack_wait, clock)
            for p in range(partitions)
        ]
        for consumer in self.consumers:
            consumer.signal = self.signal
        self.stream.consumers.extend(self.consumers)
        self.pins: list[_Member | None] = [None] * partitions
        self.members: list[_Member] = []
        self._joined = itertools.count()
        self._prefix = f"$KV.{bucket}."
        self.set_depths(depths)

    def set_depths(self, depths: Collection[int]) -> None:
        """Take in the keys of these depths from now on (as the server's updated source)."""
        self.depths = frozenset(depths)
        # (The filters and transforms, as the server writes them in Nats-Stream-Source.)
        transforms = source_transforms(self.bucket, self.partitions, self.depths)
        self._source = " ".join("\f".join(t[part] for t in transforms) for part in ("src", "dest"))

    def set_ack_wait(self, ack_wait: float) -> None:
        for consumer in self.consumers:
            consumer.ack_wait = ack_wait

    # -- sourcing ---------------------------------------------------------------

    def source(self, entry: KVEntry) -> None:
        """Take a change in, as the server's sourcing does (a key of another depth: not)."""
        if depth_of(entry.key) not in self.depths:
            return
        p = partition_of(entry.key, self.partitions)
        subject = self._prefix + entry.key
        headers = {
            _SOURCE_HEADER: f"KV_{self.bucket} {entry.revision} {self._source} {subject} memory"
        }
        if entry.operation != "PUT":
            headers[_OPERATION_HEADER] = entry.operation
        messages = self.stream.messages
        messages.append(
            _SourcedMessage(
                len(messages) + 1, f"{p}.{subject}", MappingProxyType(headers), entry, p
            )
        )
        self.signal.fire()

    # -- members and pins -----------------------------------------------------------

    def join(self) -> _Member:
        member = _Member(next(self._joined))
        self.members.append(member)
        # Those above their share give the excess up, the last partitions first.
        share = math.ceil(self.partitions / len(self.members))
        for other in self.members:
            for p in sorted(other.held, reverse=True)[: max(0, len(other.held) - share)]:
                self._unpin(p)
        self.signal.fire()
        return member

    def leave(self, member: _Member) -> None:
        for p in list(member.held):
            self._unpin(p)
        self.members.remove(member)
        self.signal.fire()

    def _unpin(self, p: int) -> None:
        owner = self.pins[p]
        if owner is not None:
            owner.held.discard(p)
            self.pins[p] = None

    def _candidate(self) -> _Member:
        """Whom a partition that is pinned to nobody goes to."""
        return min(self.members, key=lambda m: (len(m.held), m.order))

    # -- delivery -------------------------------------------------------------------

    def take(
        self, member: _Member, now: float, holder: _Holder | None = None
    ) -> PartitionedMessage | None:
        """The next message for ``member``: from its partitions, round robin, pinning a
        free partition with something to deliver if ``member`` is whom it goes to."""
        n = self.partitions
        for i in range(n):
            p = (member.cursor + i) % n
            owner = self.pins[p]
            consumer = self.consumers[p]
            if owner is None:
                if not consumer.has_deliverable(now) or self._candidate() is not member:
                    continue
                self.pins[p] = member
                member.held.add(p)
                # Whom the other free partitions go to may have changed: wake the others.
                self.signal.fire()
            elif owner is not member:
                continue
            msg = consumer.take(now, holder)
            if msg is not None:
                member.cursor = p + 1
                return _PartitionedMessage(msg)
        return None

    def next_deadline(self) -> float | None:
        deadlines = [d for c in self.consumers if (d := c.next_deadline()) is not None]
        return min(deadlines, default=None)

    def has_deliverable(self, now: float) -> bool:
        """Whether a member would take something now (there are members, and a message)."""
        return bool(self.members) and any(c.has_deliverable(now) for c in self.consumers)


class _PartitionedMessage:
    """A message of a partition: the durable's message, with the change it carries."""

    __slots__ = ("_msg", "entry", "partition")

    def __init__(self, msg: _ConsumerMessage) -> None:
        stored = cast(_SourcedMessage, msg._stored)
        self._msg = msg
        self.entry = stored.entry
        self.partition = stored.partition

    @property
    def subject(self) -> str:
        return self._msg.subject

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def headers(self) -> Mapping[str, str]:
        return self._msg.headers

    @property
    def num_delivered(self) -> int:
        return self._msg.num_delivered

    @property
    def stream(self) -> str | None:
        return self._msg.stream

    @property
    def sequence(self) -> int | None:
        return self._msg.sequence

    @property
    def time(self) -> float | None:
        return self._msg.time

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float) -> None:
        await self._msg.nak(delay)

    async def term(self) -> None:
        await self._msg.term()

    async def in_progress(self) -> None:
        await self._msg.in_progress()

    def __repr__(self) -> str:
        e = self.entry
        return (
            f"<partition {self.partition} {e.bucket}/{e.key}@{e.revision} {e.operation} "
            f"delivery {self.num_delivered}>"
        )


class _Source(_Queue[KVEntry]):
    """Sits among the bucket's watchers and takes every change into the partitioned set.

    It is the server's sourcing: closing the backend's watches does not stop it.
    """

    __slots__ = ("_set",)

    def __init__(self, target: _PartitionSet) -> None:
        super().__init__()
        self._set = target

    def put(self, item: KVEntry) -> None:
        self._set.source(item)

    def close(self) -> None:
        pass

    def __len__(self) -> int:
        return 0


class _PartitionReader:
    """One member: the iterator of one ``consume_partitions`` context."""

    __slots__ = ("_holder", "_set", "closed", "member")

    def __init__(self, target: _PartitionSet, keep_alive: bool = False) -> None:
        self._set = target
        self.member = target.join()
        self.closed = False
        self._holder: _Holder | None = self if keep_alive else None

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self.member.held)

    def holds(self, partition: int) -> bool:
        return partition in self.member.held

    @property
    def members(self) -> int:
        return len(self._set.members)

    def __aiter__(self) -> _PartitionReader:
        return self

    async def __anext__(self) -> PartitionedMessage:
        s, member, holder = self._set, self.member, self._holder
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not self.closed:  # (the common case, at once: no closure, no second coroutine)
            msg = s.take(member, s.clock.now(), holder)
            if msg is not None:
                return msg
        return await _next(
            self, s.signal, s.clock, lambda now: s.take(member, now, holder), s.next_deadline
        )


class _PartitionedBuckets:
    """The partitioned-bucket part of ``MemoryBackend`` (see the module's docstring)."""

    # (Made by MemoryBackend.__init__.)
    _partition_sets: dict[str, _PartitionSet]
    _partition_readers: set[_PartitionReader]

    async def ensure_partitioned(
        self,
        bucket: str,
        partitions: int,
        *,
        group: str = "",
        depths: Collection[int] = ALL_DEPTHS,
        ack_wait: float = 30.0,
        pin_timeout: float = 5.0,
    ) -> None:
        backend = cast("MemoryBackend", self)
        check_partitions(partitions)
        check_depths(depths)
        if ack_wait <= 0 or pin_timeout <= 0:
            raise ValueError("ack_wait and pin_timeout must be positive")
        b = backend._bucket(bucket)
        sets = self._partition_sets
        name = partitioned_stream(bucket, group)
        found = sets.get(name)
        if found is not None:
            _check_count(bucket, found, partitions)
            found.set_ack_wait(ack_wait)
            if found.depths != frozenset(depths):
                found.set_depths(depths)
            return
        target = sets[name] = _PartitionSet(
            bucket, group, partitions, depths, ack_wait, backend.clock
        )
        # The latest revision of every key (delete markers too) in revision order, as a
        # new source reads the bucket's stream; then every change.
        for entry in sorted(b.latest.values(), key=lambda e: e.revision):
            target.source(entry)
        watcher = _Watcher(">")
        watcher.queue = _Source(target)
        b.watchers.append(watcher)

    def consume_partitions(
        self, bucket: str, partitions: int, *, group: str = "", keep_alive: bool = False
    ) -> AbstractAsyncContextManager[PartitionedConsumer]:
        return self._consume_partitions(bucket, partitions, group, keep_alive)

    @asynccontextmanager
    async def _consume_partitions(
        self, bucket: str, partitions: int, group: str, keep_alive: bool
    ) -> AsyncIterator[PartitionedConsumer]:
        cast("MemoryBackend", self)._check_open()
        check_partitions(partitions)
        target = self._partition_sets.get(partitioned_stream(bucket, group))
        if target is None:
            raise NotFoundError(
                f"bucket {bucket!r} is not partitioned (call ensure_partitioned first)"
            )
        _check_count(bucket, target, partitions)
        reader = _PartitionReader(target, keep_alive)
        readers = self._partition_readers
        readers.add(reader)
        try:
            yield reader
        finally:
            # What this member took and did not acknowledge comes again after ack_wait.
            reader.closed = True
            readers.discard(reader)
            target.leave(reader.member)

    def _close_partitions(self) -> None:
        """The backend closes: every member's iterator ends."""
        for reader in self._partition_readers:
            reader.closed = True
        for target in self._partition_sets.values():
            target.signal.fire()

    def _partitions_idle(self, now: float) -> bool:
        return not any(s.has_deliverable(now) for s in self._partition_sets.values())


def _check_count(bucket: str, target: _PartitionSet, partitions: int) -> None:
    if target.partitions != partitions:
        raise PartitionCountError(bucket, target.partitions, partitions)
