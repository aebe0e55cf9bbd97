"""DESIGN §2 guarantees and §3 bad input, on the in-memory backend with a manual clock.

Engines are killed, restarted and doubled here the way processes would be: a killed
engine has every task cancelled at a chosen point (between a state write and its
publish, say), and a new ``Engine`` on the same backend and clock takes over.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, NoReturn

import anyio
import anyio.lowlevel
import msgspec
import pytest

from reactive import (
    ConflictError,
    Engine,
    ExecutionState,
    MemoryBackend,
    RuleContext,
    Status,
    TimedOutError,
    TransientBackendError,
    Workflow,
    WorkflowCompletionEvent,
    WorkflowEscalationEvent,
    WorkflowFailureEvent,
    definition_of,
    rule,
)
from reactive.backends.base import InboundMessage
from reactive.backends.partitions import partition_of, partitioned_stream
from reactive.clock import ManualClock
from reactive.conditions import phase_is
from reactive.runtime.metrics import EngineMetrics
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio

CALLBACKS = "REACTIVE_CALLBACKS"


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def count(counter: Any, *labels: str) -> float:
    return float(counter.labels(*labels)._value.get())


# --------------------------------------------------------------------------- a backend with faults


Hook = Callable[[str], Awaitable[None] | None]


async def _call(hook: Hook | None, arg: str) -> None:
    if hook is not None:
        result = hook(arg)
        if inspect.isawaitable(result):
            await result


class _Recorded:
    """A consumer message whose acknowledgement is recorded, with what the test wants to see then."""

    def __init__(self, inner: InboundMessage, backend: FaultyBackend) -> None:
        self._inner = inner
        self._backend = backend

    subject = property(lambda self: self._inner.subject)
    data = property(lambda self: self._inner.data)
    headers = property(lambda self: self._inner.headers)
    num_delivered = property(lambda self: self._inner.num_delivered)
    stream = property(lambda self: self._inner.stream)
    sequence = property(lambda self: self._inner.sequence)

    def _record(self, how: str) -> None:
        seen = self._backend.on_settle(self) if self._backend.on_settle else None
        self._backend.settled.append((how, self.subject, self.num_delivered, seen))

    async def ack(self) -> None:
        self._record("ack")
        await self._inner.ack()

    async def nak(self, delay: float) -> None:
        self._record("nak")
        await self._inner.nak(delay)

    async def term(self) -> None:
        self._record("term")
        await self._inner.term()

    async def in_progress(self) -> None:
        await self._inner.in_progress()


class FaultyBackend(MemoryBackend):
    """MemoryBackend with hooks around publishes and state writes, failures on demand,
    and a record of every acknowledgement of a durable consumer's message."""

    def __init__(self, clock: ManualClock, state_buckets: tuple[str, ...] = ()) -> None:
        super().__init__(clock=clock)
        self.state_buckets = set(state_buckets)
        self.before_publish: dict[str, Hook] = {}
        self.after_publish: dict[str, Hook] = {}
        self.after_write: Hook | None = None
        self.failing_writes = 0  # the next N writes to a state bucket raise TransientBackendError
        self.failure: type[TransientBackendError] = TransientBackendError  # (or a subclass)
        self.failed_writes = 0
        self.on_settle: Callable[[_Recorded], Any] | None = None
        self.settled: list[tuple[str, str, int, Any]] = []

    async def publish(
        self,
        subject: str,
        data: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
    ) -> None:
        await _call(self.before_publish.get(subject), subject)
        await super().publish(subject, data, headers=headers, msg_id=msg_id)
        await _call(self.after_publish.get(subject), subject)

    async def _fault(self, bucket: str) -> None:
        if bucket in self.state_buckets and self.failing_writes > 0:
            self.failing_writes -= 1
            self.failed_writes += 1
            raise self.failure(f"injected failure writing to {bucket}")

    async def kv_create(
        self, bucket: str, key: str, value: bytes, *, ttl: float | None = None
    ) -> int:
        await self._fault(bucket)
        rev = await super().kv_create(bucket, key, value, ttl=ttl)
        if bucket in self.state_buckets:
            await _call(self.after_write, key)
        return rev

    async def kv_update(
        self, bucket: str, key: str, value: bytes, revision: int, *, ttl: float | None = None
    ) -> int:
        await self._fault(bucket)
        rev = await super().kv_update(bucket, key, value, revision, ttl=ttl)
        if bucket in self.state_buckets:
            await _call(self.after_write, key)
        return rev

    @asynccontextmanager
    async def consume(
        self, stream: str, durable: str, filter_subject: str, **kwargs: Any
    ) -> AsyncIterator[AsyncIterator[InboundMessage]]:
        async with super().consume(stream, durable, filter_subject, **kwargs) as reader:

            async def recorded() -> AsyncIterator[InboundMessage]:
                async for msg in reader:
                    yield _Recorded(msg, self)  # type: ignore[misc]

            yield recorded()


def record_failures(backend: FaultyBackend, clock: ManualClock) -> list[float]:
    """The moments (on ``clock``) of the backend's injected write failures, from now on."""
    failed_at: list[float] = []
    fault = backend._fault

    async def recording(bucket: str) -> None:
        before = backend.failed_writes
        try:
            await fault(bucket)
        finally:
            if backend.failed_writes > before:
                failed_at.append(clock.now())

    backend._fault = recording  # type: ignore[method-assign]
    return failed_at


async def kill(engine: Engine) -> NoReturn:
    """The process dies here: every task of the engine, the calling one included, is cancelled."""
    assert engine._tg is not None
    engine._tg.cancel_scope.cancel()
    await anyio.lowlevel.checkpoint()
    raise AssertionError("a killed engine kept running")


async def settle(backend: MemoryBackend, *engines: Engine, timeout: float = 10.0) -> None:
    """Wait until the backend and every engine have nothing left to do right now."""
    with anyio.fail_after(timeout):
        quiet = 0
        while quiet < 8:
            await anyio.sleep(0)
            if backend.idle() and all(e.idle and e.ready for e in engines):
                quiet += 1
            else:
                quiet = 0


async def advance(
    clock: ManualClock, backend: MemoryBackend, engines: list[Engine], seconds: float
) -> None:
    """Move the clock, stopping at each timer due in between (the backend's schedules and
    each engine's own), and settle."""
    target = clock.now() + seconds

    def next_due() -> float:
        dues = [e.timers.next_due() for e in engines] + [backend.next_schedule()]
        return min((d for d in dues if d is not None), default=target)

    while True:
        due = next_due()
        if due >= target:
            break
        if due > clock.now():
            clock.advance(due - clock.now())
        await settle(backend, *engines)
        if next_due() <= clock.now():
            break
    clock.advance(max(target - clock.now(), 0.0))
    await settle(backend, *engines)


class Group:
    """Several TestEngines (processes) on one backend and clock, settled and moved together."""

    def __init__(self, *engines: TestEngine) -> None:
        self.tes = engines
        self.backend = engines[0].backend
        self.clock = engines[0].clock

    async def settle(self) -> None:
        await settle(self.backend, *(te.engine for te in self.tes))
        for te in self.tes:
            await te.settle()
        await settle(self.backend, *(te.engine for te in self.tes))

    async def advance(self, seconds: float) -> None:
        await advance(self.clock, self.backend, [te.engine for te in self.tes], seconds)
        await self.settle()


# --------------------------------------------------------------------------- workflows


class Review(ExecutionState):
    plan: str = ""
    verdict: str = ""
    notes: list[str] = []


class Submitted(msgspec.Struct):
    plan_id: str
    plan: str = ""


class ReviewRequest(msgspec.Struct):
    plan: str
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class ReviewResult(msgspec.Struct):
    verdict: str
    task_id: str = ""


class Reviews(
    Workflow,
    id="reviews",
    state=Review,
    task_timeout="1m",
    on_complete="reviews.completed",
    on_fail="reviews.failed",
    on_escalate="reviews.escalated",
):
    @rule(on_subject="plans.submitted", stream="PLANS", state_key=lambda m: m.plan_id, mutate=True)
    def accept(self, ctx: RuleContext[Review, Submitted]) -> None:
        ctx.state.plan = ctx.message.plan
        ctx.state.phase = "submitted"
        ctx.state.notes.append("accepted")

    @rule(watch_kv=True, when=phase_is("submitted"), publish_async="reviewer.input")
    def ask(self, ctx: RuleContext[Review, None]) -> ReviewRequest:
        return ReviewRequest(plan=ctx.state.plan)

    @ask.on_result
    def reviewed(self, ctx: RuleContext[Review, None], result: ReviewResult) -> None:
        ctx.state.verdict = result.verdict
        ctx.state.notes.append(f"verdict {result.verdict}")
        ctx.state.phase = "approved" if result.verdict == "approved" else "rejected"

    @rule(watch_kv=True, when=phase_is("approved"), complete=True)
    def done(self, ctx: RuleContext[Review, None]) -> None:
        ctx.state.phase = "done"


class EscalatingReviews(Reviews, id="escalating-reviews", on_task_timeout="escalate"):
    """The same rules; a task that gets no callback escalates instead of failing."""


def callback_subject(workflow: Any, execution_id: str) -> str:
    return f"reactive.callback.{definition_of(workflow).id}.{execution_id}"


# --------------------------------------------------------------------------- 1. async callbacks


async def test_async_request_carries_callback_fields_and_execution_is_parked_before_publish() -> (
    None
):
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend) as te:
        at_publish: list[Any] = []
        at_worker: list[tuple[dict[str, Any], Any]] = []
        backend.before_publish["reviewer.input"] = lambda _: at_publish.append(
            te.state(Reviews, "p1")
        )

        def worker(request: dict[str, Any]) -> None:
            at_worker.append((request, te.state(Reviews, "p1")))  # and never answers

        te.respond("reviewer.input", worker)
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1", plan="the plan"))

        [(request, seen)] = at_worker
        assert request["plan"] == "the plan"
        assert request["execution_id"] == "p1"
        assert request["callback_subject"] == callback_subject(Reviews, "p1")
        assert request["task_id"]
        for st in (at_publish[0], seen):
            assert st.status is Status.WAITING
            assert st.pending_task_id == request["task_id"]
            assert st.pending_rule_id == "ask"
        [raw] = te.published_messages("reviewer.input")
        assert raw.headers["Reactive-Task-Id"] == request["task_id"]
        assert raw.headers["Reactive-Callback-Subject"] == request["callback_subject"]


async def test_callback_runs_the_result_handler_and_clears_the_pending_task(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Reviews, metrics=metrics) as te:
        te.respond("reviewer.input", lambda req: ReviewResult(verdict="approved"))
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1", plan="x"))
        st = te.state(Reviews, "p1")
        assert (st.status, st.phase, st.verdict) == (Status.COMPLETED, "done", "approved")
        assert (st.pending_task_id, st.pending_rule_id, st.task_deadline) == ("", "", None)
        assert st.notes == ["accepted", "verdict approved"]
        assert [(e.rule_id, e.trigger_mode) for e in st.timeline] == [
            ("accept", "message+state"),
            ("ask", "kv"),
            ("ask", "callback"),
            ("done", "kv"),
        ]
        assert count(metrics.callbacks_received, "reviews", "ask", "ok") == 1
        te.assert_published("reviews.completed", count=1)


async def test_stale_and_duplicate_callbacks_are_acked_and_ignored(metrics: EngineMetrics) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        task_id = te.state(Reviews, "p1").pending_task_id
        waiting_rev = backend.peek("REVIEWS", "reviews.p1").revision

        await te.callback(Reviews, "p1", {"verdict": "approved"}, task_id="p1-ask-0")  # stale
        assert backend.peek("REVIEWS", "reviews.p1").revision == waiting_rev
        assert te.state(Reviews, "p1").status is Status.WAITING

        await te.callback(Reviews, "p1", {"verdict": "rejected"})  # the real one
        done_rev = backend.peek("REVIEWS", "reviews.p1").revision
        assert te.state(Reviews, "p1").phase == "rejected"

        await te.callback(Reviews, "p1", {"verdict": "approved"}, task_id=task_id)  # duplicate
        st = te.state(Reviews, "p1")
        assert backend.peek("REVIEWS", "reviews.p1").revision == done_rev
        assert (st.phase, st.status, st.notes) == (
            "rejected",
            Status.RUNNING,
            ["accepted", "verdict rejected"],
        )

        await te.advance(120)  # past ack_wait: nothing is redelivered
        callbacks = [
            (how, n)
            for how, subject, n, _ in backend.settled
            if subject.startswith("reactive.callback.")
        ]
        assert callbacks == [("ack", 1), ("ack", 1), ("ack", 1)]
        stale = sum(
            s.value
            for m in metrics.callbacks_received.collect()
            for s in m.samples
            if s.name.endswith("_total") and s.labels["status"] == "stale"
        )
        assert stale == 2
        assert count(metrics.callbacks_received, "reviews", "ask", "ok") == 1


async def test_task_ids_cannot_be_guessed_and_a_forged_one_is_ignored_as_stale(
    metrics: EngineMetrics,
) -> None:
    # The same execution, rule and revision twice (two fresh backends): two task ids.
    task_ids, revisions = [], []
    for _ in range(2):
        async with TestEngine(Reviews) as te:
            await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
            task_ids.append(te.state(Reviews, "p1").pending_task_id)
            revisions.append(te.backend.peek("REVIEWS", "reviews.p1").revision)
    assert revisions[0] == revisions[1]
    assert task_ids[0] != task_ids[1], task_ids
    # What can be known about it (execution, rule, revision) is not enough to answer it.
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        waiting_rev = backend.peek("REVIEWS", "reviews.p1").revision
        fired_on = waiting_rev - 1  # the revision the request was decided on
        for forged in (f"p1-ask-{fired_on}", f"p1-ask-{waiting_rev}"):
            await te.callback(Reviews, "p1", {"verdict": "approved"}, task_id=forged)
        st = te.state(Reviews, "p1")
        assert (st.status, st.verdict) == (Status.WAITING, "")
        assert backend.peek("REVIEWS", "reviews.p1").revision == waiting_rev
        assert count(metrics.callbacks_received, "reviews", "ask", "stale") == 2
        await te.callback(Reviews, "p1", {"verdict": "approved"})  # the real one
        te.assert_status(Reviews, "p1", Status.COMPLETED)


async def test_callback_for_an_unknown_or_invalid_execution_is_settled_and_creates_nothing(
    metrics: EngineMetrics,
) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        await te.callback(Reviews, "nobody", {"verdict": "approved"}, task_id="t")
        await backend.publish("reactive.callback.reviews.a.b", b'{"task_id": "t", "verdict": "x"}')
        await te.settle()
        await te.advance(31)
        assert te.executions(Reviews) == []
        assert [how for how, s, _, _ in backend.settled] == ["ack", "term"]
        assert count(metrics.invalid_ids, "reviews") == 1


async def test_callback_with_error_fails_the_execution_with_an_on_fail_event() -> None:
    async with TestEngine(Reviews) as te:
        te.respond("reviewer.input", lambda req: {"error": "reviewer crashed"})
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        st = te.state(Reviews, "p1")
        assert st.status is Status.FAILED
        assert "reviewer crashed" in st.error
        [event] = te.published("reviews.failed", WorkflowFailureEvent)
        assert (event.execution_id, event.workflow_id, event.phase) == (
            "p1",
            "reviews",
            "submitted",
        )
        assert "reviewer crashed" in event.error


async def test_task_timeout_fails_the_execution(metrics: EngineMetrics) -> None:
    async with TestEngine(Reviews, metrics=metrics) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        start = te.clock.now()
        await te.advance(59)
        te.assert_status(Reviews, "p1", Status.WAITING)
        await te.advance(1)
        st = te.state(Reviews, "p1")
        assert st.status is Status.FAILED
        assert "no callback" in st.error
        [event] = te.published("reviews.failed", WorkflowFailureEvent)
        assert event.failed_at == utc(start + 60)
        te.assert_not_published("reviews.escalated")
        assert count(metrics.callbacks_received, "reviews", "ask", "timeout") == 1


async def test_task_timeout_escalates_when_the_workflow_says_so() -> None:
    async with TestEngine(EscalatingReviews) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        await te.advance(61)
        st = te.state(EscalatingReviews, "p1")
        assert st.status is Status.ESCALATED
        [event] = te.published("reviews.escalated", WorkflowEscalationEvent)
        assert (event.execution_id, event.workflow_id) == ("p1", "escalating-reviews")
        assert "no callback" in event.reason
        te.assert_not_published("reviews.failed")


async def test_late_callback_after_task_timeout_is_ignored() -> None:
    async with TestEngine(Reviews) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        task_id = te.state(Reviews, "p1").pending_task_id
        await te.advance(61)
        await te.callback(Reviews, "p1", {"verdict": "approved"}, task_id=task_id)
        st = te.state(Reviews, "p1")
        assert (st.status, st.verdict) == (Status.FAILED, "")
        te.assert_published("reviews.failed", count=1)
        te.assert_not_published("reviews.completed")


async def test_undecodable_callback_is_terminated_and_the_execution_keeps_waiting(
    metrics: EngineMetrics,
) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        task_id = te.state(Reviews, "p1").pending_task_id
        rev = backend.peek("REVIEWS", "reviews.p1").revision
        subject = callback_subject(Reviews, "p1")
        # Not JSON, and a task id that is not a string: no task can be told from them.
        await backend.publish(subject, b"{not json")
        await backend.publish(subject, msgspec.json.encode({"task_id": 7, "verdict": "approved"}))
        await te.settle()
        await te.advance(
            31
        )  # past the consumer's ack_wait: a terminated message does not come back
        st = te.state(Reviews, "p1")
        assert (st.status, st.pending_task_id) == (Status.WAITING, task_id)
        assert backend.peek("REVIEWS", "reviews.p1").revision == rev
        assert count(metrics.poison_messages, "reviews", "callback") == 2
        assert [(how, n) for how, s, n, _ in backend.settled if s == subject] == [
            ("term", 1),
            ("term", 1),
        ]
        # The execution still takes its real result.
        await te.callback(Reviews, "p1", {"verdict": "approved"})
        te.assert_status(Reviews, "p1", Status.COMPLETED)


async def test_a_result_of_the_wrong_shape_fails_the_task_at_once(metrics: EngineMetrics) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        task_id = te.state(Reviews, "p1").pending_task_id
        subject = callback_subject(Reviews, "p1")
        await backend.publish(subject, msgspec.json.encode({"task_id": task_id, "verdict": 42}))
        await te.settle()
        # Failed now, not at the task timeout, with the decode error as the reason.
        st = te.state(Reviews, "p1")
        assert st.status is Status.FAILED
        assert st.pending_task_id == ""
        assert f"task {task_id} of rule ask" in st.error
        assert "Expected `str`, got `int` - at `$.verdict`" in st.error, st.error
        last = st.timeline[-1]
        assert (last.rule_id, last.trigger_mode, last.action) == (
            "ask",
            "callback",
            "invalid_result",
        )
        assert last.error == st.error
        (event,) = te.assert_published("reviews.failed", count=1)
        assert event["error"] == st.error
        assert count(metrics.callbacks_received, "reviews", "ask", "invalid") == 1
        assert count(metrics.poison_messages, "reviews", "callback") == 1
        assert count(metrics.executions_failed, "reviews", "invalid_result") == 1
        # The callback is settled for good: terminated, never redelivered.
        await te.advance(31)
        assert [(how, n) for how, s, n, _ in backend.settled if s == subject] == [("term", 1)]
        # The right result, late, changes nothing.
        await te.callback(Reviews, "p1", {"verdict": "approved"}, task_id=task_id)
        te.assert_status(Reviews, "p1", Status.FAILED)
        te.assert_published("reviews.failed", count=1)


# --------------------------------------------------------------------------- 2. cooldown and max firings


class Counter(ExecutionState):
    ticks: int = 0


class Ticker(Workflow, id="ticker", state=Counter):
    @rule(watch_kv=True, when=phase_is("go"), mutate=True, cooldown="10s")
    def tick(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.ticks += 1


class Capped(Workflow, id="capped", state=Counter):
    @rule(watch_kv=True, when=phase_is("go"), mutate=True, max_firings=3)
    def bump(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.ticks += 1


class Pinger(Workflow, id="pinger"):
    @rule(watch_kv=True, publish="pinger.cool", cooldown="10s")
    def cool(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, int]:
        return {"rev": ctx.revision}

    @rule(watch_kv=True, publish="pinger.capped", max_firings=2)
    def capped(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, int]:
        return {"rev": ctx.revision}


def running(execution_id: str, workflow_id: str, phase: str = "") -> ExecutionState:
    return ExecutionState(
        id=execution_id, workflow_id=workflow_id, status=Status.RUNNING, phase=phase
    )


async def test_cooldown_holds_a_state_writing_rule_and_its_end_fires_it_again() -> None:
    async with TestEngine(Ticker) as te:
        await te.start(Ticker, "t1", Counter(phase="go"))
        assert te.state(Ticker, "t1").ticks == 1
        await te.advance(9.9)
        assert te.state(Ticker, "t1").ticks == 1
        await te.advance(0.1)  # the cooldown ends; the condition still holds
        assert te.state(Ticker, "t1").ticks == 2
        await te.advance(25)
        assert te.state(Ticker, "t1").ticks == 4
        st = te.state(Ticker, "t1")
        assert [e.timestamp for e in st.timeline] == [
            utc(st.created_at.timestamp() + 10 * i) for i in range(4)
        ]


class Brief(Workflow, id="brief", state=Counter):
    @rule(watch_kv=True, when=phase_is("go"), mutate=True, cooldown=0.1)
    def tick(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.ticks += 1

    @rule(watch_kv=True, when=phase_is("go"), publish="brief.ping", cooldown=0.1)
    def ping(self, ctx: RuleContext[Counter, None]) -> dict[str, int]:
        return {"rev": ctx.revision}


async def test_a_cooldown_whose_end_rounds_below_it_ends_at_its_timer() -> None:
    # 1767225600.0 + 0.1 - 1767225600.0 < 0.1 in floats: the end the timer is set for
    # must be the end the rule is held until, or the rule is held at its own wake-up
    # and the timer re-armed for that same instant forever.
    clock = ManualClock(1_767_225_600.0)
    async with TestEngine(Brief, clock=clock, settle_timeout=2.0) as te:
        await te.start(Brief, "b1", Counter(phase="go"))
        assert te.state(Brief, "b1").ticks == 1
        assert len(te.published("brief.ping")) == 1
        with anyio.fail_after(5):
            await te.advance(0.1)
        assert te.state(Brief, "b1").ticks == 2
        assert len(te.published("brief.ping")) == 2


async def test_cooldown_of_a_state_writing_rule_survives_a_restart() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with TestEngine(Ticker, clock=clock, backend=backend) as te:
        await te.start(Ticker, "t1", Counter(phase="go"))
    clock.advance(5)
    async with TestEngine(Ticker, clock=clock, backend=backend) as te:
        assert te.state(Ticker, "t1").ticks == 1  # the replay did not fire it inside the cooldown
        await te.advance(4.9)
        assert te.state(Ticker, "t1").ticks == 1
        await te.advance(0.1)
        assert te.state(Ticker, "t1").ticks == 2


async def test_max_firings_caps_a_state_writing_rule_across_restarts() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with TestEngine(Capped, clock=clock, backend=backend) as te:
        await te.start(Capped, "c1", Counter(phase="go"))
        st = te.state(Capped, "c1")
        assert (st.ticks, st.firings["bump"].count) == (3, 3)
        await te.advance(3600)
        assert te.state(Capped, "c1").ticks == 3
    async with TestEngine(Capped, clock=clock, backend=backend) as te:
        await te.trigger_kv(Capped, "c1", te.state(Capped, "c1"))  # a new revision, same limits
        await te.advance(3600)
        assert te.state(Capped, "c1").ticks == 3


async def test_cooldown_and_max_firings_hold_publish_only_rules_across_a_restart() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with TestEngine(Pinger, clock=clock, backend=backend) as te:
        rev1 = await te.trigger_kv(Pinger, "e1", running("e1", "pinger"))
        await te.advance(1)
        rev2 = await te.trigger_kv(Pinger, "e1", running("e1", "pinger"))
        await te.advance(1)
        rev3 = await te.trigger_kv(Pinger, "e1", running("e1", "pinger"))
        assert te.published("pinger.cool") == [{"rev": rev1}]
        assert te.published("pinger.capped") == [{"rev": rev1}, {"rev": rev2}]
        await te.advance(8)  # the cooldown ends at +10 s: the latest revision is evaluated again
        assert te.published("pinger.cool") == [{"rev": rev1}, {"rev": rev3}]
        assert te.state(Pinger, "e1").timeline == []
    clock.advance(1)
    async with TestEngine(Pinger, clock=clock, backend=backend) as te:
        assert len(te.published("pinger.cool")) == 2  # the replayed revision fired already
        rev4 = await te.trigger_kv(Pinger, "e1", running("e1", "pinger"))
        assert len(te.published("pinger.cool")) == 2  # inside the cooldown that began at +10 s
        await te.advance(9)
        assert te.published("pinger.cool")[-1] == {"rev": rev4}
        assert te.published("pinger.capped") == [{"rev": rev1}, {"rev": rev2}]


async def test_cooldown_holds_across_two_engine_processes() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with (
        TestEngine(Pinger, clock=clock, backend=backend, instance_id="a") as a,
        TestEngine(Pinger, clock=clock, backend=backend, instance_id="b") as b,
    ):
        group = Group(a, b)
        for _ in range(3):
            await backend.kv_put(
                "PINGER", "pinger.e1", msgspec.json.encode(running("e1", "pinger"))
            )
            await group.settle()
            await group.advance(1)
        assert len(a.published("pinger.cool")) == 1
        assert len(a.published("pinger.capped")) == 2
        await group.advance(10)
        assert len(a.published("pinger.cool")) == 2


class Alarm(ExecutionState):
    alerts: int = 0


def alarm_workflow(scope: str) -> type[Workflow]:
    """An alert that writes state, and a notice that only publishes, both with a 10 s cooldown."""

    class Alarms(Workflow, id=f"alarms-{scope}", state=Alarm):
        @rule(
            watch_kv=True, when=phase_is("hot"), mutate=True, cooldown="10s", cooldown_scope=scope
        )  # type: ignore[arg-type]
        def alert(self, ctx: RuleContext[Alarm, None]) -> None:
            ctx.state.alerts += 1
            ctx.state.phase = "alerted"

        @rule(
            watch_kv=True,
            when=phase_is("alerted"),
            publish=f"alarms-{scope}.notice",
            cooldown="10s",
            cooldown_scope=scope,  # type: ignore[arg-type]
        )
        def notice(self, ctx: RuleContext[Alarm, None]) -> dict[str, Any]:
            return {"id": ctx.execution_id, "at": ctx.now}

    return Alarms


def alert_times(te: TestEngine, workflow: type[Workflow], ids: list[str]) -> list[float]:
    """When each execution's alert fired (its firing record), in order; never-fired ones left out."""
    times = []
    for i in ids:
        st = te.state(workflow, i)
        if st is not None and "alert" in st.firings:
            assert st.alerts == 1, (i, st.alerts)
            times.append(st.firings["alert"].last_at)
    return sorted(times)


async def test_an_execution_scoped_cooldown_holds_each_execution_apart() -> None:
    flow = alarm_workflow("execution")
    ids = ["e1", "e2", "e3"]
    async with TestEngine(flow) as te:
        t0 = te.clock.now()
        for i in ids:
            await te.trigger_kv(flow, i, running(i, "alarms-execution", phase="hot"))
        assert alert_times(te, flow, ids) == [t0] * 3
        assert sorted(n["id"] for n in te.published("alarms-execution.notice")) == ids


async def test_a_workflow_scoped_cooldown_lets_one_execution_fire_per_cooldown() -> None:
    flow = alarm_workflow("workflow")
    ids = ["e1", "e2", "e3"]
    async with TestEngine(flow) as te:
        t0 = te.clock.now()
        for i in ids:
            await te.trigger_kv(flow, i, running(i, "alarms-workflow", phase="hot"))
        # One alert, one notice, for all three executions.
        assert alert_times(te, flow, ids) == [t0]
        assert len(te.published("alarms-workflow.notice")) == 1
        await te.advance(9.9)
        assert alert_times(te, flow, ids) == [t0]
        # Each cooldown's end lets the next one fire, on its own revision.
        await te.advance(0.1)
        assert alert_times(te, flow, ids) == [t0, t0 + 10]
        assert len(te.published("alarms-workflow.notice")) == 2
        await te.advance(10)
        assert alert_times(te, flow, ids) == [t0, t0 + 10, t0 + 20]
        notices = te.published("alarms-workflow.notice")
        assert sorted(n["id"] for n in notices) == ids
        assert [n["at"] for n in notices] == [t0, t0 + 10, t0 + 20]


async def test_a_workflow_scoped_cooldown_survives_a_restart_and_holds_across_two_engines() -> None:
    flow = alarm_workflow("workflow")
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    t0 = clock.now()
    async with TestEngine(flow, clock=clock, backend=backend) as te:
        await te.trigger_kv(flow, "e1", running("e1", "alarms-workflow", phase="hot"))
        assert alert_times(te, flow, ["e1"]) == [t0]
    clock.advance(5)
    async with (
        TestEngine(flow, clock=clock, backend=backend, instance_id="a") as a,
        TestEngine(flow, clock=clock, backend=backend, instance_id="b") as b,
    ):
        group = Group(a, b)
        ids = [f"e{i}" for i in range(2, 6)]
        for i in ids:
            await backend.kv_put(
                "ALARMS_WORKFLOW",
                f"alarms-workflow.{i}",
                msgspec.json.encode(running(i, "alarms-workflow", phase="hot")),
            )
        await group.settle()
        assert alert_times(a, flow, ids) == []  # the new engines know the cooldown began at t0
        await group.advance(5)
        assert alert_times(a, flow, ids) == [t0 + 10]
        await group.advance(30)
        assert alert_times(a, flow, ids) == [t0 + 10, t0 + 20, t0 + 30, t0 + 40]
        notices = a.published("alarms-workflow.notice")
        assert [n["at"] for n in notices] == [t0, t0 + 10, t0 + 20, t0 + 30, t0 + 40]


# --------------------------------------------------------------------------- 3. max iterations


class Looper(
    Workflow, id="looper", state=Counter, max_iterations=3, on_escalate="looper.escalated"
):
    @rule(watch_kv=True, when=phase_is("loop"), mutate=True)
    def again(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.iteration += 1
        ctx.state.ticks += 1


async def test_max_iterations_escalates_and_iteration_never_passes_the_limit() -> None:
    async with TestEngine(Looper) as te:
        await te.start(Looper, "l1", Counter(phase="loop"))
        st = te.state(Looper, "l1")
        assert st.status is Status.ESCALATED
        assert st.iteration == 3
        assert st.ticks == 3  # the transition that would pass the limit did not happen
        assert [e.iteration for e in st.timeline] == [1, 2, 3, 3]
        assert [e.action for e in st.timeline][-1] == "escalate"
        [event] = te.published("looper.escalated", WorkflowEscalationEvent)
        assert (event.execution_id, event.workflow_id, event.phase) == ("l1", "looper", "loop")
        assert "max iterations (3)" in event.reason


async def test_max_iterations_passed_by_a_result_handler_escalates() -> None:
    class LoopResult(msgspec.Struct):
        task_id: str = ""

    class AsyncLooper(
        Workflow, id="async-looper", state=Counter, max_iterations=2, on_escalate="al.escalated"
    ):
        @rule(watch_kv=True, when=phase_is("ask"), publish_async="al.work")
        def ask(self, ctx: RuleContext[Counter, None]) -> dict[str, Any]:
            return {}

        @ask.on_result
        def answered(self, ctx: RuleContext[Counter, None], result: LoopResult) -> None:
            ctx.state.iteration += 1

    async with TestEngine(AsyncLooper) as te:
        te.respond("al.work", lambda req: {})
        await te.start(AsyncLooper, "a1", Counter(phase="ask"))
        st = te.state(AsyncLooper, "a1")
        assert (st.status, st.iteration) == (Status.ESCALATED, 2)
        assert max(e.iteration for e in st.timeline) == 2
        te.assert_published("al.escalated", count=1)
        te.assert_published("al.work", count=3)


# --------------------------------------------------------------------------- 4. timeouts


class Deadline(Workflow, id="deadline", state=Counter, timeout="10m", on_fail="deadline.failed"):
    @rule(watch_kv=True, when=phase_is("never"), mutate=True)
    def unreachable(self, ctx: RuleContext[Counter, None]) -> None: ...


async def test_deadline_passing_with_nothing_else_happening_times_out(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Deadline, metrics=metrics) as te:
        start = te.clock.now()
        await te.start(Deadline, "d1")
        await te.advance(599.9)
        te.assert_status(Deadline, "d1", Status.RUNNING)
        te.assert_not_published("deadline.failed")
        await te.advance(0.1)
        st = te.state(Deadline, "d1")
        assert st.status is Status.TIMED_OUT
        assert st.completed_at == utc(start + 600)
        [event] = te.published("deadline.failed", WorkflowFailureEvent)
        assert (event.execution_id, event.workflow_id, event.failed_at) == (
            "d1",
            "deadline",
            utc(start + 600),
        )
        assert event.error
        assert count(metrics.executions_timed_out, "deadline") == 1


async def test_deadline_that_passed_while_the_engine_was_down_times_out_on_restart() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with TestEngine(Deadline, clock=clock, backend=backend) as te:
        await te.start(Deadline, "d1")
        await te.advance(300)
        te.assert_status(Deadline, "d1", Status.RUNNING)
    clock.advance(3600)
    async with TestEngine(Deadline, clock=clock, backend=backend) as te:
        st = te.state(Deadline, "d1")
        assert st.status is Status.TIMED_OUT
        [event] = te.published("deadline.failed", WorkflowFailureEvent)
        assert event.failed_at == utc(clock.now())
        await te.advance(600)
        te.assert_published("deadline.failed", count=1)


async def test_task_timeout_that_passed_while_the_engine_was_down_fails_on_restart() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with TestEngine(Reviews, clock=clock, backend=backend) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        te.assert_status(Reviews, "p1", Status.WAITING)
    clock.advance(600)
    async with TestEngine(Reviews, clock=clock, backend=backend) as te:
        st = te.state(Reviews, "p1")
        assert st.status is Status.FAILED
        assert "no callback" in st.error
        te.assert_published("reviews.failed", count=1)


async def test_waiting_execution_times_out_at_its_deadline() -> None:
    class SlowReviews(Reviews, id="slow-reviews", timeout="30s", task_timeout="1h"):
        pass

    async with TestEngine(SlowReviews) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        te.assert_status(SlowReviews, "p1", Status.WAITING)
        await te.advance(30)
        te.assert_status(SlowReviews, "p1", Status.TIMED_OUT)
        te.assert_published("reviews.failed", count=1)


# --------------------------------------------------------------------------- 5. lifecycle events


class Life(ExecutionState):
    mode: str = ""


class LifeResult(msgspec.Struct):
    task_id: str = ""
    explode: bool = False


def mode(name: str) -> Any:
    return lambda ctx: ctx.state.mode == name


class Lifecycle(
    Workflow,
    id="life",
    state=Life,
    timeout="1h",
    max_iterations=2,
    task_timeout="1m",
    on_complete="life.completed",
    on_fail="life.failed",
    on_escalate="life.escalated",
):
    @rule(watch_kv=True, when=mode("complete"), complete=True)
    def finish(self, ctx: RuleContext[Life, None]) -> None:
        ctx.state.phase = "finished"

    @rule(watch_kv=True, when=mode("fail"), mutate=True)
    def give_up(self, ctx: RuleContext[Life, None]) -> None:
        ctx.state.phase = "giving-up"
        ctx.state.fail("gave up")

    @rule(watch_kv=True, when=mode("escalate"), mutate=True)
    def hand_over(self, ctx: RuleContext[Life, None]) -> None:
        ctx.state.escalate("needs a human")

    @rule(watch_kv=True, when=mode("raise"), mutate=True)
    def explode(self, ctx: RuleContext[Life, None]) -> None:
        raise RuntimeError("kaboom")

    @rule(watch_kv=True, when=mode("loop"), mutate=True)
    def loop(self, ctx: RuleContext[Life, None]) -> None:
        ctx.state.iteration += 1

    @rule(watch_kv=True, when=[mode("async"), phase_is("")], publish_async="life.work")
    def work(self, ctx: RuleContext[Life, None]) -> dict[str, Any]:
        return {}

    @work.on_result
    def worked(self, ctx: RuleContext[Life, None], result: LifeResult) -> None:
        if result.explode:
            raise ValueError("bad result")
        ctx.state.phase = "worked"
        ctx.state.mode = "complete"


async def _callback(te: TestEngine, **body: Any) -> None:
    await te.callback(Lifecycle, "x", body.pop("result", {}), **body)


COMPLETION_FIELDS = {"execution_id", "workflow_id", "status", "final_phase", "completed_at"}
FAILURE_FIELDS = {"execution_id", "workflow_id", "phase", "error", "failed_at"}
ESCALATION_FIELDS = {"execution_id", "workflow_id", "phase", "reason", "escalated_at"}

LIFECYCLE_PATHS = [
    # (id, initial mode, driver, status, subject, fields, text in error/reason)
    (
        "complete-rule",
        "complete",
        None,
        Status.COMPLETED,
        "life.completed",
        COMPLETION_FIELDS,
        None,
    ),
    ("fail-in-mutator", "fail", None, Status.FAILED, "life.failed", FAILURE_FIELDS, "gave up"),
    (
        "escalate-in-mutator",
        "escalate",
        None,
        Status.ESCALATED,
        "life.escalated",
        ESCALATION_FIELDS,
        "needs a human",
    ),
    ("rule-raises", "raise", None, Status.FAILED, "life.failed", FAILURE_FIELDS, "kaboom"),
    (
        "callback-error",
        "async",
        lambda te: _callback(te, error="worker died"),
        Status.FAILED,
        "life.failed",
        FAILURE_FIELDS,
        "worker died",
    ),
    (
        "result-handler-raises",
        "async",
        lambda te: _callback(te, result={"explode": True}),
        Status.FAILED,
        "life.failed",
        FAILURE_FIELDS,
        "bad result",
    ),
    (
        "callback-then-complete",
        "async",
        lambda te: _callback(te),
        Status.COMPLETED,
        "life.completed",
        COMPLETION_FIELDS,
        None,
    ),
    (
        "task-timeout",
        "async",
        lambda te: te.advance(60),
        Status.FAILED,
        "life.failed",
        FAILURE_FIELDS,
        "no callback",
    ),
    (
        "deadline",
        "idle",
        lambda te: te.advance(3600),
        Status.TIMED_OUT,
        "life.failed",
        FAILURE_FIELDS,
        None,
    ),
    (
        "max-iterations",
        "loop",
        None,
        Status.ESCALATED,
        "life.escalated",
        ESCALATION_FIELDS,
        "max iterations",
    ),
]


@pytest.mark.parametrize(
    ("initial", "drive", "status", "subject", "fields", "text"),
    [pytest.param(*case[1:], id=case[0]) for case in LIFECYCLE_PATHS],
)
async def test_lifecycle_event_is_published_once_on_every_path(
    initial: str,
    drive: Callable[[TestEngine], Awaitable[None]] | None,
    status: Status,
    subject: str,
    fields: set[str],
    text: str | None,
) -> None:
    async with TestEngine(Lifecycle) as te:
        await te.start(Lifecycle, "x", Life(mode=initial))
        if drive is not None:
            await drive(te)
        st = te.state(Lifecycle, "x")
        assert st.status is status, (st.status, st.error)
        assert st.completed_at == utc(te.clock.now())
        [raw] = te.published(subject)
        assert set(raw) == fields
        assert (raw["execution_id"], raw["workflow_id"]) == ("x", "life")
        others = {"life.completed", "life.failed", "life.escalated"} - {subject}
        for other in others:
            te.assert_not_published(other)
        event: Any
        if subject == "life.completed":
            event = msgspec.json.decode(msgspec.json.encode(raw), type=WorkflowCompletionEvent)
            assert (event.status, event.phase, event.completed_at) == (
                "completed",
                st.phase,
                st.completed_at,
            )
        elif subject == "life.failed":
            event = msgspec.json.decode(msgspec.json.encode(raw), type=WorkflowFailureEvent)
            assert (event.phase, event.error, event.failed_at) == (
                st.phase,
                st.error,
                st.completed_at,
            )
        else:
            event = msgspec.json.decode(msgspec.json.encode(raw), type=WorkflowEscalationEvent)
            assert (event.phase, event.reason, event.escalated_at) == (
                st.phase,
                st.error,
                st.completed_at,
            )
        if text is not None:
            assert text in st.error
        await te.advance(7200)
        te.assert_published(subject, count=1)


# --------------------------------------------------------------------------- 6. no effect lost, none doubled


class Sender(ExecutionState):
    sent: int = 0


class Send(Workflow, id="send", state=Sender, on_complete="send.completed"):
    @rule(watch_kv=True, when=phase_is(""), mutate=True, publish="send.out")
    def send(self, ctx: RuleContext[Sender, None]) -> dict[str, Any]:
        ctx.state.phase = "sent"
        ctx.state.sent += 1
        return {"execution": ctx.execution_id}

    @rule(watch_kv=True, when=phase_is("sent"), complete=True)
    def finish(self, ctx: RuleContext[Sender, None]) -> None: ...


class Announce(Workflow, id="announce"):
    @rule(watch_kv=True, publish="announce.out")
    def announce(self, ctx: RuleContext[ExecutionState, None]) -> dict[str, Any]:
        return {"rev": ctx.revision}


async def test_state_is_written_before_anything_is_published() -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Send, clock=clock, backend=backend) as te:
        seen: dict[str, Any] = {}
        backend.before_publish["send.out"] = lambda s: seen.setdefault(s, te.state(Send, "s1"))
        backend.before_publish["send.completed"] = lambda s: seen.setdefault(
            s, te.state(Send, "s1")
        )
        await te.start(Send, "s1")
        assert (seen["send.out"].phase, seen["send.out"].sent) == ("sent", 1)
        assert seen["send.completed"].status is Status.COMPLETED
        te.assert_published("send.out", count=1)


@pytest.mark.parametrize("dies", ["before-publish", "after-publish"])
async def test_outbox_of_an_engine_that_died_after_its_write_is_delivered_by_another(
    dies: str, metrics: EngineMetrics
) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    await backend.ensure_stream("OUT", ["send.out"])
    a = Engine(
        backend, [Send], clock=clock, instance_id="a", outbox_grace=5.0, workers=2, metrics=metrics
    )
    died = anyio.Event()

    async def die(_: str) -> None:
        died.set()
        await kill(a)

    hooks = backend.before_publish if dies == "before-publish" else backend.after_publish
    hooks["send.out"] = die
    await a.start()
    await a.start_execution(Send, "s1")
    with anyio.fail_after(5):
        await died.wait()
    await a.stop()
    hooks.clear()
    st = decode_state(backend, Send, "s1")
    assert (st.phase, st.sent, st.status) == ("sent", 1, Status.RUNNING), "the write was committed"
    [m] = st.outbox
    written_at = clock.now()

    async with Engine(
        backend, [Send], clock=clock, instance_id="b", outbox_grace=5.0, workers=2, metrics=metrics
    ) as b:
        await settle(backend, b)
        before = [p for p in backend.published if p.subject == "send.out"]
        assert len(before) == (0 if dies == "before-publish" else 1)
        await advance(clock, backend, [b], 4.9)
        assert [p for p in backend.published if p.subject == "send.out"] == before, (
            "waits out the grace"
        )
        await advance(clock, backend, [b], 0.1)
        outs = [p for p in backend.published if p.subject == "send.out"]
        assert [p.msg_id for p in outs] == [m.msg_id] * len(outs)
        assert [p.duplicate for p in outs] == (
            [False] if dies == "before-publish" else [False, True]
        )
        assert clock.now() >= written_at + 5.0
        st = decode_state(backend, Send, "s1")
        assert (st.status, st.sent) == (Status.COMPLETED, 1)
        completed = [p for p in backend.published if p.subject == "send.completed"]
        assert len(completed) == 1
    async with backend.consume("OUT", "check", "send.out") as reader:
        with anyio.fail_after(1):
            first = await reader.__anext__()
        assert msgspec.json.decode(first.data) == {"execution": "s1"}
        assert first.headers["Nats-Msg-Id"] == m.msg_id
    assert sum(1 for p in backend.published if p.subject == "send.out" and not p.duplicate) == 1


async def test_claimed_publish_of_a_dead_engine_is_delivered_by_another_after_the_grace() -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    a = Engine(backend, [Announce], clock=clock, instance_id="a", outbox_grace=5.0, workers=2)
    died = anyio.Event()

    async def die(_: str) -> None:
        died.set()
        await kill(a)

    backend.before_publish["announce.out"] = die
    await a.start()
    await settle(backend, a)
    rev = await backend.kv_put(
        "ANNOUNCE", "announce.e1", msgspec.json.encode(running("e1", "announce"))
    )
    with anyio.fail_after(5):
        await died.wait()
    await a.stop()
    backend.before_publish.clear()
    assert [p for p in backend.published if p.subject == "announce.out"] == []

    async with Engine(
        backend, [Announce], clock=clock, instance_id="b", outbox_grace=5.0, workers=2
    ) as b:
        await settle(backend, b)
        assert [p for p in backend.published if p.subject == "announce.out"] == []
        await advance(clock, backend, [b], 5)
        outs = [p for p in backend.published if p.subject == "announce.out"]
        assert [msgspec.json.decode(p.data) for p in outs] == [{"rev": rev}]
        await advance(clock, backend, [b], 60)
        assert len([p for p in backend.published if p.subject == "announce.out"]) == 1


async def test_a_revision_held_by_a_dead_engines_claim_fires_once_the_grace_is_over() -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    a = Engine(backend, [Announce], clock=clock, instance_id="a", outbox_grace=5.0, workers=2)
    died = anyio.Event()

    async def die(_: str) -> None:
        died.set()
        await kill(a)

    backend.before_publish["announce.out"] = die
    await a.start()
    await settle(backend, a)
    first = await backend.kv_put(
        "ANNOUNCE", "announce.e1", msgspec.json.encode(running("e1", "announce"))
    )
    with anyio.fail_after(5):
        await died.wait()
    await a.stop()
    backend.before_publish.clear()

    async with Engine(
        backend, [Announce], clock=clock, instance_id="b", outbox_grace=5.0, workers=2
    ) as b:
        await settle(backend, b)
        # A new revision while a's claim is in its grace: the rule waits for it, and
        # a timer in the backend (not in b) brings the key back once the grace is over.
        second = await backend.kv_put(
            "ANNOUNCE", "announce.e1", msgspec.json.encode(running("e1", "announce"))
        )
        await settle(backend, b)
        assert [p for p in backend.published if p.subject == "announce.out"] == []
        assert backend.next_schedule() == pytest.approx(clock.now() + 5.0, abs=0.5)
        await advance(clock, backend, [b], 5)
        outs = [p for p in backend.published if p.subject == "announce.out"]
        assert sorted(msgspec.json.decode(p.data)["rev"] for p in outs) == [first, second]


async def test_request_of_an_engine_that_died_after_parking_goes_out_once_and_completes() -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    a = Engine(backend, [Reviews], clock=clock, instance_id="a", outbox_grace=5.0, workers=2)
    died = anyio.Event()

    async def die(_: str) -> None:
        died.set()
        await kill(a)

    backend.before_publish["reviewer.input"] = die
    await a.start()
    await backend.publish("plans.submitted", msgspec.json.encode(Submitted(plan_id="p1", plan="x")))
    with anyio.fail_after(5):
        await died.wait()
    await a.stop()
    backend.before_publish.clear()
    parked = decode_state(backend, Reviews, "p1")
    assert parked.status is Status.WAITING  # parked, the request still in the outbox

    async with Engine(
        backend, [Reviews], clock=clock, instance_id="b", outbox_grace=5.0, workers=2
    ) as b:
        await settle(backend, b)
        assert [p for p in backend.published if p.subject == "reviewer.input"] == []
        await advance(clock, backend, [b], 5)
        [request] = [p for p in backend.published if p.subject == "reviewer.input"]
        assert request.msg_id == parked.outbox[0].msg_id
        body = msgspec.json.decode(request.data)
        assert body["task_id"] == parked.pending_task_id
        result = {"task_id": body["task_id"], "verdict": "approved"}
        await backend.publish(body["callback_subject"], msgspec.json.encode(result))
        await settle(backend, b)
        st = decode_state(backend, Reviews, "p1")
        assert (st.status, st.notes) == (Status.COMPLETED, ["accepted", "verdict approved"])
        assert [e.rule_id for e in st.timeline] == ["accept", "ask", "ask", "done"]
        assert len([p for p in backend.published if p.subject == "reviewer.input"]) == 1
        assert len([p for p in backend.published if p.subject == "reviews.completed"]) == 1


async def test_message_committed_by_an_engine_that_died_before_acking_is_not_applied_twice() -> (
    None
):
    clock = ManualClock()
    backend = FaultyBackend(clock, state_buckets=("REVIEWS",))
    a = Engine(backend, [Reviews], clock=clock, instance_id="a", workers=2)
    died = anyio.Event()

    async def die(_: str) -> None:
        died.set()
        await kill(a)

    backend.after_write = die  # the first state write (accept's) commits, then the process dies
    await a.start()
    await backend.publish("plans.submitted", msgspec.json.encode(Submitted(plan_id="p1", plan="x")))
    with anyio.fail_after(5):
        await died.wait()
    await a.stop()
    backend.after_write = None
    assert decode_state(backend, Reviews, "p1").notes == ["accepted"]
    # Stopping hands the message back (nak) instead of acknowledging it.
    assert [how for how, *_ in backend.settled] in ([], ["nak"]), (
        "the message was never acknowledged"
    )

    async with Engine(backend, [Reviews], clock=clock, instance_id="b", workers=2) as b:
        await settle(backend, b)
        await advance(clock, backend, [b], 31)  # past ack_wait: the submission comes back, to b
        assert [
            (how, n) for how, s, n, _ in backend.settled if s == "plans.submitted" and how == "ack"
        ] == [("ack", 2)]
        st = decode_state(backend, Reviews, "p1")
        assert st.notes == ["accepted"], "the redelivered message did not run accept again"
        assert [e.rule_id for e in st.timeline] == ["accept", "ask"]
        assert len([p for p in backend.published if p.subject == "reviewer.input"]) == 1


class Tally(ExecutionState):
    seen: list[int] = []


class Add(msgspec.Struct):
    id: str
    n: int


class Adder(Workflow, id="adder", state=Tally):
    @rule(on_subject="adder.add", stream="ADDS", state_key=lambda m: m.id, mutate=True)
    def add(self, ctx: RuleContext[Tally, Add]) -> None:
        ctx.state.seen.append(ctx.message.n)


async def test_unacked_message_redelivered_after_a_later_one_is_not_applied_twice() -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock, state_buckets=("ADDER",))
    a = Engine(backend, [Adder], clock=clock, instance_id="a", workers=2)
    died = anyio.Event()

    async def die(_: str) -> None:
        died.set()
        await kill(a)

    backend.after_write = die  # add(1) commits, then the process dies before acknowledging it
    await a.start()
    await backend.publish("adder.add", msgspec.json.encode(Add(id="x", n=1)))
    with anyio.fail_after(5):
        await died.wait()
    await a.stop()
    backend.after_write = None

    async with Engine(backend, [Adder], clock=clock, instance_id="b", workers=2) as b:
        await backend.publish("adder.add", msgspec.json.encode(Add(id="x", n=2)))
        await settle(backend, b)
        assert decode_state(backend, Adder, "x").seen == [1, 2]
        await advance(clock, backend, [b], 31)  # add(1) comes back after ack_wait
        acks = [(how, n) for how, s, n, _ in backend.settled if how == "ack"]
        assert acks == [("ack", 1), ("ack", 2)]
        assert decode_state(backend, Adder, "x").seen == [1, 2]


def decode_state(backend: MemoryBackend, workflow: Any, execution_id: str) -> Any:
    d = definition_of(workflow)
    entry = backend.peek(d.bucket, d.key(execution_id))
    assert entry is not None
    return msgspec.json.decode(entry.value, type=d.state_type)


# --------------------------------------------------------------------------- 7. several engine processes


class Shared(
    Workflow, id="shared", state=Review, task_timeout="1m", on_complete="shared.completed"
):
    @rule(
        on_subject="shared.submitted",
        stream="SHARED_IN",
        state_key=lambda m: m.plan_id,
        mutate=True,
    )
    def accept(self, ctx: RuleContext[Review, Submitted]) -> None:
        ctx.state.phase = "submitted"
        ctx.state.notes.append("accepted")

    @rule(watch_kv=True, when=phase_is("submitted"), mutate=True)
    def prepare(self, ctx: RuleContext[Review, None]) -> None:
        ctx.state.phase = "prepared"
        ctx.state.notes.append("prepared")

    @rule(watch_kv=True, when=phase_is("prepared"), publish_async="shared.work")
    def ask(self, ctx: RuleContext[Review, None]) -> ReviewRequest:
        return ReviewRequest(plan=ctx.state.plan)

    @ask.on_result
    def answered(self, ctx: RuleContext[Review, None], result: ReviewResult) -> None:
        ctx.state.notes.append("answered")
        ctx.state.phase = "approved"

    @rule(watch_kv=True, when=phase_is("approved"), complete=True)
    def done(self, ctx: RuleContext[Review, None]) -> None:
        ctx.state.notes.append("done")

    @rule(watch_kv=True, publish="shared.changed")
    def changed(self, ctx: RuleContext[Review, None]) -> dict[str, Any]:
        return {"key": ctx.key, "rev": ctx.revision}


SHARED_TIMELINE = ["accept", "prepare", "ask", "ask", "done"]
SHARED_NOTES = ["accepted", "prepared", "answered", "done"]


def assert_shared_finished(te: TestEngine, ids: list[str]) -> None:
    for i in ids:
        st = te.state(Shared, i)
        assert st is not None, i
        assert st.status is Status.COMPLETED, (i, st.status)
        assert st.notes == SHARED_NOTES, (i, st.notes)
        assert [e.rule_id for e in st.timeline] == SHARED_TIMELINE, (i, st.timeline)
    completed = te.published("shared.completed")
    assert sorted(c["execution_id"] for c in completed) == sorted(ids)
    assert len(te.published("shared.work")) == len(ids)


async def test_two_engines_make_every_transition_once() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    m_a, m_b = EngineMetrics(_registry()), EngineMetrics(_registry())
    async with (
        TestEngine(Shared, clock=clock, backend=backend, instance_id="a", metrics=m_a) as a,
        TestEngine(Shared, clock=clock, backend=backend, instance_id="b", metrics=m_b) as b,
    ):
        group = Group(a, b)
        a.respond("shared.work", lambda req: ReviewResult(verdict="ok"))
        ids = [f"e{i}" for i in range(12)]
        for i in ids:
            await backend.publish("shared.submitted", msgspec.json.encode(Submitted(plan_id=i)))
        await group.settle()
        assert_shared_finished(a, ids)
        # The publish-only rule fired once per revision: accept, prepare, ask, callback (not the terminal one).
        changed = a.published("shared.changed")
        assert len({(c["key"], c["rev"]) for c in changed}) == len(changed) == 4 * len(ids)
        # Messages and callbacks went through shared consumers: each handled once, in all.
        ok = count(m_a.callbacks_received, "shared", "ask", "ok") + count(
            m_b.callbacks_received, "shared", "ask", "ok"
        )
        assert ok == len(ids)
        created = count(m_a.executions_created, "shared") + count(m_b.executions_created, "shared")
        assert created == len(ids)


async def test_two_engines_time_out_and_fail_a_task_once() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with (
        TestEngine(Deadline, Reviews, clock=clock, backend=backend, instance_id="a") as a,
        TestEngine(Deadline, Reviews, clock=clock, backend=backend, instance_id="b") as b,
    ):
        group = Group(a, b)
        await a.engine.start_execution(Deadline, "d1")
        await backend.publish("plans.submitted", msgspec.json.encode(Submitted(plan_id="p1")))
        await group.settle()
        await group.advance(3600)
        st = a.state(Deadline, "d1")
        assert st.status is Status.TIMED_OUT
        assert [e.rule_id for e in st.timeline] == ["deadline"]
        a.assert_published("deadline.failed", count=1)
        r = a.state(Reviews, "p1")
        assert r.status is Status.FAILED
        assert [e.rule_id for e in r.timeline] == ["accept", "ask", "task_timeout"]
        a.assert_published("reviews.failed", count=1)


class Overlap(Workflow, id="overlap2", state=Review):
    @rule(on_subject="overlap2.in.*", message=Submitted, publish="overlap2.star")
    def star(self, ctx: RuleContext[None, Submitted]) -> dict[str, Any]:
        return {"id": ctx.message.plan_id}

    @rule(on_subject="overlap2.in.>", message=Submitted, publish="overlap2.tail")
    def tail(self, ctx: RuleContext[None, Submitted]) -> dict[str, Any]:
        return {"id": ctx.message.plan_id}


async def test_two_engines_handle_each_core_message_once_per_overlapping_rule() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with (
        TestEngine(Overlap, clock=clock, backend=backend, instance_id="a") as a,
        TestEngine(Overlap, clock=clock, backend=backend, instance_id="b") as b,
    ):
        group = Group(a, b)
        for i in range(10):
            await backend.publish("overlap2.in.x", msgspec.json.encode(Submitted(plan_id=f"m{i}")))
        await group.settle()
        # Each rule got every message once: the engines shared them, rule by rule.
        for subject in ("overlap2.star", "overlap2.tail"):
            assert sorted(p["id"] for p in a.published(subject)) == [f"m{i}" for i in range(10)]


def _registry() -> Any:
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


# --------------------------------------------------------------------------- 8. restart


async def test_restarted_engine_continues_every_execution_to_its_end() -> None:
    clock = ManualClock()
    backend = MemoryBackend(clock=clock)
    async with TestEngine(Shared, clock=clock, backend=backend) as te:
        for i in ("e1", "e2", "e3"):
            await te.trigger_message("shared.submitted", Submitted(plan_id=i))
        requests = te.published("shared.work")
        assert [te.state(Shared, i).status for i in ("e1", "e2", "e3")] == [Status.WAITING] * 3
    # While no engine runs: the worker answers two requests, a new plan arrives.
    for request in requests[:2]:
        body = {"task_id": request["task_id"], "verdict": "ok"}
        await backend.publish(request["callback_subject"], msgspec.json.encode(body))
    await backend.publish("shared.submitted", msgspec.json.encode(Submitted(plan_id="e4")))
    clock.advance(10)
    async with TestEngine(Shared, clock=clock, backend=backend) as te:
        # e1, e2 took their callbacks; e3 still waits; e4 was accepted and asked its worker.
        assert [te.state(Shared, i).status for i in ("e1", "e2")] == [Status.COMPLETED] * 2
        assert [te.state(Shared, i).status for i in ("e3", "e4")] == [Status.WAITING] * 2
        await te.callback(Shared, "e3", {"verdict": "ok"})
        await te.callback(Shared, "e4", {"verdict": "ok"})
        assert_shared_finished(te, ["e1", "e2", "e3", "e4"])


class Chain(Workflow, id="chain", state=Counter):
    @rule(watch_kv=True, when=phase_is(""), mutate=True)
    def one(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.phase = "one"

    @rule(watch_kv=True, when=phase_is("one"), mutate=True)
    def two(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.phase = "two"

    @rule(watch_kv=True, when=phase_is("two"), mutate=True)
    def three(self, ctx: RuleContext[Counter, None]) -> None:
        ctx.state.phase = "three"

    @rule(watch_kv=True, when=phase_is("three"), complete=True)
    def four(self, ctx: RuleContext[Counter, None]) -> None: ...


async def test_engine_killed_mid_chain_is_resumed_from_its_last_commit_by_a_new_engine() -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock, state_buckets=("CHAIN",))
    a = Engine(backend, [Chain], clock=clock, instance_id="a", workers=2)
    died = anyio.Event()
    writes = 0

    async def after_write(_: str) -> None:
        nonlocal writes
        writes += 1
        if writes == 3:  # start, one, two: then the process dies
            died.set()
            await kill(a)

    backend.after_write = after_write
    await a.start()
    await a.start_execution(Chain, "c1")
    with anyio.fail_after(5):
        await died.wait()
    await a.stop()
    backend.after_write = None
    assert decode_state(backend, Chain, "c1").phase == "two"
    async with Engine(backend, [Chain], clock=clock, instance_id="b", workers=2) as b:
        await settle(backend, b)
    st = decode_state(backend, Chain, "c1")
    assert st.status is Status.COMPLETED
    assert [e.rule_id for e in st.timeline] == ["one", "two", "three", "four"]


# --------------------------------------------------------------------------- bad input (§3)


async def test_undecodable_stream_message_is_terminated_and_counted(metrics: EngineMetrics) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        await te.trigger_message("plans.submitted", b"{garbage")
        await te.trigger_message("plans.submitted", {"plan": "no id"})
        assert count(metrics.poison_messages, "reviews", "message") == 2
        await te.advance(31)  # past ack_wait: a message left unacknowledged would be back by now
        assert count(metrics.poison_messages, "reviews", "message") == 2
        assert count(metrics.redeliveries, "reviews") == 0
        assert [(how, n) for how, s, n, _ in backend.settled if s == "plans.submitted"] == [
            ("term", 1),
            ("term", 1),
        ]
        assert te.executions(Reviews) == []
        await te.trigger_message("plans.submitted", Submitted(plan_id="ok"))
        te.assert_status(Reviews, "ok", Status.WAITING)


async def test_message_whose_state_key_is_an_invalid_id_is_terminated_and_counted(
    metrics: EngineMetrics,
) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        for bad in ("a.b", "*", "", "x y"):
            await te.trigger_message("plans.submitted", Submitted(plan_id=bad))
        await te.advance(31)
        assert count(metrics.invalid_ids, "reviews") == 4
        assert [how for how, s, _, _ in backend.settled if s == "plans.submitted"] == ["term"] * 4
        assert te.executions(Reviews) == []
        assert backend.peek_keys("REVIEWS") == []


async def test_undecodable_state_is_counted_and_left_alone_while_others_work(
    metrics: EngineMetrics,
) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock)
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        te.respond("reviewer.input", lambda req: ReviewResult(verdict="approved"))
        await te.put("REVIEWS", "reviews.bad", b"\x00 not a state")
        assert count(metrics.state_decode_errors, "reviews") == 1
        await te.trigger_message("plans.submitted", Submitted(plan_id="good"))
        te.assert_status(Reviews, "good", Status.COMPLETED)
        # A message for the broken execution is refused too, and the value stays as it was.
        await te.trigger_message("plans.submitted", Submitted(plan_id="bad"))
        await te.advance(31)
        assert count(metrics.state_decode_errors, "reviews") == 2
        assert backend.peek("REVIEWS", "reviews.bad").value == b"\x00 not a state"
        assert te.engine.running


async def test_transient_write_failures_are_retried_and_the_transition_happens_once() -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock, state_buckets=("SEND",))
    async with TestEngine(Send, clock=clock, backend=backend) as te:
        backend.failing_writes = 2
        await te.trigger_kv(Send, "s1", Sender(id="s1", workflow_id="send", status=Status.RUNNING))
        await te.advance(2)
        assert backend.failed_writes == 2
        st = te.state(Send, "s1")
        assert (st.status, st.sent) == (Status.COMPLETED, 1)
        assert [e.rule_id for e in st.timeline] == ["send", "finish"]
        te.assert_published("send.out", count=1)
        te.assert_published("send.completed", count=1)


async def test_transient_failures_in_a_row_back_off_doubling() -> None:
    # Retries come from the timer: each failure in a row doubles the delay before the next.
    clock = ManualClock()
    backend = FaultyBackend(clock, state_buckets=("SEND",))
    failed_at = record_failures(backend, clock)
    async with TestEngine(Send, clock=clock, backend=backend) as te:
        backend.failing_writes = 7
        await te.trigger_kv(Send, "s1", Sender(id="s1", workflow_id="send", status=Status.RUNNING))
        await te.advance(10)
        gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(failed_at)]
        # (Up to RETRY_CAP, 2 s: a cluster electing a leader answers "no responders" for
        # seconds, and a try every 2 s at most finds the new leader soon after.)
        assert gaps == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
        st = te.state(Send, "s1")
        assert (st.status, st.sent) == (Status.COMPLETED, 1)


async def test_writes_the_server_did_not_answer_are_tried_again_without_backing_off() -> None:
    # A try that timed out waited its whole timeout already (a cluster electing the
    # bucket's new leader): the next follows at the first delay, not a doubled one.
    clock = ManualClock()
    backend = FaultyBackend(clock, state_buckets=("SEND", "REVIEWS"))
    backend.failure = TimedOutError
    failed_at = record_failures(backend, clock)
    async with TestEngine(Send, clock=clock, backend=backend) as te:
        backend.failing_writes = 4
        await te.trigger_kv(Send, "s1", Sender(id="s1", workflow_id="send", status=Status.RUNNING))
        await te.advance(3)
        gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(failed_at)]
        assert gaps == [0.1, 0.1, 0.1]
        assert te.state(Send, "s1").status == Status.COMPLETED
    async with TestEngine(Reviews, clock=clock, backend=backend) as te:
        backend.failing_writes = 3  # (a message's redeliveries: nak(0.2 s) each time)
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1", plan="x"))
        for _ in range(3):
            await te.advance(0.2)
        settled = [(how, n) for how, s, n, _ in backend.settled if s == "plans.submitted"]
        assert settled == [("nak", 1), ("nak", 2), ("nak", 3), ("ack", 4)]
        assert te.state(Reviews, "p1").notes == ["accepted"]


class Stepping(ExecutionState):
    pass


class Stepper(Workflow, id="stepper", state=Stepping):
    @rule(on_subject="jobs.start", state_key=lambda m: m["id"], message=dict, mutate=True)
    def start(self, ctx: RuleContext[Stepping, dict[str, str]]) -> None:
        ctx.state.phase = "stepping"

    @rule(watch_kv=True, when=phase_is("stepping"), mutate=True)
    def step(self, ctx: RuleContext[Stepping, None]) -> None:
        ctx.state.phase = "stepped"


class _HeldPartitions:
    """A partitioned consumer whose changes wait while ``backend.held``."""

    def __init__(self, inner: Any, backend: StaleAfterFailover) -> None:
        self._inner, self._backend = inner, backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __aiter__(self) -> _HeldPartitions:
        return self

    async def __anext__(self) -> Any:
        change = await self._inner.__anext__()
        while self._backend.held:  # (taken from the partition, not handed on yet)
            await anyio.sleep(0.01)
        return change


class StaleAfterFailover(FaultyBackend):
    """A cluster that lost the bucket's leader: a write fails, the new leader answers a
    read before it has applied the latest write (no key yet), and the changes reach the
    partitions late (``held``)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock, state_buckets=("STEPPER",))
        self.stale_reads = 0
        self.stale_writes = 0
        self.lagging_replica = False
        self.held = False

    async def kv_update(
        self, bucket: str, key: str, value: bytes, revision: int, *, ttl: float | None = None
    ) -> int:
        if bucket in self.state_buckets and self.stale_writes:
            self.stale_writes -= 1  # (the new leader has not applied ``revision`` yet)
            raise ConflictError(f"update {bucket}/{key}@{revision}: wrong last sequence")
        return await super().kv_update(bucket, key, value, revision, ttl=ttl)

    async def kv_get(self, bucket: str, key: str, *, leader: bool = False) -> Any:
        if bucket in self.state_buckets and self.stale_reads:
            self.stale_reads -= 1
            return None
        if bucket in self.state_buckets and self.lagging_replica and not leader:
            return None  # (a replica, just restarted, that has not caught up)
        return await super().kv_get(bucket, key)

    def consume_partitions(self, *args: Any, **kwargs: Any) -> Any:
        @contextlib.asynccontextmanager
        async def held() -> AsyncIterator[Any]:
            async with MemoryBackend.consume_partitions(self, *args, **kwargs) as consumer:
                yield _HeldPartitions(consumer, self)

        return held()


@pytest.mark.parametrize("failure", ["transient, then a stale read", "a stale compare-and-set"])
async def test_a_commit_whose_next_evaluation_failed_is_evaluated_when_its_change_comes(
    failure: str,
) -> None:
    # The engine evaluates what it has just committed at once; the change's copy from the
    # partition is then skipped as seen. When that evaluation failed, and its retry was
    # "done" on a stale read (a new leader that had not applied the write yet: no state),
    # skipping the copy lost the revision: the execution stayed in its phase for good (the
    # cluster soak's stuck executions). Now the copy is evaluated.
    clock = ManualClock()
    backend = StaleAfterFailover(clock)
    engine = Engine(backend, [Stepper], clock=clock)
    await engine.start()
    try:

        def failover(key: str) -> None:
            backend.after_write = None
            if failure == "a stale compare-and-set":
                backend.stale_writes = 1  # the step right after the start's commit
            else:
                backend.failing_writes = 1  # the step right after the start's commit
                backend.stale_reads = 2  # and the retry's read, checked with a leader that lags

        # First an execution whose key is in the same partition: the engine holds it.
        assert partition_of("stepper.w6", 8) == partition_of("stepper.j1", 8)
        await backend.publish("jobs.start", b'{"id": "w6"}')
        with anyio.fail_after(10):
            while (await backend.kv_get("STEPPER", "stepper.w6")) is None or json.loads(
                backend.peek("STEPPER", "stepper.w6").value
            )["phase"] != "stepped":
                await anyio.sleep(0.01)
        backend.after_write = failover
        backend.held = True
        await backend.publish("jobs.start", b'{"id": "j1"}')
        with anyio.fail_after(10):
            while backend.failed_writes < 1 and not (
                failure == "a stale compare-and-set"
                and backend.after_write is None
                and not backend.stale_writes
            ):
                await anyio.sleep(0.01)
            while backend.stale_reads or engine.rt.retries:  # the retry, due 0.1 s later
                clock.advance(0.1)
                await anyio.sleep(0.01)
        assert json.loads(backend.peek("STEPPER", "stepper.j1").value)["phase"] == "stepping"
        backend.held = False  # the copy of the start's commit comes
        with anyio.fail_after(10):
            while json.loads(backend.peek("STEPPER", "stepper.j1").value)["phase"] != "stepped":
                await anyio.sleep(0.01)
    finally:
        await engine.stop()


@contextlib.asynccontextmanager
async def _stepper(**faults: Any) -> AsyncIterator[tuple[ManualClock, StaleAfterFailover]]:
    """An engine running ``Stepper`` on a ``StaleAfterFailover`` with ``faults`` set."""
    clock = ManualClock()
    backend = StaleAfterFailover(clock)
    for name, value in faults.items():
        setattr(backend, name, value)
    engine = Engine(backend, [Stepper], clock=clock)
    await engine.start()
    try:
        yield clock, backend
    finally:
        await engine.stop()


async def _stepping(backend: MemoryBackend, exec_id: str) -> None:
    """Written by someone else: a change the engine takes from its partition."""
    first = {"id": exec_id, "workflow_id": "stepper", "phase": "stepping", "status": "running"}
    await backend.kv_create("STEPPER", f"stepper.{exec_id}", json.dumps(first).encode())


async def _until_stepped(clock: ManualClock, backend: MemoryBackend, exec_id: str) -> None:
    with anyio.fail_after(10):
        while json.loads(backend.peek("STEPPER", f"stepper.{exec_id}").value)["phase"] != "stepped":
            clock.advance(0.1)
            await anyio.sleep(0.01)


async def test_a_change_whose_compare_and_set_a_stale_view_refused_is_evaluated_again() -> None:
    # A change from the partition (written by someone else): its evaluation's
    # compare-and-set is refused although no newer revision is there (a new leader that
    # has not applied it yet). Acknowledged, the revision would be lost; it comes again.
    async with _stepper(stale_writes=1) as (clock, backend):
        await _stepping(backend, "j2")
        await _until_stepped(clock, backend, "j2")
        assert backend.stale_writes == 0


async def test_a_replica_that_lags_does_not_make_a_refused_change_count_as_superseded() -> None:
    # Its compare-and-set is refused (a new leader that lags) more times than a key read
    # as gone is believed, and every read a replica answers finds no key (one that was
    # just restarted and answers while 90 % caught up). Whether a newer revision is there
    # is read from the leader: the change is evaluated again until it commits.
    async with _stepper(stale_writes=7, lagging_replica=True) as (clock, backend):
        await _stepping(backend, "j3")
        await _until_stepped(clock, backend, "j3")
        assert backend.stale_writes == 0


async def test_a_refused_change_whose_key_is_gone_is_acknowledged_in_the_end() -> None:
    # Every compare-and-set is refused and the leader reads no key: gone (or a leader that
    # lags, for this long). It is evaluated again for a while (20 deliveries, 0.5 s
    # apart), then acknowledged: it does not come back for ever.
    async with _stepper(stale_writes=1000, stale_reads=1000) as (clock, backend):
        await _stepping(backend, "j4")
        consumers = backend._partition_sets[partitioned_stream("STEPPER", "stepper")].consumers
        with anyio.fail_after(10):
            while backend.stale_writes == 1000 or any(c.pending for c in consumers):
                clock.advance(0.1)
                await anyio.sleep(0.01)
        assert 1000 - backend.stale_writes == 20


async def test_a_callback_read_on_a_lagging_replica_is_not_dropped(metrics: EngineMetrics) -> None:
    # The answer comes to an engine that did not commit the wait (it reads the state), and
    # the replica that answers its read has no key yet: "unknown execution" is read from
    # the leader before the answer is dropped.
    clock = ManualClock()
    backend = StaleAfterFailover(clock)
    backend.state_buckets = {"REVIEWS"}
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1"))
        assert te.state(Reviews, "p1").status is Status.WAITING
        te.engine.store.take_parked("REVIEWS", "reviews.p1")  # (as another engine's)
        backend.lagging_replica = True
        await te.callback(Reviews, "p1", {"verdict": "approved"})
        backend.lagging_replica = False
        st = te.state(Reviews, "p1")
        assert (st.phase, st.status) == ("done", Status.COMPLETED)
        assert count(metrics.callbacks_received, "reviews", "", "unknown") == 0


class Waiter(Workflow, id="waiter", state=Stepping):
    @rule(on_subject="waits.start", state_key=lambda m: m["id"], message=dict, mutate=True)
    def start(self, ctx: RuleContext[Stepping, dict[str, str]]) -> None:
        ctx.state.phase = "awaiting"

    @rule(watch_kv=True, when=phase_is("awaiting"), after="1m", mutate=True)
    def late(self, ctx: RuleContext[Stepping, None]) -> None:
        ctx.state.phase = "late"


async def _timer_fires_with(**faults: int) -> StaleAfterFailover:
    """A ``Waiter`` execution whose ``after="1m"`` timer fires with ``faults`` set; the
    backend once every fault was met and the timer's evaluation is done."""
    clock = ManualClock()
    backend = StaleAfterFailover(clock)
    backend.state_buckets = {"WAITER"}
    engine = Engine(backend, [Waiter], clock=clock)
    await engine.start()
    try:
        await backend.publish("waits.start", b'{"id": "w1"}')
        await settle(backend, engine)
        assert json.loads(backend.peek("WAITER", "waiter.w1").value)["phase"] == "awaiting"
        for name, value in faults.items():
            setattr(backend, name, value)
        await advance(clock, backend, [engine], 61)
        await advance(clock, backend, [engine], 1)
        assert not any(getattr(backend, name) for name in faults)  # (each fault was met)
        return backend
    finally:
        await engine.stop()


async def test_a_timer_that_finds_no_state_on_a_lagging_view_comes_again() -> None:
    # The timer fires while the bucket's new leader has not applied the state yet: the
    # reads (a replica's, then the leader's) find no key. Acknowledged then, the timer
    # would be gone for good.
    backend = await _timer_fires_with(stale_reads=2)
    assert json.loads(backend.peek("WAITER", "waiter.w1").value)["phase"] == "late"


async def test_a_timer_whose_compare_and_set_lost_comes_again() -> None:
    # The fired timer's evaluation is refused its compare-and-set (the revision it read
    # was a lagging replica's, or a new leader's view): acknowledged then, the timer
    # would be gone for good. It comes again and is evaluated on a new read.
    backend = await _timer_fires_with(stale_writes=1)
    assert json.loads(backend.peek("WAITER", "waiter.w1").value)["phase"] == "late"


async def test_stream_message_is_acked_only_after_its_effects_are_committed(
    metrics: EngineMetrics,
) -> None:
    clock = ManualClock()
    backend = FaultyBackend(clock, state_buckets=("REVIEWS",))
    async with TestEngine(Reviews, clock=clock, backend=backend, metrics=metrics) as te:
        backend.on_settle = lambda msg: te.state(Reviews, "p1")
        backend.failing_writes = 2
        await te.trigger_message("plans.submitted", Submitted(plan_id="p1", plan="x"))
        assert te.state(Reviews, "p1") is None
        for _ in range(4):  # redeliveries after nak(0.2 s), then nak(0.4 s)
            await te.advance(0.5)
        assert backend.failed_writes == 2
        settled = [(how, n, st) for how, s, n, st in backend.settled if s == "plans.submitted"]
        assert [(how, n) for how, n, _ in settled] == [("nak", 1), ("nak", 2), ("ack", 3)]
        assert settled[0][2] is None and settled[1][2] is None, (
            "nothing was committed before the naks"
        )
        acked = settled[2][2]
        assert acked is not None and acked.notes == ["accepted"], "the ack came after the commit"
        st = te.state(Reviews, "p1")
        assert (st.notes, st.status) == (["accepted"], Status.WAITING)
        assert [e.rule_id for e in st.timeline] == ["accept", "ask"]
        assert count(metrics.redeliveries, "reviews") == 2
