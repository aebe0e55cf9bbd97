"""Streams and core subscriptions in memory.

A stream stores what its subjects capture, deduplicated by message id within a
window of clock time. Core subscriptions are at-most-once: a message reaches the
subscribers there are when it is published, and one member of each queue group.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from reactive.backends.base import InboundMessage
from reactive.backends.memory._queue import _Queue
from reactive.subjects import MAX_SUBJECT_LENGTH, matches_pattern, preview, validate_subject

if TYPE_CHECKING:
    from reactive.backends.memory._consumers import _Consumer

__all__ = [
    "_CoreMessage",
    "_StoredMessage",
    "_Stream",
    "_Subscription",
    "_publish_subject_problem",
]


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


@functools.lru_cache(maxsize=65536)
def _publish_subject_problem(subject: str) -> str | None:
    if len(subject) > MAX_SUBJECT_LENGTH:
        return f"subject {preview(subject)} is longer than {MAX_SUBJECT_LENGTH} characters"
    return validate_subject(subject, wildcards=False)
