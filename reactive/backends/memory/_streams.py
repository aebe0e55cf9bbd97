"""Streams and core subscriptions in memory.

A stream stores what its subjects capture, deduplicated by message id within a
window of clock time. A work-queue stream removes a message once it is
acknowledged. A stream that allows message schedules holds a message published
with ``Nats-Schedule: @at <time>`` until the clock reaches that time, then stores
its target message (one pending schedule per subject: a later one replaces it; a
time that has passed fires at once); one with ``@every <duration>`` or a cron
expression (``reactive.cron``) stores it at each of its times, for good. Core subscriptions are at-most-once: a
message reaches the subscribers there are when it is published, and one member
of each queue group.
"""

from __future__ import annotations

import calendar
import functools
import heapq
import re
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TYPE_CHECKING

from reactive import cron
from reactive.backends.base import (
    SCHEDULE_HEADER,
    SCHEDULE_NEXT_HEADER,
    SCHEDULE_TARGET_HEADER,
    SCHEDULE_TIME_ZONE_HEADER,
    SCHEDULER_HEADER,
    InboundMessage,
)
from reactive.backends.memory._queue import _Queue
from reactive.errors import BackendError
from reactive.subjects import MAX_SUBJECT_LENGTH, matches_pattern, preview, validate_subject

if TYPE_CHECKING:
    from reactive.backends.memory._consumers import _Consumer

__all__ = [
    "_CoreMessage",
    "_StoredMessage",
    "_Stream",
    "_Subscription",
    "_fan_out",
    "_publish_subject_problem",
]


class _StoredMessage:
    __slots__ = ("data", "headers", "removed", "sequence", "subject", "time")

    def __init__(
        self, sequence: int, subject: str, data: bytes, headers: Mapping[str, str], time: float
    ) -> None:
        self.sequence = sequence
        self.subject = subject
        self.data = data
        self.headers = headers
        self.time = time  # when it was stored, on the clock
        self.removed = False  # acknowledged from a work queue, or a schedule fired or replaced


_CAPTURED_MAX = 4096

# What nats-server 2.15 answers, as the reasons of the errors raised here.
_SCHEDULES_DISABLED = "message schedules is disabled (10188)"
_SCHEDULE_PATTERN_INVALID = "message schedules pattern is invalid (10189)"
_SCHEDULE_TARGET_INVALID = "message schedules target is invalid (10190)"
# Not copied from a schedule to the message it stores.
_SCHEDULE_ONLY = frozenset(
    {SCHEDULE_HEADER, SCHEDULE_TARGET_HEADER, SCHEDULE_TIME_ZONE_HEADER, "Nats-Msg-Id"}
)
_AT_RE = re.compile(
    r"@at (\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d{2}:\d{2})"
)


def schedule_time(pattern: str) -> float | None:
    """The time (seconds since the epoch) of an ``@at <RFC 3339>`` schedule, or None if
    ``pattern`` is not one. Whole microseconds, as ``schedule_headers`` writes them (the
    server keeps nanoseconds; no schedule the engine writes has more)."""
    found = _AT_RE.fullmatch(pattern)
    if found is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = found.groups()
    try:
        seconds = calendar.timegm(
            (int(year), int(month), int(day), int(hour), int(minute), int(second))
        )
    except ValueError:
        return None
    if zone != "Z":
        offset = int(zone[1:3]) * 3600 + int(zone[4:6]) * 60
        seconds -= offset if zone[0] == "+" else -offset
    micros = int((fraction or "").ljust(6, "0")[:6])
    return (seconds * 1_000_000 + micros) / 1_000_000


def _first_time(headers: Mapping[str, str], now: float) -> float | None:
    """When a schedule published at ``now`` first fires (None: the server refuses it)."""
    pattern = headers[SCHEDULE_HEADER]
    zone = headers.get(SCHEDULE_TIME_ZONE_HEADER)
    if pattern.startswith("@at "):
        return schedule_time(pattern) if zone is None else None
    try:
        return cron.next_time(cron.normalize(pattern, zone), now, zone)
    except cron.CronError:
        return None


def _rfc3339(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Schedule:
    """A schedule held by a stream: its message, when it fires, and its target subject."""

    __slots__ = ("at", "stored", "target")

    def __init__(self, at: float, stored: _StoredMessage, target: str) -> None:
        self.at = at
        self.stored = stored
        self.target = target

    def __lt__(self, other: _Schedule) -> bool:
        return (self.at, self.stored.sequence) < (other.at, other.stored.sequence)


class _Stream:
    __slots__ = (
        "_captured",
        "consumers",
        "dedupe",
        "dedupe_order",
        "messages",
        "name",
        "schedule_heap",
        "scheduled",
        "schedules",
        "subjects",
        "work_queue",
    )

    def __init__(self, name: str, *, work_queue: bool = False, schedules: bool = False) -> None:
        self.name = name
        self.subjects: list[str] = []
        # subject -> captured: every publish asks every stream (cleared when subjects change)
        self._captured: dict[str, bool] = {}
        # messages[i].sequence == i + 1; a removed message stays, marked removed.
        self.messages: list[_StoredMessage] = []
        # msg_id -> clock time it was stored, plus the same in insertion order so that
        # expired ids are dropped from the front in amortised O(1).
        self.dedupe: dict[str, float] = {}
        self.dedupe_order: deque[tuple[float, str]] = deque()
        self.consumers: list[_Consumer] = []
        self.work_queue = work_queue
        self.schedules = schedules
        # The pending schedule of each schedule subject, and all of them earliest first
        # (entries of replaced schedules are skipped when they come up).
        self.scheduled: dict[str, _Schedule] = {}
        self.schedule_heap: list[_Schedule] = []

    def captures(self, subject: str) -> bool:
        captured = self._captured.get(subject)
        if captured is None:
            captured = any(matches_pattern(subject, s) for s in self.subjects)
            if len(self._captured) >= _CAPTURED_MAX:
                self._captured.clear()
            self._captured[subject] = captured
        return captured

    def add_subject(self, subject: str) -> None:
        if subject not in self.subjects:
            self.subjects.append(subject)
            self._captured.clear()

    def store(
        self, subject: str, data: bytes, headers: Mapping[str, str], now: float
    ) -> _StoredMessage:
        stored = _StoredMessage(len(self.messages) + 1, subject, data, headers, now)
        self.messages.append(stored)
        for consumer in self.consumers:
            consumer.signal.fire()
        return stored

    def remove(self, sequence: int) -> None:
        self.messages[sequence - 1].removed = True

    # -- message schedules ----------------------------------------------------

    def check_schedule(self, headers: Mapping[str, str], now: float) -> tuple[float, str]:
        """When a schedule published with ``headers`` at ``now`` first fires, and its
        target; or the BackendError the server answers with."""
        if not self.schedules:
            raise BackendError(f"stream {self.name}: {_SCHEDULES_DISABLED}")
        at = _first_time(headers, now)
        if at is None:
            raise BackendError(
                f"stream {self.name}: {_SCHEDULE_PATTERN_INVALID}: {headers[SCHEDULE_HEADER]!r}"
            )
        target = headers.get(SCHEDULE_TARGET_HEADER, "")
        if (
            validate_subject(target, wildcards=False) is not None
            or len(target) > MAX_SUBJECT_LENGTH
            or not self.captures(target)
        ):
            raise BackendError(f"stream {self.name}: {_SCHEDULE_TARGET_INVALID}: {target!r}")
        return at, target

    def schedule(self, stored: _StoredMessage, at: float, target: str) -> None:
        """Hold ``stored`` (just stored) as the schedule of its subject, replacing the one before."""
        old = self.scheduled.get(stored.subject)
        if old is not None:
            old.stored.removed = True
        entry = self.scheduled[stored.subject] = _Schedule(at, stored, target)
        heapq.heappush(self.schedule_heap, entry)

    def held(self, pattern: str, now: float) -> list[tuple[str, bytes, Mapping[str, str]]]:
        """What it holds on subjects matching ``pattern`` (subject, data, headers), once the
        schedules due at ``now`` have fired: neither removed nor fired schedules."""
        self.fire_due(now)
        return [
            (m.subject, m.data, m.headers)
            for m in self.messages
            if not m.removed and matches_pattern(m.subject, pattern)
        ]

    def resync(self, prefix: str, wanted: Mapping[str, Mapping[str, str]]) -> list[str]:
        """Remove the schedules under ``prefix`` that are not ``wanted`` as they are (schedule
        subject -> headers); the subjects of those wanted still to be set."""
        for subject, entry in list(self.scheduled.items()):
            if subject.startswith(prefix) and wanted.get(subject) != entry.stored.headers:
                del self.scheduled[subject]
                entry.stored.removed = True  # (purged: it does not fire)
        return [subject for subject in wanted if subject not in self.scheduled]

    def next_schedule(self) -> float | None:
        """When the earliest pending schedule fires (None: none is pending)."""
        heap = self.schedule_heap
        while heap:
            first = heap[0]
            if self.scheduled.get(first.stored.subject) is first:
                return first.at
            heapq.heappop(heap)
        return None

    def fire_due(self, now: float) -> None:
        """Store the target message of every schedule whose time has come; drop a one-shot
        schedule, and hold a repeating one until its next time (one firing for the times
        that have passed, as the server skips ahead after a restart)."""
        heap = self.schedule_heap
        while heap and heap[0].at <= now:
            entry = heapq.heappop(heap)
            subject = entry.stored.subject
            if self.scheduled.get(subject) is not entry:
                continue  # replaced
            given = entry.stored.headers
            headers = {k: v for k, v in given.items() if k not in _SCHEDULE_ONLY}
            headers[SCHEDULER_HEADER] = subject
            pattern, zone = given[SCHEDULE_HEADER], given.get(SCHEDULE_TIME_ZONE_HEADER)
            due = None if pattern.startswith("@at ") else cron.next_time(pattern, entry.at, zone)
            if due is not None and due <= now:
                due = cron.next_time(pattern, now, zone)
            if due is None:
                del self.scheduled[subject]
                entry.stored.removed = True
                headers[SCHEDULE_NEXT_HEADER] = "purge"
            else:
                headers[SCHEDULE_NEXT_HEADER] = _rfc3339(due)
                again = self.scheduled[subject] = _Schedule(due, entry.stored, entry.target)
                heapq.heappush(heap, again)
            self.store(entry.target, entry.stored.data, MappingProxyType(headers), now)

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
    time: float | None = None

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


@functools.lru_cache(maxsize=65536)
def _publish_subject_problem(subject: str) -> str | None:
    if len(subject) > MAX_SUBJECT_LENGTH:
        return f"subject {preview(subject)} is longer than {MAX_SUBJECT_LENGTH} characters"
    return validate_subject(subject, wildcards=False)


def _fan_out(
    subscriptions: list[_Subscription],
    round_robin: dict[str, int],
    subject: str,
    data: bytes,
    headers: Mapping[str, str],
) -> None:
    """Core NATS delivery: every plain subscriber, one member per queue group (in turn)."""
    groups: dict[str, list[_Subscription]] | None = None
    for sub in subscriptions:
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
        n = round_robin.get(group, 0)
        round_robin[group] = n + 1
        members[n % len(members)].queue.put(_CoreMessage(subject, data, headers))
