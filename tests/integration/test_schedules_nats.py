"""Scheduled rules against a real nats-server (2.14+ repeating message schedules): each run
of a cron schedule is one execution with the run's id, however many engines serve the
workflow; an engine that starts leaves the schedule as it stands, and removes the
schedule of a rule that is gone."""

from __future__ import annotations

import re
from datetime import datetime

import msgspec
import nats.js.errors
import pytest
from nats.aio.client import Client
from test_engine_nats import engine_on, eventually, uid

from reactive import ExecutionState, RuleContext, ScheduledRun, Workflow, rule
from reactive.dsl.workflow import definition_of

pytestmark = pytest.mark.anyio


class Run(ExecutionState):
    run_at: str = ""


def scheduled(wid: str) -> type[Workflow]:
    class Ticking(Workflow, id=wid, state=Run):
        @rule(schedule="* * * * * *", mutate=True)  # every second
        def tick(self, ctx: RuleContext[Run, ScheduledRun]) -> None:
            ctx.state.phase = "ran"
            ctx.state.run_at = ctx.message.at.strftime("%Y%m%dT%H%M%SZ")

    return Ticking


def unscheduled(wid: str) -> type[Workflow]:
    class Quiet(Workflow, id=wid, state=Run):
        @rule(watch_kv=True, when=lambda ctx: False, mutate=True)
        def noop(self, ctx: RuleContext[Run, None]) -> None: ...

    return Quiet


async def test_each_run_of_a_schedule_is_one_execution_across_engines(
    nats_url: str, nc: Client
) -> None:
    wid = uid("cron")
    flow = scheduled(wid)
    bucket = definition_of(flow).bucket
    js = nc.jetstream()
    subject = f"reactive.timer.cron.{wid}.tick"
    async with engine_on(nats_url, [flow]) as first, engine_on(nats_url, [flow]):
        set_at = (await js.get_last_msg("REACTIVE_TIMERS", subject)).seq
        kv = await js.key_value(bucket)

        async def three_runs() -> list[str] | None:
            try:
                keys = sorted(await kv.keys())
            except nats.js.errors.NoKeysError:
                return None
            return keys if len(keys) >= 3 else None

        found = await eventually(three_runs, timeout=20, what="three runs")
        backend = first.backend
        for key in found:
            entry = await backend.kv_get(bucket, key)
            assert entry is not None
            state = msgspec.json.decode(entry.value, type=Run)
            # The id is the run's time, which the rule saw; the rule fired once for it.
            assert re.fullmatch(r"tick-\d{8}T\d{6}Z", state.id), state.id
            assert state.id == f"tick-{state.run_at}"
            assert [t.rule_id for t in state.timeline] == ["tick"]
        seconds = [datetime.strptime(k.split("-")[-1], "%Y%m%dT%H%M%SZ") for k in found]
        assert len(set(seconds)) == len(seconds)
    # A start leaves the schedule as it stands (an @every would start over otherwise) ...
    async with engine_on(nats_url, [flow]):
        assert (await js.get_last_msg("REACTIVE_TIMERS", subject)).seq == set_at
    # ... and one without the rule removes it.
    async with engine_on(nats_url, [unscheduled(wid)]):
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_last_msg("REACTIVE_TIMERS", subject)
