"""Subjects that several processes add to one stream, kept in the meta bucket so none is lost.

JetStream has no compare-and-set on a stream's configuration: a process adds its subjects by
reading the configuration and writing it back with them, so two processes that do it at
once (two engines serving different workflows on one ``stream=``, starting together; the
command line's ``start`` beside them) can each write what they read plus their own, and
the later write drops the other's subject. Messages published on a dropped subject are not
stored: a JetStream publish fails, a plain one is lost.

So the set of subjects every process asked of a stream is kept at ``streams.<stream>`` in
the meta bucket, and grows by compare-and-set. A process adds its subjects there, writes
the stream with the whole set (``Backend.ensure_stream`` keeps what the stream already has
and adds what is missing), then reads the set again from the bucket's leader. If the set
has a newer revision, another process added to it and may have written the stream before
this process's write landed, which could then have dropped that subject: this process
writes the stream again with the set it now reads. The process whose write is the last one
read the set after that write and found it unchanged, so that write held every subject
added up to then; a subject added later is written by its own process, after it.

The set lives for ten minutes after its last change (a per-key TTL): it only has to outlast
the processes adding at the same time, and a subject taken off the stream by hand later
is not put back unless a process asks for it again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from typing import Final

import msgspec

from reactive.backends.base import Backend
from reactive.errors import BackendError, ConflictError, DecodeError, TransientBackendError

__all__ = ["StreamSubjects", "ensure_shared_stream", "stream_subjects_key"]

log = logging.getLogger("reactive")

_KEY_SAFE: Final = re.compile(r"[-_=A-Za-z0-9]{1,200}")
KEPT_FOR: Final = 600.0  # seconds the set outlives its last change


class StreamSubjects(msgspec.Struct, frozen=True, omit_defaults=True):
    """What ``streams.<stream>`` holds: every subject a process asked the stream to keep."""

    subjects: list[str] = []


def stream_subjects_key(stream: str) -> str:
    """The meta bucket's key for ``stream``'s subjects (a digest where the name is no key)."""
    if _KEY_SAFE.fullmatch(stream):
        return f"streams.{stream}"
    return "streams.h-" + hashlib.sha256(stream.encode()).hexdigest()[:32]


def _decoded(raw: bytes, key: str) -> set[str]:
    try:
        return set(msgspec.json.decode(raw, type=StreamSubjects).subjects)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"meta bucket key {key}: not a list of stream subjects: {exc}") from exc


async def ensure_shared_stream(
    backend: Backend, meta_bucket: str, stream: str, subjects: Iterable[str]
) -> None:
    """Make ``stream`` keep ``subjects`` (making it if missing) without dropping a subject
    another process adds at the same time (see the module's docstring).

    A subject the stream cannot take (one another stream has) is taken out of the set
    again before the error is raised, so it does not fail every later process's start;
    and where the stream refuses the set for a subject another process asked for, this
    process's subjects are added alone.
    """
    ours = set(subjects)
    key = stream_subjects_key(stream)
    added: set[str] = set()
    while True:
        entry = await backend.kv_get(meta_bucket, key, leader=True)
        kept = _decoded(entry.value, key) if entry is not None else set()
        wanted = kept | ours
        revision = entry.revision if entry is not None else 0
        if wanted != kept or entry is None:
            value = msgspec.json.encode(StreamSubjects(sorted(wanted)))
            try:
                if entry is None:
                    revision = await backend.kv_create(meta_bucket, key, value, ttl=KEPT_FOR)
                else:
                    revision = await backend.kv_update(
                        meta_bucket, key, value, revision, ttl=KEPT_FOR
                    )
            except ConflictError:
                continue  # another process added to it: read it again
            added |= ours - kept
        try:
            await backend.ensure_stream(stream, sorted(wanted))
        except TransientBackendError:
            raise
        except BackendError as exc:
            if wanted - ours and await _ours_alone(backend, stream, ours, exc):
                return
            if added:
                await _withdraw(backend, meta_bucket, key, added)
            raise
        again = await backend.kv_get(meta_bucket, key, leader=True)
        if again is not None and again.revision == revision:
            return


async def _ours_alone(backend: Backend, stream: str, ours: set[str], refused: BackendError) -> bool:
    """Whether the stream takes this process's subjects alone, when it refused the whole
    set: a subject another process asked for (one that died before it took it out again)
    must not fail this process's start."""
    try:
        await backend.ensure_stream(stream, sorted(ours))
    except BackendError:
        return False
    log.warning(
        "stream %s refused a subject another process asked of it (%s); this process's are kept",
        stream,
        refused,
    )
    return True


async def _withdraw(backend: Backend, meta_bucket: str, key: str, subjects: set[str]) -> None:
    """Take ``subjects`` out of the set again (best effort: the error that led here wins)."""
    for _ in range(10):
        try:
            entry = await backend.kv_get(meta_bucket, key, leader=True)
            if entry is None:
                return
            kept = _decoded(entry.value, key)
            if not kept & subjects:
                return
            value = msgspec.json.encode(StreamSubjects(sorted(kept - subjects)))
            await backend.kv_update(meta_bucket, key, value, entry.revision, ttl=KEPT_FOR)
            return
        except ConflictError:
            continue
        except BackendError:
            return
