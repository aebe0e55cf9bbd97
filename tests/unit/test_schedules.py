"""Scheduled rules (issue "sagas", item 5): a workflow started on a cron expression or an
interval, each run one execution with a deterministic id, from a repeating schedule in
NATS that the in-memory backend fires on the manual clock. And the cron patterns as
nats-server reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from reactive import (
    DefinitionError,
    ExecutionState,
    MemoryBackend,
    RuleContext,
    Schedule,
    ScheduledRun,
    Status,
    Workflow,
    rule,
)
from reactive.clock import ManualClock
from reactive.cron import CronError, next_time, normalize
from reactive.testing import TestEngine
from reactive.testing.strategies import machine_settings, workflow_test

pytestmark = pytest.mark.anyio

MIDNIGHT = datetime(2026, 11, 30, tzinfo=UTC).timestamp()


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def iso(t: float | None) -> str:
    assert t is not None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S")


# ---------------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    ("pattern", "tz", "after", "expected"),
    [
        ("*/2 * * * * *", None, "2026-11-30T10:00:00.5+00:00", "2026-11-30T10:00:02"),
        ("0 2 * * *", None, "2026-11-30T10:00:00+00:00", "2026-12-01T02:00:00"),
        ("0 0 2 * * *", "Europe/Paris", "2026-11-30T10:00:00+00:00", "2026-12-01T01:00:00"),
        ("0 0 2 * * *", "Europe/Paris", "2026-07-01T10:00:00+00:00", "2026-07-02T00:00:00"),
        ("@daily", None, "2026-11-30T00:00:00+00:00", "2026-12-01T00:00:00"),
        ("@hourly", None, "2026-11-30T10:59:59+00:00", "2026-11-30T11:00:00"),
        ("@weekly", None, "2026-11-30T10:00:00+00:00", "2026-12-06T00:00:00"),  # a Sunday
        ("@monthly", None, "2026-11-30T10:00:00+00:00", "2026-12-01T00:00:00"),
        ("@yearly", None, "2026-11-30T10:00:00+00:00", "2027-01-01T00:00:00"),
        ("0 30 9 * * mon-fri", None, "2026-12-04T10:00:00+00:00", "2026-12-07T09:30:00"),
        ("0 0 0 1-7 * mon", None, "2026-11-30T10:00:00+00:00", "2026-12-01T00:00:00"),  # OR
        ("0 0 0 * * mon", None, "2026-11-30T10:00:00+00:00", "2026-12-07T00:00:00"),
        ("0 0 12 29 feb ?", None, "2026-03-01T00:00:00+00:00", "2028-02-29T12:00:00"),
        ("0 15-45/15 * * * *", None, "2026-11-30T10:45:00+00:00", "2026-11-30T11:15:00"),
        ("@every 1h30m", None, "2026-11-30T10:00:00.4+00:00", "2026-11-30T11:30:00"),
    ],
)
def test_next_time_is_the_servers(pattern: str, tz: str | None, after: str, expected: str) -> None:
    assert iso(next_time(normalize(pattern, tz), at(after), tz)) == expected


@pytest.mark.parametrize(
    ("pattern", "tz", "reason"),
    [
        ("* * *", None, "has 6 fields"),
        ("60 * * * * *", None, "second '60' is outside 0-59"),
        ("0 0 25 * * *", None, "hour '25' is outside 0-23"),
        ("0 0 0 * 13 *", None, "month '13' is outside 1-12"),
        ("0 0 0 * * 7", None, "day of week '7' is outside 0-6"),
        ("*/0 * * * * *", None, "step '0' must be a positive number"),
        ("x * * * * *", None, "second 'x' is not a number"),
        ("0 0 0 30 feb *", None, "matches no time"),
        ("@every 500ms", None, "at least 1s"),
        ("@every 1d", None, "not a duration"),
        ("@every 1h", "Europe/Paris", "an interval has no time zone"),
        ("@fortnightly", None, "not one of"),
        ("@daily", "Mars/Olympus", "unknown time zone"),
    ],
)
def test_patterns_the_server_refuses_are_refused_with_the_reason(
    pattern: str, tz: str | None, reason: str
) -> None:
    with pytest.raises(CronError, match=reason):
        normalize(pattern, tz)


# ---------------------------------------------------------------------- workflows


class Report(ExecutionState):
    run_at: str = ""
    following: str = ""


class Nightly(Workflow, id="nightly", state=Report):
    @rule(schedule="0 2 * * *", mutate=True)
    def start(self, ctx: RuleContext[Report, ScheduledRun]) -> None:
        ctx.state.phase = "running"
        ctx.state.run_at = ctx.message.at.isoformat()
        ctx.state.following = ctx.message.next.isoformat() if ctx.message.next else ""

    @rule(watch_kv=True, when=lambda ctx: ctx.state.phase == "running", complete=True)
    def finish(self, ctx: RuleContext[Report, None]) -> None: ...


async def test_a_cron_rule_starts_one_execution_per_run_with_the_runs_id() -> None:
    clock = ManualClock(MIDNIGHT)
    async with TestEngine(Nightly, clock=clock) as te:
        await te.advance(2 * 3600 - 1)
        assert te.executions(Nightly) == []
        await te.advance(1)
        first = te.state(Nightly, "start-20261130T020000Z")
        assert first.status is Status.COMPLETED
        assert first.run_at == "2026-11-30T02:00:00+00:00"
        assert first.following == "2026-12-01T02:00:00+00:00"
        await te.advance(86400)
        assert sorted(s.id for s in te.executions(Nightly)) == [
            "start-20261130T020000Z",
            "start-20261201T020000Z",
        ]


class Hourly(Workflow, id="hourly", state=Report):
    @rule(schedule=timedelta(hours=1), mutate=True)
    def tick(self, ctx: RuleContext[Report, ScheduledRun]) -> None:
        ctx.state.phase = "ran"


async def test_an_interval_survives_restarts_without_starting_over() -> None:
    clock = ManualClock(MIDNIGHT)
    async with TestEngine(Hourly, clock=clock) as te:
        await te.advance(1800)
        await te.restart()  # the schedule is in NATS: a start leaves its next time as it is
        await te.advance(1800)
        assert [s.id for s in te.executions(Hourly)] == ["tick-20261130T010000Z"]
        await te.restart(down_for=3 * 3600)  # missed runs: one, as the server skips ahead
        assert [s.id for s in te.executions(Hourly)] == [
            "tick-20261130T010000Z",
            "tick-20261130T040000Z",
        ]


class ByDate(Workflow, id="by-date", state=Report):
    @rule(
        schedule=Schedule("0 0 6 * * *", tz="Europe/Paris"),
        state_key=lambda run: f"report-{run.at:%Y-%m-%d}",
        mutate=True,
    )
    def start(self, ctx: RuleContext[Report, ScheduledRun]) -> None:
        ctx.state.run_at = ctx.message.at.isoformat()


async def test_a_time_zone_and_an_id_of_the_users_choice() -> None:
    async with TestEngine(ByDate, clock=ManualClock(MIDNIGHT)) as te:
        await te.advance(6 * 3600)
        assert te.state(ByDate, "report-2026-11-30").run_at == "2026-11-30T05:00:00+00:00"


async def test_a_run_is_one_execution_however_many_engines_take_the_schedule() -> None:
    clock = ManualClock(MIDNIGHT)
    backend = MemoryBackend(clock=clock)
    async with (
        TestEngine(Hourly, clock=clock, backend=backend) as te,
        TestEngine(Hourly, clock=clock, backend=backend) as other,
    ):
        await te.advance(3600)
        await other.settle()
        runs = te.executions(Hourly)
        assert [s.id for s in runs] == ["tick-20261130T010000Z"]
        assert runs[0].iteration == 0 and len(runs[0].timeline) == 1
        schedules = backend.peek_stream("REACTIVE_TIMERS", "reactive.timer.cron.>")
        assert [s for s, _, _ in schedules] == ["reactive.timer.cron.hourly.tick"]


class HourlyChanged(Workflow, id="hourly", state=Report):
    @rule(schedule="@every 2h", mutate=True)
    def tick(self, ctx: RuleContext[Report, ScheduledRun]) -> None:
        ctx.state.phase = "ran"


class HourlyDropped(Workflow, id="hourly", state=Report):
    @rule(watch_kv=True, when=lambda ctx: False, mutate=True)
    def noop(self, ctx: RuleContext[Report, None]) -> None: ...


async def test_a_changed_schedule_replaces_the_old_and_a_dropped_one_is_removed() -> None:
    clock = ManualClock(MIDNIGHT)
    backend = MemoryBackend(clock=clock)
    async with TestEngine(Hourly, clock=clock, backend=backend):
        pass
    async with TestEngine(HourlyChanged, clock=clock, backend=backend) as te:
        (schedule,) = backend.peek_stream("REACTIVE_TIMERS", "reactive.timer.cron.>")
        assert schedule[2]["Nats-Schedule"] == "@every 2h"
        await te.advance(7200)
        assert [s.id for s in te.executions(HourlyChanged)] == ["tick-20261130T020000Z"]
    async with TestEngine(HourlyDropped, clock=clock, backend=backend) as te:
        assert backend.peek_stream("REACTIVE_TIMERS", "reactive.timer.cron.>") == []
        await te.advance(7200)
        assert len(te.executions(HourlyDropped)) == 1  # (the run before: no new one)


def test_schedule_mistakes_are_refused_at_class_creation() -> None:
    class Other(ExecutionState):
        pass

    with pytest.raises(DefinitionError) as info:

        class Bad(Workflow, id="bad-schedules", state=Report):
            @rule(schedule="0 0 0 30 feb *", mutate=True)
            def never(self, ctx: RuleContext[Report, ScheduledRun]) -> None: ...

            @rule(schedule=Schedule("@every 1h", tz="Europe/Paris"), mutate=True)
            def zoned(self, ctx: RuleContext[Report, ScheduledRun]) -> None: ...

            @rule(schedule="@daily", on_subject="a.b", mutate=True)
            def two(self, ctx: RuleContext[Report, ScheduledRun]) -> None: ...

            @rule(schedule="@daily", mutate=True)
            def typed(self, ctx: RuleContext[Report, Other]) -> None: ...

            @rule(every="1h", mutate=True)
            def loose(self, ctx: RuleContext[Report, None]) -> None: ...

    message = str(info.value)
    assert "rule 'never': schedule: '0 0 0 30 feb *' matches no time" in message
    assert "rule 'zoned': schedule: '@every 1h': an interval has no time zone" in message
    assert "rule 'two': schedule= is a trigger of its own" in message
    assert "rule 'typed': a scheduled rule's message is a ScheduledRun" in message
    assert "to start executions on a clock, use schedule=" in message


# A property test: runs of the schedule come with the drawn clock moves and restarts.
TestNightlyProperties = workflow_test(
    Nightly, settings=machine_settings(max_examples=40), report_unreached=False
)
