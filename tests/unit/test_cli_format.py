"""How the CLI prints an execution (``show``): pure formatting, no server, a fixed clock."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reactive.cli.listing import format_state

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def _state(status: str) -> dict[str, object]:
    return {
        "id": "e1",
        "workflow_id": "wf",
        "phase": "done",
        "status": status,
        "created_at": "2026-01-01T11:59:00Z",
        "updated_at": "2026-01-01T11:59:30Z",
        "completed_at": "2026-01-01T11:59:30Z" if status != "running" else None,
        "deadline": "2026-01-01T12:04:00Z",  # four minutes ahead of NOW
    }


def _line(lines: list[str], name: str) -> str:
    return next(line for line in lines if line.startswith(f"{name} "))


def test_show_prints_the_deadline_ahead_of_a_running_execution() -> None:
    lines = format_state("wf.e1", "wf", _state("running"), now=NOW)
    assert _line(lines, "deadline").split(None, 1)[1] == "2026-01-01 12:04:00.000Z (in 4m)"


@pytest.mark.parametrize("status", ["completed", "failed", "escalated", "timed_out"])
def test_show_prints_no_deadline_ahead_of_an_ended_execution(status: str) -> None:
    lines = format_state("wf.e1", "wf", _state(status), now=NOW)
    deadline = _line(lines, "deadline")
    assert "(in " not in deadline
    assert deadline.split(None, 1)[1] == "- (the execution has ended)"
