"""Durations as users write them: seconds, timedelta, or '500ms', '30s', '10m', '2h', '1d', '1h30m'."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["Duration", "parse_duration"]

Duration = float | int | str | timedelta

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Duration) -> float:
    """Seconds in ``value``; raises ValueError for anything unreadable."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos = 0
        total = 0.0
        for m in _PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return total
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(
        f"not a duration: {value!r} (use seconds, a timedelta, or e.g. '30s', '10m', '1h')"
    )
