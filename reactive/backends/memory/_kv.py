"""KV buckets in memory: one revision counter per bucket, the latest entry per key, watchers.

A bucket is a stream with history=1: every write, a delete marker too, takes the
bucket's next revision; a watcher gets each new entry whose key matches its
pattern, in an unbounded queue, so a slow reader never blocks a writer.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Mapping
from types import MappingProxyType

from reactive.backends.base import KVEntry
from reactive.backends.memory._queue import _Queue
from reactive.subjects import MAX_STORED_KEY_LENGTH, matches_pattern, preview, validate_key_pattern

__all__ = [
    "_EXPECTING",
    "_Bucket",
    "_Watcher",
    "_bucket_append",
    "_check_key",
    "_expire",
    "_expires_at",
]


class _Watcher:
    __slots__ = ("pattern", "queue")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.queue: _Queue[KVEntry] = _Queue()


class _Bucket:
    __slots__ = ("expiring", "latest", "name", "revision", "watchers")

    def __init__(self, name: str) -> None:
        self.name = name
        self.revision = 0  # the bucket's stream sequence: shared by all keys
        # Latest entry per key, delete markers included (history=1, like a default KV bucket).
        self.latest: dict[str, KVEntry] = {}
        self.watchers: list[_Watcher] = []
        # (when, key, revision) of the revisions written with a TTL, earliest first.
        self.expiring: list[tuple[float, str, int]] = []


def _bucket_append(
    bucket: _Bucket, key: str, value: bytes, deleted: bool, expires_at: float | None = None
) -> KVEntry:
    """Store a new revision of ``key`` and hand it to every matching watcher."""
    bucket.revision += 1
    entry = (
        KVEntry(bucket.name, key, b"", bucket.revision, "DEL")
        if deleted
        else KVEntry(bucket.name, key, value, bucket.revision)
    )
    bucket.latest[key] = entry
    if expires_at is not None:
        heapq.heappush(bucket.expiring, (expires_at, key, bucket.revision))
    for watcher in bucket.watchers:  # empty list: O(1) put
        if watcher.pattern == ">" or matches_pattern(key, watcher.pattern):
            watcher.queue.put(entry)
    return entry


def _expire(bucket: _Bucket, now: float) -> None:
    """Remove the revisions whose TTL has passed, as NATS does: the key reads as missing
    (no delete marker, nothing for watchers), unless it was written again since."""
    expiring = bucket.expiring
    while expiring and expiring[0][0] <= now:
        _, key, revision = heapq.heappop(expiring)
        entry = bucket.latest.get(key)
        if entry is not None and entry.revision == revision:
            del bucket.latest[key]


def _expires_at(now: float, ttl: float | None) -> float | None:
    """When a value written now with ``ttl`` goes: whole seconds, at least one (as on NATS)."""
    return None if ttl is None else now + max(1, math.ceil(ttl))


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
