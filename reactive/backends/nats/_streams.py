"""Streams as the engine wants them: made if missing, subjects added, work-queue retention
and message schedules where asked (and refused where the server cannot give them)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from reactive.backends.nats._errors import _mapped
from reactive.errors import BackendError, ServerFeatureError
from reactive.subjects import matches_pattern

__all__ = ["_StreamCache", "_ensure_stream", "_sync_schedules"]

_STREAM_NAME_IN_USE = 10058
_WRONG_LAST_SEQUENCE = 10071
_SCHEDULE_PATTERN_INVALID = 10189
_EXPECTED_LAST_SUBJECT_SEQUENCE = "Nats-Expected-Last-Subject-Sequence"


async def _ensure_stream(
    js: JetStreamContext,
    name: str,
    subjects: list[str],
    replicas: int,
    work_queue: bool,
    schedules: bool,
) -> None:
    retention = RetentionPolicy.WORK_QUEUE if work_queue else RetentionPolicy.LIMITS
    with _mapped(f"ensure stream {name}"):
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            try:
                info = await js.add_stream(
                    name=name,
                    subjects=list(subjects),
                    num_replicas=replicas,
                    retention=retention,
                    # (None: not sent, so a stream without schedules asks nothing new)
                    allow_msg_schedules=True if schedules else None,
                )
            except nats.js.errors.APIError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                info = await js.stream_info(name)  # created meanwhile by someone else
        config = info.config
        if work_queue and config.retention != RetentionPolicy.WORK_QUEUE:
            raise BackendError(
                f"stream {name} exists with {RetentionPolicy(config.retention).value} retention; it "
                "must be a work queue: delete it, or give the engine another stream name"
            )
        existing = list(config.subjects or [])
        missing = [s for s in subjects if s not in existing]
        if missing or (schedules and not config.allow_msg_schedules):
            config.subjects = existing + missing
            if schedules:
                config.allow_msg_schedules = True
            config = (await js.update_stream(config)).config
    if schedules and not config.allow_msg_schedules:
        # A server before 2.12 ignores the field it does not know.
        raise BackendError(
            f"stream {name}: the server does not keep message schedules "
            "(nats-server 2.12 or later is needed)"
        )


async def _sync_schedules(
    js: JetStreamContext, stream: str, prefix: str, wanted: Mapping[str, Mapping[str, str]]
) -> None:
    """Make the schedules on ``prefix``'s subjects those ``wanted`` (subject -> headers).

    A schedule already there with the same headers stays, so its next time stands
    (publishing it again would start an ``@every`` over); another is published with
    ``Nats-Expected-Last-Subject-Sequence``, so of engines starting together one writes
    it and the others find it written. Those not wanted are purged.
    """
    with _mapped(f"set the schedules of {prefix}* on stream {stream}"):
        for subject, headers in wanted.items():
            while True:
                try:
                    last = await js.get_last_msg(stream, subject)
                except nats.js.errors.NotFoundError:
                    seq = 0
                else:
                    # (The server adds headers of its own to a schedule: Nats-Rollup.)
                    given = last.headers or {}
                    if {k: v for k, v in given.items() if k.startswith("Nats-Schedule")} == headers:
                        break
                    seq = last.seq or 0
                try:
                    await js.publish(
                        subject,
                        b"",
                        stream=stream,
                        headers={**headers, _EXPECTED_LAST_SUBJECT_SEQUENCE: str(seq)},
                    )
                except nats.js.errors.APIError as exc:
                    if exc.err_code == _SCHEDULE_PATTERN_INVALID:
                        # (The engine checked the pattern: the server does not know it.)
                        raise ServerFeatureError(
                            f"{subject}: the server refuses the schedule "
                            f"{headers.get('Nats-Schedule')!r}: repeating schedules (@every, "
                            "cron) need nats-server 2.14 or later"
                        ) from exc
                    if exc.err_code != _WRONG_LAST_SEQUENCE:
                        raise
                    continue  # another engine wrote it meanwhile: look again
                break
        info = await js.stream_info(stream, subjects_filter=prefix + ">")
        for subject in (info.state.subjects or {}).keys() - wanted.keys():
            await js.purge_stream(stream, subject=subject)


class _StreamCache:
    """Which stream captures a subject a publish goes to (None: none), as the server said,
    for ``ttl`` seconds; forgotten where a stream's subjects change."""

    _MAX = 10_000

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        # subject -> (stream name or None, expiry on the monotonic clock)
        self._cache: dict[str, tuple[str | None, float]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def drop(self, subject: str) -> None:
        self._cache.pop(subject, None)

    def forget(self, patterns: list[str]) -> None:
        """Forget the subjects a stream with these subjects may capture now."""
        for subject in list(self._cache):
            if any(matches_pattern(subject, p) or matches_pattern(p, subject) for p in patterns):
                del self._cache[subject]

    async def stream_for(self, js: JetStreamContext, subject: str) -> str | None:
        now = time.monotonic()
        cached = self._cache.get(subject)
        if cached is not None and cached[1] > now:
            return cached[0]
        with _mapped(f"find the stream for {subject}"):
            try:
                stream: str | None = await js.find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                stream = None
        if len(self._cache) >= self._MAX:
            self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
            if len(self._cache) >= self._MAX:
                self._cache.clear()
        self._cache[subject] = (stream, now + self._ttl)
        return stream
