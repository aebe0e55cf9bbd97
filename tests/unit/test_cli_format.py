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


@pytest.mark.parametrize("status", ["completed", "failed", "escalated", "timed_out", "cancelled"])
def test_show_prints_no_deadline_ahead_of_an_ended_execution(status: str) -> None:
    lines = format_state("wf.e1", "wf", _state(status), now=NOW)
    deadline = _line(lines, "deadline")
    assert "(in " not in deadline
    assert deadline.split(None, 1)[1] == "- (the execution has ended)"


def test_show_prints_the_attempt_of_a_task_and_the_wait_before_the_next() -> None:
    waiting = {
        **_state("waiting"),
        "pending_task_id": "e1-charge-7-abc",
        "pending_rule_id": "charge",
        "task_deadline": "2026-01-01T12:00:30Z",
        "task_attempt": 2,
    }
    pending = _line(format_state("wf.e1", "wf", waiting, now=NOW), "pending task")
    assert pending.endswith("times out 2026-01-01 12:00:30.000Z, attempt 2")
    between = {**waiting, "pending_task_id": "", "task_attempt": 1}
    pending = _line(format_state("wf.e1", "wf", between, now=NOW), "pending task")
    assert pending.split(None, 2)[2] == (
        "none: attempt 1 of rule charge failed, the next goes 2026-01-01 12:00:30.000Z"
    )


def test_show_prints_the_timers_due() -> None:
    timers = [
        ("task", datetime(2026, 1, 1, 12, 5, tzinfo=UTC)),
        ("deadline", datetime(2026, 1, 1, 13, 0, tzinfo=UTC)),
    ]
    lines = format_state("wf.e1", "wf", _state("running"), now=NOW, timers=timers)
    assert _line(lines, "timers due").split(None, 2)[2] == (
        "deadline 2026-01-01 13:00:00.000Z, task 2026-01-01 12:05:00.000Z"
    )
    assert not any(
        line.startswith("timers due")
        for line in format_state("wf.e1", "wf", _state("running"), now=NOW)
    )


def test_show_prints_the_parent_of_a_child_execution() -> None:
    child = {
        **_state("running"),
        "parent": {
            "workflow": "orders",
            "id": "o1",
            "rule_id": "ship",
            "task_id": "t",
            "callback": "c",
        },
    }
    assert _line(format_state("ship.t", "ship", child, now=NOW), "parent").split(None, 1)[1] == (
        "orders.o1 (rule ship)"
    )


def test_show_prints_the_child_of_a_pending_task_and_no_timers_once_ended() -> None:
    waiting = {**_state("waiting"), "pending_task_id": "t-1", "pending_rule_id": "ship"}
    pending = _line(
        format_state("wf.e1", "wf", waiting, now=NOW, child=("ship", "t-1")), "pending task"
    )
    assert pending.endswith(" · child ship.t-1")
    timers = [("deadline", datetime(2026, 1, 1, 13, 0, tzinfo=UTC))]
    assert any(
        line.startswith("timers due")
        for line in format_state("wf.e1", "wf", _state("running"), now=NOW, timers=timers)
    )
    ended = format_state("wf.e1", "wf", _state("completed"), now=NOW, timers=timers)
    assert not any(line.startswith("timers due") for line in ended)
