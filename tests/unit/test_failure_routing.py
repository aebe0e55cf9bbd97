"""A failed or late task belongs to the workflow (issue "sagas", part 1): an async rule's
``on_error`` and ``on_timeout`` handlers, and its own ``timeout=``. Without a handler,
a failed task fails the execution and a late one fails or escalates it, as before."""

from __future__ import annotations

import msgspec
import pytest

from reactive import (
    DefinitionError,
    ExecutionState,
    LimitReached,
    Retry,
    RuleContext,
    Status,
    TaskFailure,
    Workflow,
    on_max_iterations,
    rule,
    when_cancelled,
)
from reactive.conditions import phase_in, phase_is
from reactive.graph import mermaid
from reactive.runtime.metrics import EngineMetrics
from reactive.testing import TestEngine

pytestmark = pytest.mark.anyio


class Order(ExecutionState):
    amount: int = 10
    why: str = ""


class Charge(msgspec.Struct):
    amount: int
    task_id: str = ""


class Charged(msgspec.Struct):
    receipt: str
    task_id: str = ""


def release_on(failure: TaskFailure, ctx: RuleContext[Order, None]) -> None:
    ctx.state.phase = "releasing"
    ctx.state.why = f"{failure.kind}: {failure.message}"


class Saga(Workflow, id="saga", state=Order, task_timeout="1h"):
    """Charge; release the reservation when the charge fails or takes too long."""

    @rule(watch_kv=True, when=phase_is("charging"), publish_async="pay.charge", timeout="30s")
    def charge(self, ctx: RuleContext[Order, None]) -> Charge:
        return Charge(amount=ctx.state.amount)

    @charge.on_result
    def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
        ctx.state.phase = "charged"

    @charge.on_error
    def declined(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        if failure.message == "explode":
            raise RuntimeError("the handler broke")
        release_on(failure, ctx)

    @charge.on_timeout
    def too_slow(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        release_on(failure, ctx)

    @rule(watch_kv=True, when=phase_is("releasing"), publish="stock.release", mutate=True)
    def release(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
        ctx.state.phase = "released"
        return {"order": ctx.execution_id}

    @rule(watch_kv=True, when=phase_in("charged", "released"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None: ...


class Plain(Workflow, id="plain", state=Order, task_timeout="1h"):
    """The same charge with its own timeout and no handlers."""

    @rule(watch_kv=True, when=phase_is("charging"), publish_async="pay.plain", timeout="30s")
    def charge(self, ctx: RuleContext[Order, None]) -> Charge:
        return Charge(amount=ctx.state.amount)

    @charge.on_result
    def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
        ctx.state.phase = "charged"

    @rule(watch_kv=True, when=phase_is("charged"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None: ...


def actions(st: Order) -> list[tuple[str, str]]:
    return [(e.rule_id, e.action) for e in st.timeline]


async def test_a_worker_error_goes_to_on_error_which_compensates() -> None:
    async with TestEngine(Saga) as te:
        await te.start(Saga, "o1", Order(phase="charging"))
        await te.callback(Saga, "o1", error="card declined")
        st = te.state(Saga, "o1")
        assert st.status is Status.COMPLETED
        assert st.why == "error: card declined"
        assert actions(st) == [
            ("charge", "publish_async"),
            ("charge", "on_error"),
            ("release", "publish"),
            ("done", "complete"),
        ]
        assert st.timeline[1].error == "card declined"
        assert te.published("stock.release") == [{"order": "o1"}]


async def test_a_result_that_does_not_decode_goes_to_on_error_as_invalid() -> None:
    async with TestEngine(Saga) as te:
        await te.start(Saga, "o1", Order(phase="charging"))
        await te.callback(Saga, "o1", {"receipt": 42})
        st = te.state(Saga, "o1")
        assert (st.status, st.phase) == (Status.COMPLETED, "released")
        assert st.why.startswith("invalid: its result does not decode")


async def test_a_late_task_goes_to_on_timeout_after_the_rules_own_timeout() -> None:
    async with TestEngine(Saga) as te:
        await te.start(Saga, "o1", Order(phase="charging"))
        task = te.state(Saga, "o1").pending_task_id
        await te.advance(29)
        assert te.state(Saga, "o1").status is Status.WAITING
        await te.advance(1)  # 30 s: the rule's timeout (the workflow's is an hour)
        st = te.state(Saga, "o1")
        assert (st.status, st.phase) == (Status.COMPLETED, "released")
        assert st.why == "timeout: no callback within 30s"
        assert ("charge", "on_timeout") in actions(st)
        # The answer that comes afterwards is ignored: the task is no longer pending.
        await te.callback(Saga, "o1", Charged(receipt="r1"), task_id=task)
        assert te.state(Saga, "o1").phase == "released"
        assert te.published("stock.release") == [{"order": "o1"}]


async def test_a_handler_that_raises_fails_the_execution() -> None:
    async with TestEngine(Saga) as te:
        await te.start(Saga, "o1", Order(phase="charging"))
        await te.callback(Saga, "o1", error="explode")
        st = te.state(Saga, "o1")
        assert st.status is Status.FAILED
        assert st.error == "error handler of charge raised RuntimeError: the handler broke"
        te.assert_not_published("stock.release")


async def test_without_handlers_a_failed_task_fails_and_the_rules_timeout_still_applies() -> None:
    async with TestEngine(Plain) as te:
        await te.start(Plain, "p1", Order(phase="charging"))
        await te.callback(Plain, "p1", error="card declined")
        st = te.state(Plain, "p1")
        assert st.status is Status.FAILED and "card declined" in st.error
        await te.start(Plain, "p2", Order(phase="charging"))
        await te.advance(30)
        st = te.state(Plain, "p2")
        assert st.status is Status.FAILED
        assert st.error.endswith("got no callback within 30s")


def test_failure_handlers_and_timeouts_only_on_async_rules_and_not_too_short() -> None:
    with pytest.raises(DefinitionError) as info:

        class Broken(Workflow, id="broken", state=Order):
            @rule(watch_kv=True, when=phase_is("a"), mutate=True, timeout="5s")
            def step(self, ctx: RuleContext[Order, None]) -> None: ...

            @step.on_error
            def oops(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None: ...

            @step.on_timeout
            def late(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None: ...

            @rule(watch_kv=True, when=phase_is("b"), publish_async="x.y", timeout="500ms")
            def ask(self, ctx: RuleContext[Order, None]) -> Charge:
                return Charge(amount=1)

            @ask.on_result
            def answered(self, ctx: RuleContext[Order, None], result: Charged) -> None: ...

    message = str(info.value)
    assert "Broken" in message and "step" in message and "ask" in message
    assert "on_error is only for publish_async rules" in message
    assert "on_timeout is only for publish_async rules" in message
    assert "timeout= is only for publish_async rules" in message
    assert "timeout '500ms' is shorter than the engine allows (at least 1s)" in message


# --------------------------------------------------------------------------- signals


class Signal(msgspec.Struct):
    order: str
    note: str = ""


class Signalled(Workflow, id="signalled", state=Order):
    """Started by ``orders.open``; ``orders.note`` only reaches executions that exist."""

    @rule(on_subject="orders.open", state_key=lambda m: m.order, mutate=True)
    def open(self, ctx: RuleContext[Order, Signal]) -> None:
        ctx.state.phase = "open"

    @rule(on_subject="orders.note", state_key=lambda m: m.order, mutate=True, create=False)
    def note(self, ctx: RuleContext[Order, Signal]) -> None:
        ctx.state.why = ctx.message.note


async def test_a_signal_that_must_not_create_is_terminated_and_counted_for_an_unknown_id(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Signalled, metrics=metrics) as te:
        await te.trigger_message("orders.note", Signal(order="ghost", note="hello"))
        assert te.state(Signalled, "ghost") is None
        assert metrics.unknown_executions.labels("signalled")._value.get() == 1
        await te.trigger_message("orders.open", Signal(order="o1"))
        await te.trigger_message("orders.note", Signal(order="o1", note="hello"))
        assert te.state(Signalled, "o1").why == "hello"
        assert metrics.unknown_executions.labels("signalled")._value.get() == 1


def test_create_false_only_on_message_and_state_rules() -> None:
    with pytest.raises(DefinitionError, match="create=False is only for message"):

        class Wrong(Workflow, id="wrong", state=Order):
            @rule(watch_kv=True, when=phase_is("a"), mutate=True, create=False)
            def step(self, ctx: RuleContext[Order, None]) -> None: ...


# --------------------------------------------------------------------------- max iterations


class Loop(ExecutionState):
    ticks: int = 0
    mode: str = "move on"
    why: str = ""


class Agent(Workflow, id="agent", state=Loop, max_iterations=3):
    """Loops until its budget is spent; then summarizes instead of escalating."""

    @rule(watch_kv=True, when=phase_is("thinking"), mutate=True)
    def think(self, ctx: RuleContext[Loop, None]) -> None:
        ctx.state.iteration += 1
        ctx.state.ticks += 1

    @on_max_iterations
    def out_of_budget(self, ctx: RuleContext[Loop, None], limit: LimitReached) -> None:
        if ctx.state.mode == "raise":
            raise ValueError("no budget left")
        if ctx.state.mode == "move on":
            ctx.state.phase = "summarizing"
            ctx.state.why = f"limit {limit.limit} by {limit.rule_id}"

    @rule(watch_kv=True, when=phase_is("summarizing"), complete=True)
    def summarize(self, ctx: RuleContext[Loop, None]) -> None: ...


async def test_the_max_iterations_handler_moves_the_execution_on() -> None:
    async with TestEngine(Agent) as te:
        await te.start(Agent, "a1", Loop(phase="thinking"))
        st = te.state(Agent, "a1")
        assert (st.status, st.phase, st.iteration, st.ticks) == (
            Status.COMPLETED,
            "summarizing",
            3,
            3,
        )
        assert st.why == "limit 3 by think"
        assert [a for _, a in actions(st)] == ["mutate"] * 3 + ["on_max_iterations", "complete"]


async def test_a_max_iterations_handler_that_changes_nothing_escalates_one_that_raises_fails() -> (
    None
):
    async with TestEngine(Agent) as te:
        await te.start(Agent, "idle", Loop(phase="thinking", mode="nothing"))
        assert te.state(Agent, "idle").status is Status.ESCALATED
        await te.start(Agent, "broken", Loop(phase="thinking", mode="raise"))
        st = te.state(Agent, "broken")
        assert st.status is Status.FAILED
        assert st.error == "max-iterations handler raised ValueError: no budget left"


def test_a_max_iterations_handler_needs_a_limit_and_is_one() -> None:
    with pytest.raises(DefinitionError) as info:

        class NoLimit(Workflow, id="no-limit", state=Loop):
            @rule(watch_kv=True, when=phase_is("a"), mutate=True)
            def step(self, ctx: RuleContext[Loop, None]) -> None: ...

            @on_max_iterations
            def spent(self, ctx: RuleContext[Loop, None], limit: LimitReached) -> None: ...

    assert "without a limit: give the workflow max_iterations=N" in str(info.value)
    with pytest.raises(DefinitionError, match="more than one @on_max_iterations handler"):

        class Two(Workflow, id="two", state=Loop, max_iterations=2):
            @rule(watch_kv=True, when=phase_is("a"), mutate=True)
            def step(self, ctx: RuleContext[Loop, None]) -> None: ...

            @on_max_iterations
            def one(self, ctx: RuleContext[Loop, None], limit: LimitReached) -> None: ...

            @on_max_iterations
            def other(self, ctx: RuleContext[Loop, None], limit: LimitReached) -> None: ...


# --------------------------------------------------------------------------- retries


class Retried(Workflow, id="retried", state=Order, task_timeout="1h"):
    """Charge with three attempts (1 s, then 2 s apart); a declined card is not retried."""

    @rule(
        watch_kv=True,
        when=phase_is("charging"),
        publish_async="pay.retried",
        timeout="30s",
        retry=Retry(attempts=3, backoff="1s", multiplier=2, non_retryable=("declined",)),
    )
    def charge(self, ctx: RuleContext[Order, None]) -> Charge:
        return Charge(amount=ctx.state.amount)

    @charge.on_result
    def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
        ctx.state.phase = "charged"

    @charge.on_error
    def gave_up(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        ctx.state.phase = "releasing"
        ctx.state.why = f"{failure.kind} on attempt {failure.attempt}: {failure.message}"

    @charge.on_timeout
    def too_slow(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        ctx.state.phase = "releasing"
        ctx.state.why = f"{failure.kind} on attempt {failure.attempt}: {failure.message}"

    @rule(watch_kv=True, when=phase_is("releasing"), mutate=True)
    def release(self, ctx: RuleContext[Order, None]) -> None:
        ctx.state.phase = "released"

    @rule(watch_kv=True, when=phase_in("charged", "released"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None: ...


async def test_a_failed_task_is_retried_with_backoff_each_attempt_a_new_task() -> None:
    async with TestEngine(Retried) as te:
        await te.start(Retried, "r1", Order(phase="charging"))
        first = te.state(Retried, "r1").pending_task_id
        await te.callback(Retried, "r1", error="busy")
        st = te.state(Retried, "r1")
        assert (st.status, st.pending_task_id, st.task_attempt) == (Status.WAITING, "", 1)
        await te.advance(0.9)
        assert len(te.published("pay.retried")) == 1  # (the backoff is 1 s)
        await te.advance(0.1)
        second = te.state(Retried, "r1").pending_task_id
        assert second and second != first and te.state(Retried, "r1").task_attempt == 2
        # The first attempt's answer, late: ignored.
        await te.callback(Retried, "r1", Charged(receipt="old"), task_id=first)
        assert te.state(Retried, "r1").pending_task_id == second
        await te.callback(Retried, "r1", error="busy")
        await te.advance(2)  # the second backoff: 2 s
        await te.callback(Retried, "r1", Charged(receipt="r3"))
        st = te.state(Retried, "r1")
        assert (st.status, st.phase) == (Status.COMPLETED, "charged")
        requests = te.published("pay.retried")
        assert len({r["task_id"] for r in requests}) == 3
        assert [a for _, a in actions(st)] == [
            "publish_async",
            "retry_later",
            "retry",
            "retry_later",
            "retry",
            "callback",
            "complete",
        ]


async def test_a_non_retryable_error_and_the_last_attempt_go_to_the_handlers() -> None:
    async with TestEngine(Retried) as te:
        await te.start(Retried, "d1", Order(phase="charging"))
        await te.callback(Retried, "d1", error="declined: insufficient funds")
        st = te.state(Retried, "d1")
        assert (st.phase, st.why) == (
            "released",
            "error on attempt 1: declined: insufficient funds",
        )
        # Timeouts are retried too; after the third attempt the timeout handler takes it.
        await te.start(Retried, "t1", Order(phase="charging"))
        await te.advance(30 + 1 + 30 + 2 + 30)
        st = te.state(Retried, "t1")
        assert (st.status, st.phase) == (Status.COMPLETED, "released")
        assert st.why == "timeout on attempt 3: no callback within 30s"
        assert len(te.published("pay.retried")) == 4  # d1's one, t1's three


def test_retry_only_on_async_rules_and_within_the_engines_limits() -> None:
    with pytest.raises(DefinitionError) as info:

        class BadRetry(Workflow, id="bad-retry", state=Order):
            @rule(watch_kv=True, when=phase_is("a"), publish="x.y", retry=Retry())
            def tell(self, ctx: RuleContext[Order, None]) -> dict[str, int]:
                return {}

            @rule(
                watch_kv=True,
                when=phase_is("b"),
                publish_async="x.z",
                retry=Retry(attempts=0, backoff="10ms"),
            )
            def ask(self, ctx: RuleContext[Order, None]) -> Charge:
                return Charge(amount=1)

            @ask.on_result
            def answered(self, ctx: RuleContext[Order, None], result: Charged) -> None: ...

    message = str(info.value)
    assert "retry= is only for publish_async rules" in message
    assert "retry: attempts must be an int of at least 1, got 0" in message
    assert "retry: backoff '10ms' is shorter than the engine allows (at least 1s)" in message


# --------------------------------------------------------------------------- cancellation


class Cancellable(Workflow, id="cancellable", state=Order, on_cancel="orders.cancelled"):
    """Charge; a cancellation releases the reservation first (a compensation)."""

    @rule(watch_kv=True, when=phase_is("charging"), publish_async="pay.cancellable")
    def charge(self, ctx: RuleContext[Order, None]) -> Charge:
        return Charge(amount=ctx.state.amount)

    @charge.on_result
    def charged(self, ctx: RuleContext[Order, None], result: Charged) -> None:
        ctx.state.phase = "charged"

    @when_cancelled
    def compensate(self, ctx: RuleContext[Order, None], reason: str) -> None:
        if ctx.state.amount > 0:  # (an order of 0 has nothing to undo: cancelled at once)
            ctx.state.phase = "releasing"
            ctx.state.why = reason

    @rule(watch_kv=True, when=phase_is("releasing"), publish="stock.release", mutate=True)
    def release(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
        ctx.state.cancel(ctx.state.why)
        return {"order": ctx.execution_id}


async def test_a_cancellation_runs_the_compensation_and_ignores_a_late_answer(
    metrics: EngineMetrics,
) -> None:
    async with TestEngine(Cancellable, metrics=metrics) as te:
        await te.start(Cancellable, "c1", Order(phase="charging"))
        task = te.state(Cancellable, "c1").pending_task_id
        await te.cancel(Cancellable, "c1", "customer changed their mind")
        st = te.state(Cancellable, "c1")
        assert (st.status, st.error) == (Status.CANCELLED, "customer changed their mind")
        assert [a for _, a in actions(st)] == ["publish_async", "on_cancel", "publish"]
        assert te.published("stock.release") == [{"order": "c1"}]
        [event] = te.published("orders.cancelled")
        assert (event["execution_id"], event["reason"]) == ("c1", "customer changed their mind")
        # The worker's answer, afterwards: ignored, and counted.
        await te.callback(Cancellable, "c1", Charged(receipt="late"), task_id=task)
        assert te.state(Cancellable, "c1").status is Status.CANCELLED
        assert metrics.executions_cancelled.labels("cancellable")._value.get() == 1


async def test_a_cancellation_without_compensation_ends_it_and_an_ended_one_stays() -> None:
    async with TestEngine(Cancellable) as te:
        await te.start(Cancellable, "c0", Order(phase="charging", amount=0))
        await te.cancel(Cancellable, "c0", "no longer needed")
        st = te.state(Cancellable, "c0")
        assert (st.status, st.error, st.pending_task_id) == (
            Status.CANCELLED,
            "no longer needed",
            "",
        )
        await te.cancel(Cancellable, "c0", "again")  # ended: left as it is
        assert te.state(Cancellable, "c0").error == "no longer needed"
        await te.cancel(Cancellable, "ghost", "never existed")
        assert te.state(Cancellable, "ghost") is None


def test_graph_draws_the_failure_retry_limit_and_cancel_edges() -> None:
    retried = mermaid(Retried)
    assert 'wait_charge -. "retry: 3 attempts, backoff 1s" .-> wait_charge' in retried
    assert 'wait_charge -. "error: gave_up" .-> phase_releasing' in retried
    assert 'wait_charge -. "no result in 30s: too_slow" .-> phase_releasing' in retried
    assert 'any_phase -. "iteration > 3: out_of_budget" .-> phase_summarizing' in mermaid(Agent)
    cancellable = mermaid(Cancellable)
    assert 'any_phase -. "cancel: compensate" .-> phase_releasing' in cancellable
    assert 'phase_releasing -- "release: publish stock.release" --> status_cancelled' in cancellable
    assert "status_cancelled -.-> event_orders_cancelled" in cancellable
    assert 'wait_charge -. "error" .-> status_failed' in cancellable  # (no handler: fails)


# --------------------------------------------------------------------------- timer rules


class Reminders(Workflow, id="reminders", state=Order):
    """While payment is awaited: a reminder every 10 minutes; after 45 minutes, give up."""

    @rule(watch_kv=True, when=phase_is("awaiting"), every="10m", publish="reminders.send")
    def remind(self, ctx: RuleContext[Order, None]) -> dict[str, str]:
        return {"order": ctx.execution_id}

    @rule(watch_kv=True, when=phase_is("awaiting"), after="45m", mutate=True)
    def give_up(self, ctx: RuleContext[Order, None]) -> None:
        ctx.state.phase = "abandoned"

    @rule(watch_kv=True, when=phase_is("abandoned"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None: ...

    @rule(on_subject="reminders.note", state_key=lambda m: m.order, mutate=True, create=False)
    def noted(self, ctx: RuleContext[Order, Signal]) -> None:
        ctx.state.why = ctx.message.note


async def test_timer_rules_fire_after_a_quiet_time_and_every_period_and_survive_a_restart() -> None:
    async with TestEngine(Reminders) as te:
        await te.start(Reminders, "o1", Order(phase="awaiting"))
        await te.advance(599)
        te.assert_not_published("reminders.send")
        await te.advance(1)  # 10 minutes unchanged
        assert len(te.published("reminders.send")) == 1
        await te.advance(600)
        assert len(te.published("reminders.send")) == 2
        await te.restart()  # the next ticks are schedules in NATS, not in the engine
        await te.advance(1200)
        assert len(te.published("reminders.send")) == 4  # at 30 and 40 minutes
        await te.advance(300)  # 45 minutes: given up
        st = te.state(Reminders, "o1")
        assert (st.status, st.phase) == (Status.COMPLETED, "abandoned")
        await te.advance(3600)
        assert len(te.published("reminders.send")) == 4  # its conditions no longer hold


async def test_a_change_starts_a_timer_rules_wait_again() -> None:
    async with TestEngine(Reminders) as te:
        await te.start(Reminders, "o1", Order(phase="awaiting"))
        await te.advance(40 * 60)
        assert len(te.published("reminders.send")) == 4
        # A transition (the customer wrote): 45 minutes unchanged starts again.
        await te.trigger_message("reminders.note", Signal(order="o1", note="wrote"))
        await te.advance(40 * 60)
        assert te.state(Reminders, "o1").phase == "awaiting"
        await te.advance(5 * 60)
        assert te.state(Reminders, "o1").phase == "abandoned"


def test_timer_rules_only_on_kv_rules_one_kind_and_not_too_short() -> None:
    with pytest.raises(DefinitionError) as info:

        class BadTimers(Workflow, id="bad-timers", state=Order):
            @rule(on_subject="x.y", state_key=lambda m: m.order, mutate=True, after="1m")
            def on_message(self, ctx: RuleContext[Order, Signal]) -> None: ...

            @rule(watch_kv=True, when=phase_is("a"), mutate=True, after="1m", every="1m")
            def both(self, ctx: RuleContext[Order, None]) -> None: ...

            @rule(watch_kv=True, when=phase_is("b"), mutate=True, every="100ms")
            def fast(self, ctx: RuleContext[Order, None]) -> None: ...

    message = str(info.value)
    assert "after= is only for watch_kv rules" in message
    assert "after= and every= together" in message
    assert "every '100ms' is shorter than the engine allows (at least 1s)" in message
