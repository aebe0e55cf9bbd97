"""Property-based tests: the engine's invariants under random events, and a few plain properties.

The stateful machines come from ``reactive.testing.strategies``; each drives a
TestEngine with random messages, callbacks, clock advances, outside state
writes and engine restarts, and checks the invariants documented on
``WorkflowMachine`` after every step and at teardown. Run them longer with, e.g.,
a Hypothesis profile of more ``max_examples``; ``--hypothesis-show-statistics``
shows how the executions ended.
"""

from __future__ import annotations

import dataclasses
import itertools

import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from reactive import (
    ExecutionState,
    RuleContext,
    Status,
    Workflow,
    definition_of,
    rule,
)
from reactive.codecs import decode, encode_json
from reactive.compiled import WorkflowDef
from reactive.conditions import phase_in, phase_is
from reactive.subjects import PatternIndex, matches_pattern
from reactive.testing.strategies import (
    Advance,
    Callback,
    Event,
    Message,
    WorkflowMachine,
    WriteState,
    events,
    messages,
    phases_of,
    states,
    values,
    workflow_machine,
)

MACHINE_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

# ---------------------------------------------------------------------------------------
# plan review: async callbacks, revisions, max iterations, a timeout
# ---------------------------------------------------------------------------------------


class Review(ExecutionState):
    plan: str = ""
    verdict: str = ""


class PlanSubmitted(msgspec.Struct):
    plan_id: str
    plan: str


class ReviewRequest(msgspec.Struct):
    plan: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class ReviewResult(msgspec.Struct):
    task_id: str
    verdict: str


class PlanReview(
    Workflow,
    id="plan-review",
    state=Review,
    bucket="PLAN_REVIEW",
    timeout="10m",
    max_iterations=3,
    on_complete="plans.approved",
    on_fail="plans.failed",
    on_escalate="plans.escalated",
):
    @rule(on_subject="plans.submitted", state_key=lambda m: m.plan_id, mutate=True)
    def accept(self, ctx: RuleContext[Review, PlanSubmitted]) -> None:
        ctx.state.plan = ctx.message.plan
        ctx.state.phase = "submitted"

    @rule(watch_kv=True, when=phase_is("submitted"), publish_async="reviewer.input")
    def request_review(self, ctx: RuleContext[Review, None]) -> ReviewRequest:
        return ReviewRequest(plan=ctx.state.plan)

    @request_review.on_result
    def reviewed(self, ctx: RuleContext[Review, None], result: ReviewResult) -> None:
        ctx.state.verdict = result.verdict
        ctx.state.phase = "approved" if result.verdict == "approved" else "revise"

    @rule(watch_kv=True, when=phase_is("revise"), mutate=True)
    def revise(self, ctx: RuleContext[Review, None]) -> None:
        ctx.state.iteration += 1
        ctx.state.phase = "submitted"

    @rule(watch_kv=True, when=phase_is("approved"), complete=True)
    def done(self, ctx: RuleContext[Review, None]) -> None: ...


# Verdicts drawn from a small set so that approvals happen, not only arbitrary text.
_VERDICTS = st.sampled_from(["approved", "revise", "rejected"])

TestPlanReviewMachine = workflow_machine(
    PlanReview,
    execution_ids=("p1", "p2"),
    settings=MACHINE_SETTINGS,
    bad_input=True,
).TestCase


# The same workflow on two engine processes sharing one backend, answered with verdicts from a
# small set (the callback's task id is set on delivery).
PlanReviewVerdicts = workflow_machine(
    PlanReview,
    execution_ids=("p1", "p2"),
    engines=2,
    result_strategies={
        "request_review": st.builds(ReviewResult, task_id=st.just(""), verdict=_VERDICTS)
    },
    name="PlanReviewVerdicts",
)
TestPlanReviewVerdicts = PlanReviewVerdicts.TestCase
TestPlanReviewVerdicts.settings = MACHINE_SETTINGS

# ---------------------------------------------------------------------------------------
# cooldowns and max firings
# ---------------------------------------------------------------------------------------


class Counter(ExecutionState):
    hits: int = 0
    bumps: int = 0


class Hit(msgspec.Struct):
    counter_id: str
    note: str = ""


class Ping(msgspec.Struct):
    counter_id: str
    at: float


HIT_MAX, HIT_COOLDOWN = 5, 30.0
BUMP_MAX, BUMP_COOLDOWN = 4, 10.0
PING_MAX, PING_COOLDOWN = 3, 60.0


class Throttled(Workflow, id="throttled", state=Counter, on_complete="throttled.done"):
    """Every rule is limited: a message-driven writer, a KV writer and a KV publisher."""

    @rule(
        on_subject="hits",
        state_key=lambda m: m.counter_id,
        mutate=True,
        cooldown=HIT_COOLDOWN,
        max_firings=HIT_MAX,
    )
    def hit(self, ctx: RuleContext[Counter, Hit]) -> None:
        ctx.state.hits += 1
        ctx.state.phase = "hit"

    @rule(
        watch_kv=True,
        when=phase_is("hit"),
        mutate=True,
        cooldown=BUMP_COOLDOWN,
        max_firings=BUMP_MAX,
    )
    def bump(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.bumps += 1
        ctx.state.phase = "bumped"

    @rule(
        watch_kv=True,
        when=phase_in("hit", "bumped"),
        publish="throttled.ping",
        cooldown=PING_COOLDOWN,
        max_firings=PING_MAX,
    )
    def ping(self, ctx: RuleContext[Counter, None]) -> Ping:
        return Ping(counter_id=ctx.execution_id, at=ctx.now)

    @rule(on_subject="hits", publish="hits.seen")
    def seen(self, ctx: RuleContext[None, Hit]) -> Hit:
        return ctx.message

    @rule(watch_kv=True, when=lambda ctx: ctx.state.bumps >= 3, complete=True)
    def enough(self, ctx: RuleContext[Counter, None]) -> None: ...


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


class ThrottledMachine(WorkflowMachine):
    """Firing counts never exceed max_firings; no two firings are closer than the cooldown."""

    workflows = (Throttled,)
    execution_ids = ("c1", "c2")

    def check_execution(self, definition: WorkflowDef, key: str, state: ExecutionState) -> None:
        assert isinstance(state, Counter)
        for rule_id, limit, cooldown in (
            ("hit", HIT_MAX, HIT_COOLDOWN),
            ("bump", BUMP_MAX, BUMP_COOLDOWN),
        ):
            times = [e.timestamp.timestamp() for e in state.timeline if e.rule_id == rule_id]
            firing = state.firings.get(rule_id)
            count = firing.count if firing else 0
            assert len(times) <= count <= limit, (
                f"{key}: {rule_id} fired {count} times (timeline {len(times)}), max {limit}"
            )
            assert all(g >= cooldown for g in _gaps(times)), (
                f"{key}: {rule_id} fired closer than {cooldown}s: {times}"
            )
        pings = [
            p.at for p in self.te.published("throttled.ping", Ping) if p.counter_id == state.id
        ]
        assert len(pings) <= PING_MAX, f"{key}: {len(pings)} pings, max {PING_MAX}"
        assert all(g >= PING_COOLDOWN for g in _gaps(pings)), (
            f"{key}: pings closer than {PING_COOLDOWN}s: {pings}"
        )


TestThrottledMachine = ThrottledMachine.TestCase
TestThrottledMachine.settings = MACHINE_SETTINGS

SHARED_COOLDOWN = 20.0


class SharedThrottle(Workflow, id="shared-throttle", state=Counter):
    """Cooldowns for the whole workflow: a message writer, a KV writer and a KV publisher."""

    @rule(
        on_subject="shared.hits",
        state_key=lambda m: m.counter_id,
        mutate=True,
        cooldown=SHARED_COOLDOWN,
        cooldown_scope="workflow",
    )
    def hit(self, ctx: RuleContext[Counter, Hit]) -> None:
        ctx.state.hits += 1
        ctx.state.phase = "hit"

    @rule(
        watch_kv=True,
        when=phase_is("hit"),
        mutate=True,
        cooldown=SHARED_COOLDOWN,
        cooldown_scope="workflow",
    )
    def bump(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.bumps += 1
        ctx.state.phase = "bumped"

    @rule(
        watch_kv=True,
        when=phase_in("hit", "bumped"),
        publish="shared.ping",
        cooldown=SHARED_COOLDOWN,
        cooldown_scope="workflow",
    )
    def ping(self, ctx: RuleContext[Counter, None]) -> Ping:
        return Ping(counter_id=ctx.execution_id, at=ctx.now)


class SharedThrottleMachine(WorkflowMachine):
    """On two engines, each rule fires at most once per cooldown across all executions."""

    workflows = (SharedThrottle,)
    execution_ids = ("c1", "c2", "c3")
    engines = 2

    def check_execution(self, definition: WorkflowDef, key: str, state: ExecutionState) -> None:
        states = self.te.executions(SharedThrottle)
        for rule_id in ("hit", "bump"):
            times = sorted(
                e.timestamp.timestamp()
                for st in states
                for e in st.timeline
                if e.rule_id == rule_id
            )
            assert all(b >= a + SHARED_COOLDOWN for a, b in itertools.pairwise(times)), (
                f"{rule_id} fired closer than {SHARED_COOLDOWN}s across executions: {times}"
            )
        pings = sorted(p.at for p in self.te.published("shared.ping", Ping))
        assert all(b >= a + SHARED_COOLDOWN for a, b in itertools.pairwise(pings)), (
            f"pings closer than {SHARED_COOLDOWN}s across executions: {pings}"
        )


TestSharedThrottleMachine = SharedThrottleMachine.TestCase
TestSharedThrottleMachine.settings = MACHINE_SETTINGS

# ---------------------------------------------------------------------------------------
# a timeout and a task timeout that escalates
# ---------------------------------------------------------------------------------------


class Job(ExecutionState):
    attempts: int = 0


class JobQueued(msgspec.Struct):
    job_id: str


class RunJob(msgspec.Struct):
    attempt: int
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class JobDone(msgspec.Struct):
    task_id: str
    ok: bool


class TimedJob(
    Workflow,
    id="timed-job",
    state=Job,
    timeout="2m",
    task_timeout="90s",
    on_task_timeout="escalate",
    max_iterations=2,
    on_complete="jobs.done",
    on_fail="jobs.failed",
    on_escalate="jobs.escalated",
):
    @rule(
        on_subject="jobs.queued",
        stream="JOBS",
        state_key=lambda m: m.job_id,
        when=phase_is(""),
        mutate=True,
    )
    def queue(self, ctx: RuleContext[Job, JobQueued]) -> None:
        ctx.state.phase = "queued"

    @rule(watch_kv=True, when=phase_in("queued", "retry"), publish_async="jobs.run")
    def run(self, ctx: RuleContext[Job, None]) -> RunJob:
        return RunJob(attempt=ctx.state.attempts)

    @run.on_result
    def ran(self, ctx: RuleContext[Job, None], result: JobDone) -> None:
        ctx.state.attempts += 1
        if result.ok:
            ctx.state.phase = "ok"
        else:
            ctx.state.iteration += 1
            ctx.state.phase = "retry"

    @rule(watch_kv=True, when=phase_is("ok"), complete=True)
    def finish(self, ctx: RuleContext[Job, None]) -> None: ...


TestTimedJobMachine = workflow_machine(
    TimedJob, execution_ids=("j1", "j2", "j3"), settings=MACHINE_SETTINGS
).TestCase

# ---------------------------------------------------------------------------------------
# the invariants can fail
# ---------------------------------------------------------------------------------------


class Sloppy(Workflow, id="sloppy", state=Review):
    """Parks itself by hand: a pending task id without the waiting status."""

    @rule(on_subject="sloppy.in", state_key=lambda m: m.plan_id, mutate=True)
    def take(self, ctx: RuleContext[Review, PlanSubmitted]) -> None:
        ctx.state.pending_task_id = "by-hand"


def test_machine_catches_a_broken_workflow() -> None:
    machine = workflow_machine(Sloppy, include_writes=False)
    quick = settings(
        max_examples=30,
        stateful_step_count=10,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    with pytest.raises(AssertionError, match="pending task id"):
        run_state_machine_as_test(machine, settings=quick)


class Vandal(WorkflowMachine):
    """Plan review with an outside writer that also overwrites terminal executions."""

    workflows = (PlanReview,)
    execution_ids = ("p1",)

    @classmethod
    def event_strategy(cls) -> st.SearchStrategy[Event]:
        return (
            super()
            .event_strategy()
            .map(
                lambda e: (
                    dataclasses.replace(e, overwrite_terminal=True)
                    if isinstance(e, WriteState)
                    else e
                )
            )
        )


def test_machine_catches_a_changed_terminal_state() -> None:
    quick = settings(
        max_examples=100,
        stateful_step_count=20,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    with pytest.raises(AssertionError, match=r"terminal state changed|after it became terminal"):
        run_state_machine_as_test(Vandal, settings=quick)


# ---------------------------------------------------------------------------------------
# plain properties
# ---------------------------------------------------------------------------------------

_TOKENS = st.sampled_from(["a", "b", "c", "orders", "x-1"])
_KEYS = st.lists(_TOKENS, min_size=1, max_size=5).map(".".join)
_PATTERNS = st.lists(st.one_of(_TOKENS, st.just("*")), min_size=1, max_size=5).flatmap(
    lambda toks: st.sampled_from(
        [".".join(toks), ".".join([*toks, ">"]), ".".join([*toks[:-1], ">"]) or ">"]
    )
)


@settings(max_examples=200, deadline=None)
@given(patterns=st.lists(_PATTERNS, max_size=8), keys=st.lists(_KEYS, min_size=1, max_size=5))
def test_pattern_index_agrees_with_matches_pattern(patterns: list[str], keys: list[str]) -> None:
    index: PatternIndex[int] = PatternIndex()
    for i, p in enumerate(patterns):
        index.add(p, i)
    assert len(index) == len(patterns)
    for key in keys:
        expected = sorted(i for i, p in enumerate(patterns) if matches_pattern(key, p))
        assert sorted(index.match(key)) == expected, (key, patterns)


@settings(max_examples=50, deadline=None)
@given(state=states(Review, phases=phases_of(PlanReview)))
def test_state_round_trip(state: Review) -> None:
    data = encode_json(state)
    again = decode(Review, data)
    assert again == state
    assert encode_json(again) == data


@settings(max_examples=50, deadline=None)
@given(state=states(Counter))
def test_drawn_states_are_consistent(state: Counter) -> None:
    assert state.iteration >= 0
    assert (
        (state.status is Status.WAITING)
        == bool(state.pending_task_id)
        == bool(state.pending_rule_id)
    )
    assert (state.completed_at is not None) == state.is_terminal
    assert msgspec.json.decode(encode_json(state), type=Counter) == state


@settings(max_examples=50, deadline=None)
@given(
    msg=messages(PlanSubmitted, plan_id=st.sampled_from(["p1", "p2"])), result=values(ReviewResult)
)
def test_message_round_trip(msg: PlanSubmitted, result: ReviewResult) -> None:
    assert msg.plan_id in ("p1", "p2")
    assert decode(PlanSubmitted, encode_json(msg)) == msg
    assert decode(ReviewResult, encode_json(result)) == result


@settings(max_examples=50, deadline=None)
@given(event=events(PlanReview, execution_ids=("p1", "p2")))
def test_events_target_the_pool(event: object) -> None:
    if isinstance(event, Message) and event.subject == "plans.submitted":
        assert event.payload.plan_id in ("p1", "p2")
    elif isinstance(event, Callback | WriteState):
        assert event.execution_id in ("p1", "p2")
    elif isinstance(event, Advance):
        assert event.seconds >= 0
    d = definition_of(PlanReview)
    assert d.id == "plan-review"
