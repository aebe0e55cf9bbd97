"""Deciding and transitioning, tested directly: pure functions of a state and an event.

No engine, no backend, no clock: each test builds a state, calls the function, and
reads what it returns (the new state, its outbox, what to count, when to wake up).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import msgspec
import pytest

from reactive import ExecutionState, RuleContext, Status, Workflow, rule
from reactive.backends.base import schedule_headers
from reactive.conditions import phase_is
from reactive.dsl.context import new_context
from reactive.dsl.state import Firing
from reactive.runtime.decide import FOREVER, hold_until, overdue, select
from reactive.runtime.failures import task_timed_out
from reactive.runtime.registry import BoundWorkflow, Registry
from reactive.runtime.transition import apply_result, apply_rule, end, utc

NOW = 1_767_225_600.0


class Job(ExecutionState):
    payload: str = ""
    answer: str = ""


class Request(msgspec.Struct):
    payload: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Answer(msgspec.Struct):
    task_id: str
    answer: str


class Jobs(
    Workflow,
    id="jobs",
    state=Job,
    max_iterations=2,
    task_timeout="30s",
    on_complete="jobs.done",
    on_fail="jobs.failed",
):
    @rule(watch_kv=True, when=phase_is("new"), mutate=True)
    def accept(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.phase = "accepted"

    @rule(watch_kv=True, when=phase_is("new"), publish="jobs.seen")
    def announce(self, ctx: RuleContext[Job, None]) -> dict[str, str]:
        return {"id": ctx.execution_id}

    @rule(watch_kv=True, when=phase_is("new"), mutate=True)
    def shadowed(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.phase = "never"

    @rule(watch_kv=True, when=phase_is("accepted"), publish_async="jobs.work")
    def work(self, ctx: RuleContext[Job, None]) -> Request:
        return Request(payload=ctx.state.payload)

    @work.on_result
    def worked(self, ctx: RuleContext[Job, None], result: Answer) -> None:
        if result.answer == "boom":
            raise RuntimeError("handler failed")
        ctx.state.answer = result.answer
        ctx.state.iteration += 1 if result.answer == "again" else 0
        ctx.state.phase = "worked"

    @rule(watch_kv=True, when=phase_is("worked"), complete=True, publish="jobs.finished")
    def finish(self, ctx: RuleContext[Job, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("loop"), mutate=True, cooldown="10s")
    def loop(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.iteration += 1

    @rule(watch_kv=True, when=phase_is("broken"), mutate=True)
    def explode(self, ctx: RuleContext[Job, None]) -> None:
        raise ValueError("no")


class Shared(Workflow, id="shared", state=Job):
    @rule(watch_kv=True, when=phase_is("a"), publish="shared.a")
    def first(self, ctx: RuleContext[Job, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("a"), mutate=True, cooldown="1m", cooldown_scope="workflow")
    def claimed(self, ctx: RuleContext[Job, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("a"), mutate=True)
    def fallback(self, ctx: RuleContext[Job, None]) -> None: ...

    @rule(watch_kv=True, when=phase_is("a"), publish="shared.b")
    def last(self, ctx: RuleContext[Job, None]) -> None: ...


def bound_of(workflow: type[Workflow]) -> BoundWorkflow:
    return Registry().add(workflow)


def job(phase: str, **fields: Any) -> Job:
    st = Job(phase=phase, **fields)
    st.initialize("j1", "jobs", NOW - 60)
    return st


def ctx_for(st: Job, revision: int = 7, now: float = NOW) -> RuleContext[Any, Any]:
    return new_context(st, None, "jobs", "j1", "jobs.j1", "JOBS", revision, "kv", now)


def rules_of(bound: BoundWorkflow) -> list[Any]:
    return list(bound.definition.rules)


class Checks:
    """A condition check that records what it evaluated."""

    def __init__(self) -> None:
        self.evaluated: list[str] = []

    def __call__(self, bound: BoundWorkflow, r: Any, ctx: RuleContext[Any, Any]) -> bool:
        self.evaluated.append(r.id)
        return bool(r.condition(ctx))


# --------------------------------------------------------------------------- deciding


def test_hold_until_says_what_holds_a_rule_back_and_until_when() -> None:
    bound = bound_of(Jobs)
    loop = bound.definition.rules_by_id["loop"]
    assert hold_until(loop, None, "r5", NOW) is None
    assert hold_until(loop, Firing(count=1, last_at=NOW - 60, last_trigger="r5"), "r5", NOW) == (
        FOREVER
    )  # fired for this trigger already
    fired = Firing(count=1, last_at=NOW - 4, last_trigger="r4")
    assert hold_until(loop, fired, "r5", NOW) == NOW + 6  # its cooldown ends then
    assert hold_until(loop, fired, "r5", NOW + 6) is None
    # The float rounding that livelocked: at the wake-up instant it is no longer held.
    tick = Firing(count=1, last_at=1767225600.0, last_trigger="r1")
    r = dataclasses.replace(loop, cooldown=0.1)
    ready = hold_until(r, tick, "r2", 1767225600.0)
    assert ready == 1767225600.0 + 0.1
    assert hold_until(r, tick, "r2", ready) is None


def test_select_picks_the_first_writer_and_every_publisher_each_evaluated_once() -> None:
    bound = bound_of(Jobs)
    st = job("new")
    check = Checks()
    chosen = select(bound, rules_of(bound), ctx_for(st), st, "r7", NOW, check)
    assert chosen.writer is not None and chosen.writer.id == "accept"
    assert [r.id for r in chosen.others] == ["announce"]
    assert chosen.wake_at == FOREVER and not chosen.unclaimed
    # A later writer is not even evaluated (it would fire on the revision 'accept' writes).
    assert "shadowed" not in check.evaluated
    assert len(check.evaluated) == len(set(check.evaluated))


def test_select_skips_a_held_writer_and_says_when_its_cooldown_ends() -> None:
    bound = bound_of(Jobs)
    st = job("loop", firings={"loop": Firing(count=1, last_at=NOW - 3, last_trigger="r6")})
    chosen = select(bound, rules_of(bound), ctx_for(st), st, "r7", NOW, Checks())
    assert chosen.writer is None
    assert chosen.wake_at == NOW + 7


def test_select_stops_at_a_workflow_wide_cooldown_and_goes_on_once_it_is_decided() -> None:
    bound = bound_of(Shared)
    st = job("a")
    check = Checks()
    ctx = ctx_for(st)
    chosen = select(bound, rules_of(bound), ctx, st, "r7", NOW, check)
    assert chosen.unclaimed and chosen.writer is not None and chosen.writer.id == "claimed"
    assert check.evaluated == ["first", "claimed"]
    # Refused: the next writer is looked for, and nothing is evaluated twice.
    chosen.writer = None
    refused = select(bound, rules_of(bound), ctx, st, "r7", NOW, check, chosen)
    assert refused.writer is not None and refused.writer.id == "fallback"
    assert [r.id for r in refused.others] == ["first", "last"]
    assert check.evaluated == ["first", "claimed", "fallback", "last"]


def test_overdue_names_the_passed_deadline_or_the_next_one() -> None:
    d = bound_of(Jobs).definition
    st = job("accepted")
    st.deadline = utc(NOW + 100)
    assert overdue(d, st, NOW) == ("", NOW + 100)
    st.status = Status.WAITING
    st.task_deadline = utc(NOW + 30)
    assert overdue(d, st, NOW) == ("", NOW + 30)
    assert overdue(d, st, NOW + 30) == ("task", FOREVER)
    assert overdue(d, st, NOW + 100) == ("deadline", FOREVER)


# --------------------------------------------------------------------------- transitioning


def test_a_publish_async_rule_parks_the_execution_with_an_unguessable_task() -> None:
    bound = bound_of(Jobs)
    st = job("accepted", payload="p")
    work = bound.definition.rules_by_id["work"]
    applied = apply_rule(bound, work, st, ctx_for(st), 7, "r7", "me", "reactive.callback")
    out = applied.state
    assert applied.ended is None and applied.error is None
    assert out.status is Status.WAITING and out.pending_rule_id == "work"
    assert out.pending_task_id.startswith("j1-work-7-") and len(out.pending_task_id) == 34
    assert out.task_deadline == utc(NOW + 30)
    msg, timer = out.outbox
    request = json.loads(msg.payload())
    assert request == {
        "payload": "p",
        "task_id": out.pending_task_id,
        "callback_subject": "reactive.callback.jobs.j1",
        "execution_id": "j1",
    }
    assert msg.headers["Reactive-Task-Id"] == out.pending_task_id
    assert msg.msg_id == "jobs:j1:7:0:work" and out.outbox_id == "jobs:j1:7"
    assert out.firings["work"].count == 1 and out.firings["work"].last_trigger == "r7"
    assert (out.timeline[-1].rule_id, out.timeline[-1].action) == ("work", "publish_async")
    # The task's timeout is a schedule in the same outbox: published once the state is written.
    assert timer.subject == "reactive.timer.at.jobs.task.JOBS.jobs.j1"
    assert timer.headers == schedule_headers(NOW + 30, "reactive.timer.due.jobs.task.JOBS.jobs.j1")
    assert float(timer.payload()) == NOW + 30
    assert timer.msg_id == f"jobs:j1:7:task@{NOW + 30!r}"


class Timed(Workflow, id="timed", state=Job, timeout="1h"):
    @rule(watch_kv=True, when=phase_is("new"), mutate=True)
    def begin(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.phase = "begun"

    @rule(watch_kv=True, when=phase_is("begun"), mutate=True)
    def extend(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.set_deadline(utc(ctx.now + 7200))
        ctx.state.phase = "extended"

    @rule(watch_kv=True, when=phase_is("extended"), mutate=True, cooldown="10s")
    def tick(self, ctx: RuleContext[Job, None]) -> None:
        ctx.state.iteration += 1

    @rule(on_subject="timed.poke", state_key=lambda m: m["id"], mutate=True, cooldown="10s")
    def poke(self, ctx: RuleContext[Job, dict[str, str]]) -> None:
        ctx.state.iteration += 1


def timers_of(st: Job) -> list[tuple[str, float]]:
    """The timers in a state's outbox: (kind, time)."""
    return [
        (m.subject.split(".")[4], float(m.payload()))
        for m in st.outbox
        if m.subject.startswith("reactive.timer.at.")
    ]


def test_the_transitions_that_decide_a_time_schedule_it_in_their_outbox() -> None:
    bound = bound_of(Timed)
    d = bound.definition
    st = Job(phase="new")
    st.initialize("j1", "timed", NOW, d.timeout)

    def fire(rule_id: str, st: Job, **kw: Any) -> Job:
        r = d.rules_by_id[rule_id]
        return apply_rule(bound, r, st, ctx_for(st), 7, "r7", "me", "cb", **kw).state

    # Starting: the deadline. A later transition that leaves it alone schedules nothing.
    assert timers_of(fire("begin", copy.deepcopy(st), started=True)) == [("deadline", NOW + 3600)]
    begun = fire("begin", copy.deepcopy(st))
    assert timers_of(begun) == [] and begun.outbox_id == ""
    # Moving it schedules the new one (the same subject: it replaces the old).
    assert timers_of(fire("extend", begun)) == [("deadline", NOW + 7200)]
    # A rule evaluated on revisions, with a cooldown of its own: its end, when it fires.
    ticked = fire("tick", Job(phase="extended", id="j1", status=Status.RUNNING))
    assert timers_of(ticked) == [("cool-tick", NOW + 10)]
    assert hold_until(d.rules_by_id["tick"], ticked.firings["tick"], "r8", NOW + 10) is None
    # A rule on messages is not evaluated again when its cooldown ends: no timer.
    assert timers_of(fire("poke", Job(phase="x", id="j1", status=Status.RUNNING))) == []
    # A transition that ends the execution needs none.
    ended = Job(phase="begun", id="j1", status=Status.RUNNING, deadline=utc(NOW + 1))
    ended.fail("over")
    assert timers_of(fire("extend", ended)) == []


def test_a_completing_rule_ends_the_execution_with_its_events_counted_once_committed() -> None:
    bound = bound_of(Jobs)
    st = job("worked")
    finish = bound.definition.rules_by_id["finish"]
    applied = apply_rule(bound, finish, st, ctx_for(st), 9, "r9", "me", "reactive.callback")
    assert applied.state.status is Status.COMPLETED
    assert applied.ended is not None
    assert (applied.ended.status, applied.ended.reason) == (Status.COMPLETED, "rule")
    assert applied.ended.duration == 60
    assert [m.subject for m in applied.state.outbox] == ["jobs.finished", "jobs.done"]
    assert applied.state.completed_at == utc(NOW)


def test_a_rule_that_raises_fails_the_execution_and_is_reported() -> None:
    bound = bound_of(Jobs)
    st = job("broken")
    r = bound.definition.rules_by_id["explode"]
    applied = apply_rule(bound, r, st, ctx_for(st), 3, "r3", "me", "reactive.callback")
    assert isinstance(applied.error, ValueError)
    assert (
        applied.state.status is Status.FAILED and "explode raised ValueError" in applied.state.error
    )
    assert applied.ended is not None and applied.ended.reason == "rule_error"
    assert [m.subject for m in applied.state.outbox] == ["jobs.failed"]


def test_passing_max_iterations_escalates_from_the_state_before_the_rule() -> None:
    bound = bound_of(Jobs)
    st = job("loop", iteration=2)
    r = bound.definition.rules_by_id["loop"]
    applied = apply_rule(bound, r, st, ctx_for(st), 4, "r4", "me", "reactive.callback")
    assert applied.state.status is Status.ESCALATED
    assert applied.state.iteration == 2
    assert applied.action == "escalate"
    assert applied.ended is not None and applied.ended.reason == "max_iterations"


def test_a_result_runs_the_handler_and_clears_the_pending_task() -> None:
    bound = bound_of(Jobs)
    r = bound.definition.rules_by_id["work"]
    st = job("accepted")
    st.set_pending_task("t1", "work")
    base = msgspec.json.encode(st)
    applied = apply_result(
        bound, r, st, base, ctx_for(st), Answer("t1", "42"), "", False, "t1", "me"
    )
    assert applied.state.answer == "42" and applied.state.phase == "worked"
    assert applied.state.status is Status.RUNNING and not applied.state.pending_task_id
    assert applied.ended is None and applied.action == "callback"


@pytest.mark.parametrize(
    ("result", "failure", "invalid", "action", "reason"),
    [
        (None, "worker crashed", False, "callback_error", "callback_error"),
        (None, "its result does not decode: x", True, "invalid_result", "invalid_result"),
        (Answer("t1", "boom"), "", False, "error", "rule_error"),
    ],
)
def test_a_failed_task_or_handler_fails_the_execution_with_the_reason(
    result: Any, failure: str, invalid: bool, action: str, reason: str
) -> None:
    bound = bound_of(Jobs)
    r = bound.definition.rules_by_id["work"]
    st = job("accepted")
    st.set_pending_task("t1", "work")
    base = msgspec.json.encode(st)
    applied = apply_result(bound, r, st, base, ctx_for(st), result, failure, invalid, "t1", "me")
    assert applied.state.status is Status.FAILED
    assert applied.action == action
    assert applied.ended is not None and applied.ended.reason == reason
    assert applied.state.timeline[-1].error == applied.state.error


def test_end_and_task_timeout_write_the_lifecycle_event_and_the_timeline() -> None:
    d = bound_of(Jobs).definition
    st = job("accepted")
    st.set_pending_task("t9", "work")
    ended = task_timed_out(d, st, NOW, "me", [])
    assert st.status is Status.FAILED and "t9 of rule work got no callback within 30s" in st.error
    assert (ended.reason, st.timeline[-1].rule_id) == ("task_timeout", "task_timeout")
    assert [m.subject for m in st.outbox] == ["jobs.failed"]
    st2 = job("x")
    st2.time_out()
    ended2 = end(d, st2, None, NOW, "me", "timeout", mode="timer", rule_id="deadline")
    assert ended2.status is Status.TIMED_OUT and st2.owner == "me"
    assert st2.timeline[-1].trigger_mode == "timer"
