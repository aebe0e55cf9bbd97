"""Child workflows (issue "sagas", item 8): a ``child=`` rule starts an execution of another
workflow and waits for its end as its task's answer: completed -> ``on_result`` with the
child's final state; failed, escalated, timed out, cancelled -> ``on_error``; no end in
time -> ``on_timeout`` (and the child is cancelled); cancelling the parent cancels the child."""

from __future__ import annotations

import pytest

from reactive import (
    DefinitionError,
    ExecutionState,
    Retry,
    RuleContext,
    Status,
    TaskFailure,
    Workflow,
    rule,
    when_cancelled,
)
from reactive.conditions import phase_is
from reactive.graph import mermaid
from reactive.lint import lint
from reactive.runtime.children import child_id
from reactive.testing import TestEngine
from reactive.testing.strategies import machine_settings, workflow_test

pytestmark = pytest.mark.anyio


class Shipment(ExecutionState):
    order: str = ""
    carrier: str = ""
    tracking: str = ""
    released: bool = False


class Ship(Workflow, id="ship", state=Shipment, timeout="2h"):
    """Books a carrier; ends as the order's address says (the test's ``carrier``)."""

    @rule(watch_kv=True, when=phase_is(""), mutate=True)
    def book(self, ctx: RuleContext[Shipment, None]) -> None:
        if ctx.state.carrier == "none":
            ctx.state.fail("no carrier serves this address")
        elif ctx.state.carrier == "slow":
            ctx.state.phase = "waiting"  # until its deadline, or a cancel
        else:
            ctx.state.phase, ctx.state.tracking = "booked", f"T-{ctx.state.order}"

    @rule(watch_kv=True, when=phase_is("booked"), complete=True)
    def done(self, ctx: RuleContext[Shipment, None]) -> None: ...

    @when_cancelled
    def release(self, ctx: RuleContext[Shipment, None], reason: str) -> None:
        ctx.state.released = True
        ctx.state.cancel(reason)


class Order(ExecutionState):
    carrier: str = ""
    tracking: str = ""
    why: str = ""
    attempts: int = 0


class Orders(Workflow, id="orders", state=Order):
    @rule(watch_kv=True, when=phase_is("shipping"), child=Ship, timeout="3h")
    def ship(self, ctx: RuleContext[Order, None]) -> Shipment:
        ctx.state.attempts += 1
        return Shipment(order=ctx.execution_id, carrier=ctx.state.carrier)

    @ship.on_result
    def shipped(self, ctx: RuleContext[Order, None], result: Shipment) -> None:
        ctx.state.phase, ctx.state.tracking = "shipped", result.tracking

    @ship.on_error
    def not_shipped(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        ctx.state.phase, ctx.state.why = "refund", failure.message

    @ship.on_timeout
    def too_slow(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        ctx.state.phase, ctx.state.why = "refund", f"timeout: {failure.message}"

    @rule(watch_kv=True, when=phase_is("shipped"), complete=True)
    def done(self, ctx: RuleContext[Order, None]) -> None: ...


def the_child(te: TestEngine, parent: str) -> Shipment:
    (child,) = [s for s in te.executions(Ship) if s.order == parent]
    return child


async def test_a_completed_child_is_the_parents_result() -> None:
    async with TestEngine(Orders, Ship) as te:
        await te.start(Orders, "o1", Order(phase="shipping", carrier="ups"))
        parent = te.state(Orders, "o1")
        assert (parent.status, parent.phase, parent.tracking) == (
            Status.COMPLETED,
            "shipped",
            "T-o1",
        )
        child = the_child(te, "o1")
        assert child.status is Status.COMPLETED
        assert child.parent is not None
        assert (child.parent.workflow, child.parent.id, child.parent.rule_id) == (
            "orders",
            "o1",
            "ship",
        )
        # The child's id is the task's: an outbox delivered again starts it once.
        assert child.id == child_id(child.parent.task_id)
        assert [t.rule_id for t in parent.timeline] == ["ship", "ship", "done"]


async def test_a_failed_child_goes_to_the_error_handler() -> None:
    async with TestEngine(Orders, Ship) as te:
        await te.start(Orders, "o2", Order(phase="shipping", carrier="none"))
        parent = te.state(Orders, "o2")
        assert parent.phase == "refund"
        assert parent.why.startswith("child ship.") and parent.why.endswith(
            "failed: no carrier serves this address"
        )


async def test_a_child_that_times_out_goes_to_the_error_handler() -> None:
    async with TestEngine(Orders, Ship) as te:
        await te.start(Orders, "o3", Order(phase="shipping", carrier="slow"))
        await te.advance(2 * 3600)  # the child's own deadline
        assert the_child(te, "o3").status is Status.TIMED_OUT
        parent = te.state(Orders, "o3")
        assert parent.phase == "refund" and "timed_out" in parent.why


class Impatient(Workflow, id="impatient", state=Order):
    @rule(watch_kv=True, when=phase_is("shipping"), child=Ship, timeout="10m")
    def ship(self, ctx: RuleContext[Order, None]) -> Shipment:
        return Shipment(order=ctx.execution_id, carrier=ctx.state.carrier)

    @ship.on_result
    def shipped(self, ctx: RuleContext[Order, None], result: Shipment) -> None:
        ctx.state.phase = "shipped"

    @ship.on_timeout
    def too_slow(self, ctx: RuleContext[Order, None], failure: TaskFailure) -> None:
        ctx.state.phase, ctx.state.why = "gave-up", failure.message


async def test_a_parent_that_waits_no_longer_cancels_its_child_and_ignores_its_end() -> None:
    async with TestEngine(Impatient, Ship) as te:
        await te.start(Impatient, "o4", Order(phase="shipping", carrier="slow"))
        await te.advance(600)
        assert te.state(Impatient, "o4").phase == "gave-up"
        child = the_child(te, "o4")
        # The child's own cancellation handler ran (its compensation).
        assert (child.status, child.released) == (Status.CANCELLED, True)
        assert "parent impatient.o4: its task timed out" in child.error
        # Its end reached the parent, which no longer waited for it: ignored.
        assert te.state(Impatient, "o4").phase == "gave-up"


async def test_cancelling_the_parent_cancels_the_child() -> None:
    async with TestEngine(Orders, Ship) as te:
        await te.start(Orders, "o5", Order(phase="shipping", carrier="slow"))
        await te.cancel(Orders, "o5", "customer changed their mind")
        assert te.state(Orders, "o5").status is Status.CANCELLED
        child = the_child(te, "o5")
        assert child.status is Status.CANCELLED and child.released
        assert child.error == "parent orders.o5: customer changed their mind"


class Retrying(Workflow, id="retrying", state=Order):
    @rule(
        watch_kv=True,
        when=phase_is("shipping"),
        child=Ship,
        retry=Retry(attempts=2, backoff="1m"),
    )
    def ship(self, ctx: RuleContext[Order, None]) -> Shipment:
        # The second attempt asks another carrier.
        ctx.state.attempts += 1
        carrier = ctx.state.carrier if ctx.state.attempts == 1 else "dhl"
        return Shipment(order=f"{ctx.execution_id}-{carrier}", carrier=carrier)

    @ship.on_result
    def shipped(self, ctx: RuleContext[Order, None], result: Shipment) -> None:
        ctx.state.phase, ctx.state.tracking = "shipped", result.tracking


async def test_a_retry_starts_a_new_child() -> None:
    async with TestEngine(Retrying, Ship) as te:
        await te.start(Retrying, "o6", Order(phase="shipping", carrier="none"))
        await te.advance(60)
        parent = te.state(Retrying, "o6")
        assert (parent.phase, parent.tracking) == ("shipped", "T-o6-dhl")
        statuses = sorted(s.status.value for s in te.executions(Ship))
        assert statuses == ["completed", "failed"]


async def test_a_child_rule_must_return_the_childs_state() -> None:
    class Wrong(Workflow, id="wrong", state=Order):
        @rule(watch_kv=True, when=phase_is("shipping"), child=Ship)
        def ship(self, ctx: RuleContext[Order, None]) -> Order:
            return Order()

        @ship.on_result
        def shipped(self, ctx: RuleContext[Order, None], result: Shipment) -> None: ...

    async with TestEngine(Wrong, Ship) as te:
        await te.start(Wrong, "w", Order(phase="shipping"))
        st = te.state(Wrong, "w")
        assert st.status is Status.FAILED
        assert "a child= rule returns the first state of its child, a Shipment" in st.error
        assert te.executions(Ship) == []


def test_child_mistakes_are_refused_at_class_creation() -> None:
    with pytest.raises(DefinitionError) as info:

        class Bad(Workflow, id="bad-children", state=Order):
            @rule(watch_kv=True, when=phase_is("a"), child=Shipment)
            def not_a_workflow(self, ctx: RuleContext[Order, None]) -> None: ...

            @rule(watch_kv=True, when=phase_is("b"), child=Ship)
            def no_handler(self, ctx: RuleContext[Order, None]) -> None: ...

            @rule(watch_kv=True, when=phase_is("c"), child=Ship, publish="x.y")
            def two(self, ctx: RuleContext[Order, None]) -> None: ...

    message = str(info.value)
    assert "rule 'not_a_workflow': child= takes a Workflow class" in message
    assert "rule 'no_handler': child= without a result handler" in message
    assert "rule 'two': two actions on one rule (publish and child)" in message


def test_the_graph_draws_the_child() -> None:
    graph = mermaid(Orders)
    assert 'phase_shipping -- "ship: child ship" --> wait_ship' in graph
    # (The handlers set the phase in a tuple assignment: read as well.)
    assert 'wait_ship -- "result: shipped" --> phase_shipped' in graph
    assert 'wait_ship -. "error: not_shipped" .-> phase_refund' in graph


def test_lint_reads_tuple_assignments_and_names_every_handler() -> None:
    findings = lint(Orders, explore=0)
    assert not any(f.kind == "unentered-phase" and f.phase == "shipped" for f in findings)
    (stuck,) = [f for f in findings if f.kind == "stuck-after-result"]
    assert stuck.reason.startswith("its handlers (shipped, not_shipped, too_slow) can move")


# A property test: parents and their children under drawn events (messages, callbacks,
# cancellations, clock moves, restarts), every invariant of both workflows checked.
TestChildrenProperties = workflow_test(
    Orders, Ship, settings=machine_settings(max_examples=40), report_unreached=False
)
TestImpatientProperties = workflow_test(
    Impatient, Ship, settings=machine_settings(max_examples=40), report_unreached=False
)
