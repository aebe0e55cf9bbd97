"""Durable pull consumers in memory, timed on the injected clock.

A durable persists across consume contexts and shares its messages between every
open context; a message not acknowledged within ``ack_wait``, or nak'ed with a
delay, is delivered again when the clock gets there, so a ``ManualClock`` drives
redelivery deterministically; a message taken by a context opened with ``keep_alive``
is kept in progress while that context is open and the message not settled (as the
NATS backend's ``+WPI`` does), so it comes again only after the context ends. So do
message schedules: a consumer fires its stream's
schedules that are due before it looks for messages, and a waiting reader wakes when
the next one is due. On a work-queue stream an acknowledged (or terminated) message
is removed.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

import anyio
import anyio.lowlevel

from reactive.backends.base import InboundMessage
from reactive.backends.memory._queue import _Signal
from reactive.backends.memory._streams import _StoredMessage, _Stream
from reactive.clock import Clock
from reactive.subjects import matches_pattern

__all__ = ["_Consumer", "_ConsumerReader", "_next"]

T = TypeVar("T")


class _Holder(Protocol):
    """A consume context that keeps what it took in progress while it is open."""

    @property
    def closed(self) -> bool: ...


class _Pending:
    """A delivered, not yet acknowledged (nor terminated) message of a consumer."""

    __slots__ = ("deadline", "delivered", "holder", "stored", "token")

    def __init__(self, stored: _StoredMessage) -> None:
        self.stored = stored
        self.delivered = 0  # deliveries so far
        self.deadline = 0.0  # when it becomes due for (re)delivery
        self.token = 0  # identifies the live heap entry; older entries are stale
        self.holder: _Holder | None = None  # the keep-alive context that took it, if any


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
            if not stored.removed and matches_pattern(stored.subject, self.filter_subject):
                return stored
            self.next_index += 1
        return None

    def next_wake(self) -> float | None:
        """When something may become deliverable: the next redelivery or schedule."""
        deadline = self.next_deadline()
        if self.stream.schedule_heap:
            due = self.stream.next_schedule()
            if due is not None and (deadline is None or due < deadline):
                return due
        return deadline

    def _keep(self, now: float) -> None:
        """What is due again but held by an open keep-alive context: in progress still."""
        timers = self.timers
        while timers:
            deadline, seq, token = timers[0]
            if deadline > now:
                return
            p = self.pending.get(seq)
            if p is None or p.token != token:
                heapq.heappop(timers)
                continue
            holder = p.holder
            if holder is None or holder.closed:
                return
            heapq.heappop(timers)
            self._schedule(p, now + self.ack_wait)

    def has_deliverable(self, now: float) -> bool:
        self._keep(now)
        if self.stream.schedule_heap:
            self.stream.fire_due(now)
        deadline = self.next_deadline()
        return (deadline is not None and deadline <= now) or self._peek_new() is not None

    def take(self, now: float, holder: _Holder | None = None) -> _ConsumerMessage | None:
        """Hand out the next deliverable message: due redeliveries first, then new ones;
        ``holder``: the keep-alive context taking it."""
        self._keep(now)
        if self.stream.schedule_heap:
            self.stream.fire_due(now)
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
        p.holder = holder
        self._schedule(p, now + self.ack_wait)
        return _ConsumerMessage(self, p.stored, p.delivered)

    # -- acknowledgements --------------------------------------------------

    # The server applies every acknowledgement by stream sequence, whichever delivery
    # sends it: an ack, nak or in_progress from an older delivery that has since been
    # redelivered elsewhere acts on the live one (checked against nats-server 2.15).

    def ack(self, seq: int) -> None:
        # No wake-up needed: an ack never makes anything deliverable, and a reader
        # sleeping until this message's old deadline just wakes and re-checks.
        if self.pending.pop(seq, None) is not None and self.stream.work_queue:
            self.stream.remove(seq)

    def term(self, seq: int) -> None:
        self.ack(seq)

    def nak(self, seq: int, delay: float, now: float) -> None:
        p = self.pending.get(seq)
        if p is not None:
            p.holder = None
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

    @property
    def time(self) -> float | None:
        return self._stored.time

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

    __slots__ = ("_consumer", "_holder", "closed")

    def __init__(self, consumer: _Consumer, keep_alive: bool = False) -> None:
        self._consumer = consumer
        self.closed = False
        self._holder: _Holder | None = self if keep_alive else None

    def __aiter__(self) -> _ConsumerReader:
        return self

    async def __anext__(self) -> InboundMessage:
        consumer = self._consumer
        holder = self._holder
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not self.closed:  # (the common case, at once: no closure, no second coroutine)
            msg = consumer.take(consumer.clock.now(), holder)
            if msg is not None:
                return msg
        return await _next(
            self, consumer.signal, consumer.clock, lambda now: consumer.take(now, holder),
            consumer.next_wake,
        )  # fmt: skip


async def _next(
    reader: _Holder,
    signal: _Signal,
    clock: Clock,
    take: Callable[[float], T | None],
    next_wake: Callable[[], float | None],
) -> T:
    """A reader's next message: what ``take`` hands out now, or the first one after a
    change (``signal``: a new message, a nak, an ack, a close) or the clock reaching
    ``next_wake`` (a redelivery or a schedule). StopAsyncIteration once ``reader`` is
    closed."""
    await anyio.lowlevel.checkpoint_if_cancelled()
    while True:
        if reader.closed:
            raise StopAsyncIteration
        # Take the event before looking, so a change made after the look wakes us.
        woken = signal.event()
        msg = take(clock.now())
        if msg is not None:
            return msg
        deadline = next_wake()
        if deadline is None:
            await woken.wait()
            continue
        async with anyio.create_task_group() as tg:

            async def timer(deadline: float = deadline) -> None:
                await clock.sleep_until(deadline)
                tg.cancel_scope.cancel()

            tg.start_soon(timer)
            await woken.wait()
            tg.cancel_scope.cancel()
