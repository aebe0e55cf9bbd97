"""Scheduled rules: a workflow started on a cron expression or an interval.

``@rule(schedule="0 2 * * *", mutate=True)`` starts an execution at each time of the
schedule. The schedule is a repeating message schedule in NATS (nats-server 2.14+) on the
engine's timer stream, set by the engines when they start; each time it fires, the
server stores a message that one engine consumes, as a message + state rule whose
message is a ``ScheduledRun`` and whose execution id is the run's (``<rule>-<time>``,
the same however often the message comes), so each run is one execution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from reactive import cron
from reactive.backends.base import (
    SCHEDULE_HEADER,
    SCHEDULE_NEXT_HEADER,
    SCHEDULE_TARGET_HEADER,
    SCHEDULE_TIME_ZONE_HEADER,
)
from reactive.dsl.durations import parse_duration

__all__ = [
    "RUN_PREFIX",
    "SCHEDULE_PREFIX",
    "Schedule",
    "ScheduledRun",
    "compile_schedule",
    "run_id",
    "run_subject",
    "schedule_headers_of",
    "schedule_subject",
    "scheduled_run",
]

# The subjects of the timer stream for schedules: one repeating schedule per rule on
# ``reactive.timer.cron.<workflow>.<rule>``, storing its runs on ``reactive.timer.run.…``.
SCHEDULE_PREFIX = "reactive.timer.cron"
RUN_PREFIX = "reactive.timer.run"


@dataclass(frozen=True, slots=True)
class Schedule:
    """A rule's schedule: ``pattern`` a cron expression (six fields with seconds, or a
    crontab's five), ``@hourly``, ``@daily``, ``@weekly``, ``@monthly``, ``@yearly``, or
    ``@every <duration>``; ``tz`` the IANA time zone of a cron expression (UTC if None)."""

    pattern: str
    tz: str | None = None


class ScheduledRun(msgspec.Struct, frozen=True):
    """The message of a scheduled rule: one run of its schedule.

    ``id`` is the run's execution id unless the rule's ``state_key`` says otherwise:
    ``<rule>-<at as YYYYmmddTHHMMSSZ>``. ``at`` is the run's time (UTC, to the second);
    ``next`` when the schedule runs next.
    """

    id: str
    rule: str
    schedule: str
    at: datetime
    next: datetime | None = None


@dataclass(frozen=True, slots=True)
class CompiledSchedule:
    pattern: str  # as the server takes it
    tz: str | None
    subject: str  # where its runs are stored


def run_id(run: ScheduledRun) -> str:
    """A scheduled rule's execution id, unless its ``state_key`` says otherwise."""
    return run.id


def run_subject(workflow_id: str, rule_id: str) -> str:
    """Where a scheduled rule's runs are stored."""
    return f"{RUN_PREFIX}.{workflow_id}.{rule_id}"


def schedule_subject(workflow_id: str, rule_id: str) -> str:
    """Where a scheduled rule's repeating schedule is kept."""
    return f"{SCHEDULE_PREFIX}.{workflow_id}.{rule_id}"


def compile_schedule(
    schedule: Any, workflow_id: str, rule_id: str, bad: Callable[[str], None]
) -> CompiledSchedule | None:
    """A rule's ``schedule=`` checked (None: not a scheduled rule, or a mistake reported)."""
    if schedule is None:
        return None
    tz: str | None = None
    if isinstance(schedule, Schedule):
        schedule, tz = schedule.pattern, schedule.tz
    if isinstance(schedule, int | float | timedelta) and not isinstance(schedule, bool):
        seconds = parse_duration(schedule)
        if not math.isfinite(seconds):
            bad(f"schedule={schedule!r} is not a time")
            return None
        schedule = f"@every {seconds:g}s"
    try:
        pattern = cron.normalize(schedule, tz)
    except cron.CronError as e:
        bad(f"schedule: {e}")
        return None
    return CompiledSchedule(pattern, tz, run_subject(workflow_id, rule_id))


def schedule_headers_of(
    workflow_id: str, rule_id: str, pattern: str, tz: str | None
) -> dict[str, str]:
    """The headers of a rule's repeating schedule, stored on its run subject."""
    headers = {
        SCHEDULE_HEADER: pattern,
        SCHEDULE_TARGET_HEADER: run_subject(workflow_id, rule_id),
    }
    if tz is not None:
        headers[SCHEDULE_TIME_ZONE_HEADER] = tz
    return headers


def scheduled_run(
    rule_id: str, pattern: str, stored: float | None, headers: Mapping[str, str], now: float
) -> ScheduledRun:
    """The run a fired schedule's message stands for: its time is when the stream stored
    it, to the second (the server fires on the second, so that is the run's time; a
    message delivered again was stored once, so its id is the same)."""
    at = datetime.fromtimestamp(math.floor(stored if stored is not None else now), UTC)
    following: datetime | None = None
    text = headers.get(SCHEDULE_NEXT_HEADER, "")
    if text and text != "purge":
        try:
            following = datetime.fromisoformat(text).astimezone(UTC)
        except ValueError:
            following = None
    return ScheduledRun(
        id=f"{rule_id}-{at:%Y%m%dT%H%M%SZ}", rule=rule_id, schedule=pattern, at=at, next=following
    )
