"""Streams as the engine wants them: made if missing, subjects added, work-queue retention
and message schedules where asked (and refused where the server cannot give them)."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from reactive.backends.nats._errors import _mapped
from reactive.errors import BackendError

__all__ = ["_ensure_stream"]

_STREAM_NAME_IN_USE = 10058


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
