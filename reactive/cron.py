"""Schedule patterns as nats-server reads them (message schedules, ADR-51, nats-server 2.14+).

A pattern is one of:

* ``@every <duration>``: a Go duration (``90s``, ``1h30m``), at least one second; the
  first run one interval after the schedule is set, each next one an interval later;
* a cron expression of six fields, ``second minute hour day-of-month month day-of-week``
  (``*``, ``?``, ``a-b``, ``a,b``, ``*/n``, ``a-b/n``, ``a/n``; months ``jan``-``dec`` and
  days ``sun``-``sat`` by name; day-of-week 0 is Sunday), evaluated in UTC or in a time
  zone (the ``Nats-Schedule-Time-Zone`` header, an IANA name);
* ``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily`` (``@midnight``), ``@hourly``.

As in the server, a day matches when both of day-of-month and day-of-week do if either
is ``*`` or ``?``, and when one of them does otherwise. ``normalize`` also takes the five
fields of a classic crontab (no seconds: at second 0). Pure: the DSL checks a rule's
``schedule=`` with it, and the in-memory backend fires its schedules with ``next_time``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["CronError", "every_seconds", "next_time", "normalize", "period", "time_zone"]

_PREDEFINED = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
_MONTHS = {
    m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())
}
_DAYS = {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}
# (name, lowest, highest, names) of the six fields.
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("second", 0, 59, {}),
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# The server gives up on a cron expression that matches no time within five years.
_YEARS = 5


class CronError(ValueError):
    """A schedule pattern nats-server would refuse."""


@dataclass(frozen=True, slots=True)
class _Cron:
    fields: tuple[frozenset[int], ...]  # second, minute, hour, day, month, weekday
    day_or: bool  # a day matches on either day field (neither is '*' nor '?')


def every_seconds(pattern: str) -> float | None:
    """The interval of an ``@every`` pattern in seconds (None: not one); CronError if it
    is not a Go duration of at least a second."""
    if not pattern.startswith("@every "):
        return None
    text = pattern[len("@every ") :]
    pos, total = 0, 0.0
    for m in _GO_DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise CronError(f"{pattern!r}: not a duration such as '90s' or '1h30m'")
    if total < 1:
        raise CronError(f"{pattern!r}: an interval of at least 1s")
    return total


def time_zone(name: str | None) -> ZoneInfo | None:
    """The IANA time zone of that name (None: UTC); CronError if there is none."""
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CronError(
            f"unknown time zone {name!r} (an IANA name such as 'Europe/Paris')"
        ) from None


def normalize(pattern: str, tz: str | None = None) -> str:
    """The pattern as the server takes it (a crontab's five fields get a seconds field of
    0); CronError, naming what is wrong, if the server would refuse it or it never fires."""
    if not isinstance(pattern, str):
        raise CronError(f"a schedule is a string, not {pattern!r}")
    pattern = " ".join(pattern.split())
    if pattern.startswith("@every"):
        every_seconds(pattern if pattern != "@every" else "@every ")
        if tz is not None:
            raise CronError(f"{pattern!r}: an interval has no time zone (cron expressions do)")
        return pattern
    zone = time_zone(tz)
    if pattern.startswith("@"):
        if pattern not in _PREDEFINED:
            raise CronError(f"{pattern!r}: not one of @every <duration>, {', '.join(_PREDEFINED)}")
        return pattern
    if len(pattern.split()) == 5:
        pattern = "0 " + pattern
    cron = _parse(pattern)
    if _next(cron, datetime.now(UTC), zone) is None:
        raise CronError(f"{pattern!r} matches no time in the next {_YEARS} years")
    return pattern


def next_time(pattern: str, after: float, tz: str | None = None) -> float | None:
    """When a (normalized) pattern fires next after ``after`` (seconds since the epoch),
    for a schedule last due at ``after``; None if it never does. ``@every``: one interval
    on from ``after`` rounded to the second, as the server counts."""
    every = every_seconds(pattern)
    if every is not None:
        return round(after) + every
    cron = _parse(_PREDEFINED.get(pattern, pattern))
    found = _next(cron, datetime.fromtimestamp(after, UTC), time_zone(tz))
    return None if found is None else found.timestamp()


def period(pattern: str, tz: str | None = None, around: float = 1_767_225_600.0) -> float:
    """The time between two runs of a (normalized) pattern, the first after ``around``
    (the manual clock's start by default): what a test moves its clock by."""
    first = next_time(pattern, around, tz)
    second = next_time(pattern, first, tz) if first is not None else None
    return second - first if first is not None and second is not None else 0.0


def _parse(pattern: str) -> _Cron:
    parts = pattern.split()
    if len(parts) != 6:
        raise CronError(
            f"{pattern!r}: a cron expression has 6 fields (second minute hour "
            f"day-of-month month day-of-week) or 5 (no seconds), not {len(parts)}"
        )
    fields: list[frozenset[int]] = []
    star = [False] * 6
    for i, (text, (name, low, high, names)) in enumerate(zip(parts, _FIELDS, strict=True)):
        values: set[int] = set()
        for item in text.split(","):
            values |= _range(item, name, low, high, names, pattern)
            if item in ("*", "?"):
                star[i] = True
        fields.append(frozenset(values))
    return _Cron(tuple(fields), day_or=not (star[3] or star[5]))


def _range(
    item: str, name: str, low: int, high: int, names: dict[str, int], pattern: str
) -> set[int]:
    def number(text: str) -> int:
        value = names.get(text.lower())
        if value is not None:
            return value
        if not text.isdigit():
            raise CronError(f"{pattern!r}: {name} {text!r} is not a number")
        return int(text)

    span, _, step_text = item.partition("/")
    if step_text and (not step_text.isdigit() or int(step_text) == 0):
        raise CronError(f"{pattern!r}: {name} step {step_text!r} must be a positive number")
    step = int(step_text) if step_text else 1
    if span in ("*", "?"):
        start, end = low, high
    else:
        first, dash, last = span.partition("-")
        start = number(first)
        end = number(last) if dash else (high if step_text else start)
    if start < low or end > high or start > end:
        raise CronError(f"{pattern!r}: {name} {item!r} is outside {low}-{high}")
    return set(range(start, end + 1, step))


def _next(cron: _Cron, after: datetime, zone: ZoneInfo | None) -> datetime | None:
    """The first time after ``after`` the expression matches (its wall clock in ``zone``)."""
    second, minute, hour, day, month, weekday = cron.fields
    t = after.astimezone(zone or UTC).replace(microsecond=0, tzinfo=None) + timedelta(seconds=1)
    limit = t.year + _YEARS
    while t.year <= limit:
        if t.month not in month:
            t = (t.replace(day=1) + timedelta(days=32)).replace(day=1, hour=0, minute=0, second=0)
        elif not _day_matches(cron, day, weekday, t):
            t = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0)
        elif t.hour not in hour:
            t = (t + timedelta(hours=1)).replace(minute=0, second=0)
        elif t.minute not in minute:
            t = (t + timedelta(minutes=1)).replace(second=0)
        elif t.second not in second:
            t += timedelta(seconds=1)
        else:
            return t.replace(tzinfo=zone or UTC).astimezone(UTC)
    return None


def _day_matches(cron: _Cron, day: frozenset[int], weekday: frozenset[int], t: datetime) -> bool:
    in_month = t.day in day
    in_week = (t.isoweekday() % 7) in weekday
    return (in_month or in_week) if cron.day_or else (in_month and in_week)
