"""The small interface between the runtime and a message/state backend.

The runtime sees only this: a key-value store with revisions and compare-and-set,
watches with an initial replay, publishing (deduplicated where a stream captures
the subject), message schedules on a stream that allows them, core subscriptions
and durable consumers with ack / nak / term.
Backends know nothing of workflows or rules.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Final, Literal, Protocol

import msgspec

from reactive.backends.partitions import ALL_DEPTHS

__all__ = [
    "SCHEDULER_HEADER",
    "SCHEDULE_HEADER",
    "SCHEDULE_NEXT_HEADER",
    "SCHEDULE_TARGET_HEADER",
    "SCHEDULE_TIME_ZONE_HEADER",
    "Backend",
    "InboundMessage",
    "KVEntry",
    "Operation",
    "PartitionedConsumer",
    "PartitionedMessage",
    "schedule_headers",
]

Operation = Literal["PUT", "DEL", "PURGE"]

# Message schedules (ADR-51, nats-server 2.12+): a message with these headers, published
# on a subject of a stream that allows schedules, is held by the server until its time;
# then the server stores a message on the target subject (a subject of the same stream)
# with the schedule's data and headers, and ``Nats-Scheduler: <schedule subject>``. One
# schedule is pending per schedule subject: a later one replaces it.
SCHEDULE_HEADER: Final = "Nats-Schedule"
SCHEDULE_TARGET_HEADER: Final = "Nats-Schedule-Target"
SCHEDULER_HEADER: Final = "Nats-Scheduler"
# A repeating schedule (``@every``, cron; nats-server 2.14+): its time zone, and the next
# time it fires, on each message it stores ("purge" for a one-shot schedule's).
SCHEDULE_TIME_ZONE_HEADER: Final = "Nats-Schedule-Time-Zone"
SCHEDULE_NEXT_HEADER: Final = "Nats-Schedule-Next"


def schedule_headers(at: float, target: str) -> dict[str, str]:
    """The headers of a one-shot schedule (``@at``) that stores a message on ``target`` at ``at``
    (seconds since the epoch), or at once if that has passed.

    The time is written in whole microseconds, rounded up: the schedule never fires
    before ``at`` (``schedule_time(...) >= at`` holds for the floats).
    """
    micros = round(at * 1_000_000)
    if micros / 1_000_000 < at:
        micros += 1
    seconds, fraction = divmod(micros, 1_000_000)
    stamp = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return {SCHEDULE_HEADER: f"@at {stamp}.{fraction:06d}Z", SCHEDULE_TARGET_HEADER: target}


class KVEntry(msgspec.Struct, frozen=True, gc=False):
    """One revision of one key. ``value`` is empty for deletes and purges."""

    bucket: str
    key: str
    value: bytes
    revision: int
    operation: Operation = "PUT"


class InboundMessage(Protocol):
    """A message handed to the runtime by a subscription or a durable consumer.

    For core NATS subscriptions the acknowledgement methods do nothing.
    """

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def num_delivered(self) -> int:
        """How many times this message has been delivered (1 on first delivery)."""
        ...

    @property
    def stream(self) -> str | None: ...

    @property
    def sequence(self) -> int | None:
        """The stream sequence, for messages from a stream."""
        ...

    @property
    def time(self) -> float | None:
        """When the stream stored it (seconds since the epoch), for messages from a stream."""
        ...

    async def ack(self) -> None: ...

    async def nak(self, delay: float) -> None:
        """Ask for redelivery after ``delay`` seconds (never immediately)."""
        ...

    async def term(self) -> None:
        """Never redeliver this message."""
        ...

    async def in_progress(self) -> None: ...


class PartitionedMessage(InboundMessage, Protocol):
    """A change of one key of a partitioned bucket, from the consumer of its partition.

    Acknowledging it removes it for good: a process that starts later gets only the
    changes not acknowledged yet.
    """

    @property
    def partition(self) -> int: ...

    @property
    def entry(self) -> KVEntry:
        """The change: key, value, KV revision and operation (``value`` is empty for a
        delete or a purge)."""
        ...


class PartitionedConsumer(Protocol):
    """The changes of the partitions this process holds, as they come."""

    def __aiter__(self) -> AsyncIterator[PartitionedMessage]: ...

    async def __anext__(self) -> PartitionedMessage: ...

    @property
    def held(self) -> frozenset[int]:
        """The partitions this process holds now (for health and metrics)."""
        ...

    def holds(self, partition: int) -> bool:
        """Whether this process holds ``partition`` now (``partition in held``, cheaply)."""
        ...

    @property
    def members(self) -> int:
        """How many processes consume the partitions, as last counted."""
        ...


class Backend(Protocol):
    """What the runtime needs from NATS JetStream, or from its in-memory twin."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def max_payload(self) -> int:
        """The largest message, headers included, the server takes (a KV value is one)."""
        ...

    async def ensure_bucket(self, bucket: str) -> None:
        """Create the KV bucket if it does not exist."""
        ...

    async def kv_get(self, bucket: str, key: str, *, leader: bool = False) -> KVEntry | None:
        """The latest revision of ``key``, or None when absent, deleted or purged.

        A read may be answered by any replica of the bucket, one that lags behind its
        leader by a moment (or, just restarted, by more): ``leader`` reads what the
        leader has, for a decision that no later compare-and-set would catch (that a
        key is gone, that a message is stale).
        """
        ...

    # ``ttl`` on a write: the server removes the value that many seconds (at least one)
    # after it is written; the key then reads as missing, and no delete is watched.

    async def kv_create(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> int:
        """Write ``key`` only if it does not exist (or is deleted); raise ConflictError otherwise."""
        ...

    async def kv_update(
        self, bucket: str, key: str, value: bytes, revision: int, *, ttl: float | None = None
    ) -> int:
        """Write ``key`` only if its latest revision is ``revision``; raise ConflictError otherwise."""
        ...

    async def kv_put(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> int: ...

    async def kv_put_unacked(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> None:
        """``kv_put`` without waiting for the server to confirm it: for bookkeeping whose
        loss costs only repeated work (the engine's delivered-outbox markers). The write
        can be lost if the connection fails before the server has it."""
        ...

    async def kv_delete(self, bucket: str, key: str) -> None: ...

    async def kv_keys(self, bucket: str, pattern: str = ">") -> list[str]:
        """Keys (not deleted) that match a NATS wildcard pattern."""
        ...

    def kv_watch(
        self, bucket: str, pattern: str = ">"
    ) -> AbstractAsyncContextManager[AsyncIterator[KVEntry]]:
        """Every key's latest value, then every change, for as long as the context is open.

        The backend supervises the watch: if it is lost it is re-created with
        backoff and replays again, so consumers must treat entries as
        at-least-once.
        """
        ...

    async def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        work_queue: bool = False,
        schedules: bool = False,
    ) -> None:
        """Create the stream if it does not exist; add missing subjects if it does.

        ``work_queue``: a message is removed once acknowledged, and no two durables
        may have overlapping filters (an existing stream with another retention is
        refused). ``schedules``: the stream takes message schedules
        (``schedule_headers``; nats-server 2.12+); an existing stream is changed to.
        """
        ...

    async def sync_schedules(
        self, stream: str, prefix: str, wanted: Mapping[str, Mapping[str, str]]
    ) -> None:
        """Make the repeating schedules on the subjects that start with ``prefix`` (on
        ``stream``, which takes schedules) be those ``wanted``: schedule subject -> its
        headers (``Nats-Schedule``, ``Nats-Schedule-Target``, and maybe
        ``Nats-Schedule-Time-Zone``), with no data. One there with the same headers is
        left as it is (its next time stands); others are set; those not wanted are removed.
        """
        ...

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> None:
        """Publish; where a stream captures ``subject`` wait for its ack, deduplicated by ``msg_id``."""
        ...

    def subscribe(
        self, subject: str, *, queue: str | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[InboundMessage]]:
        """A core NATS subscription (at-most-once), in a queue group when ``queue`` is given."""
        ...

    def consume(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        keep_alive: bool = False,
    ) -> AbstractAsyncContextManager[AsyncIterator[InboundMessage]]:
        """A durable consumer on ``stream``, shared by every process using the same ``durable`` name.

        The backend supervises the fetch loop and recreates it after a server restart. A
        message not settled (ack, nak, term) within ``ack_wait`` seconds comes again;
        with ``keep_alive`` only once this context has ended (or its process died, or
        stalled that long): while it is open, the messages it took and has not settled
        are kept in progress (``in_progress``) every third of ``ack_wait``, so a short
        ack wait hands a dead process's messages on soon without sending a slow one's
        again.
        """
        ...

    # -- partitioned buckets (reactive.backends.partitions) ---------------------------

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
        """Partition the changes of ``bucket`` (which must exist) into ``partitions``, for
        ``group``: each group of a bucket gets every change, its members share them.
        Only keys of ``depths`` tokens are taken in (``partitions.key_depths`` of the
        patterns watched; a later call with other depths changes it for what follows).

        Each change of a key goes to the partition
        :func:`~reactive.backends.partitions.partition_of` names (a hash of the key's
        first 16 tokens), and waits there until a consumer acknowledges it; a change not
        acknowledged within ``ack_wait`` seconds comes again. The first call takes every
        key's latest revision in; later changes follow. A process that holds a partition
        and stops asking for more (it died) loses it after ``pin_timeout`` seconds.
        Idempotent (the timeouts of a later call replace the earlier ones);
        PartitionCountError where the bucket is partitioned into another number.
        """
        ...

    def consume_partitions(
        self, bucket: str, partitions: int, *, group: str = "", keep_alive: bool = False
    ) -> AbstractAsyncContextManager[PartitionedConsumer]:
        """The changes of the partitions this process holds, for as long as the context is open.

        Every open context (in this process or another) is a member; the server gives
        each partition to one member at a time (the others stand by) and a member
        holding more than its share (``ceil(partitions / members)``) gives the excess
        up. A partition moves when its member's context ends (at once) or when its
        member stops pulling (after ``pin_timeout``: it died, or did not read for that
        long); what that member took and did not acknowledge comes to the next one
        after ``ack_wait`` (``keep_alive``: as for ``consume``). Around a move the old
        member's unacknowledged changes may overlap the new member's first ones: handle
        each change idempotently.

        A key's changes are first delivered in revision order; one overwritten before
        the server took it in comes only as the newer revision (the bucket keeps one
        revision per key). ``ensure_partitioned`` first (NotFoundError otherwise;
        PartitionCountError for another number of partitions).
        """
        ...
