"""What invariants see of an execution (state, timeline, published messages), and the shortest
property test of a workflow: ``workflow_test``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test
from saga_planted import saga

from reactive import Status
from reactive.testing.strategies import (
    Callback,
    Execution,
    Message,
    workflow_machine,
    workflow_test,
)

REPO = Path(__file__).resolve().parents[2]
pr = sys.modules.get("reactive_example_plan_review")
if pr is None:
    from reactive.__main__ import load_example

    pr = load_example(REPO / "examples" / "plan_review.py")

# A property test of a workflow with the default invariants, as a user writes it: one line
# (and its import). pytest collects it; it runs machine_settings()' 100 examples.
TestPlanReviewProperties = workflow_test(pr.PlanReview)


def test_workflow_test_is_a_test_case_with_the_machine_settings() -> None:
    import unittest

    assert issubclass(TestPlanReviewProperties, unittest.TestCase)
    assert TestPlanReviewProperties.__module__ == __name__  # reported where it is written
    assert TestPlanReviewProperties.settings.deadline is None


def test_an_invariant_sees_the_published_messages_and_the_timeline() -> None:
    seen: dict[str, Execution] = {}

    def remember(execution: Execution) -> None:
        seen[execution.id] = execution

    machine = workflow_machine(saga.OrderSaga, invariants=[remember])()
    try:
        order = saga.OrderPlaced(order_id="o1", sku="mug", quantity=1, amount_cents=1)
        machine.apply(Message(saga.PLACED, order))
        machine.engine_invariants()
        assert [m.subject for m in seen["o1"].published] == [saga.INVENTORY_RESERVE]
        for rule_id, result in (
            ("reserve", saga.Reservation(task_id="", reserved=True, reservation_id="r1")),
            ("charge", saga.Payment(task_id="", approved=False, reason="no funds")),
        ):
            machine.apply(Callback(saga.OrderSaga.__reactive__.id, "o1", ((rule_id, result),)))
        machine.engine_invariants()
        ex = seen["o1"]
        assert ex.status is Status.FAILED and ex.phase == "released"
        assert [m.subject for m in ex.published] == [
            saga.INVENTORY_RESERVE,
            saga.PAYMENTS,
            saga.INVENTORY_RELEASE,  # the compensation, by a rule that writes state
            saga.FAILED,  # the lifecycle event
        ]
        assert ex.sent(saga.INVENTORY_RELEASE, saga.ReleaseStock) == [
            saga.ReleaseStock(order_id="o1", reservation_id="r1", reason="no funds")
        ]
        assert ex.sent("orders.*")[0]["error"] == "payment declined: no funds"
        assert {"reserving", "charging", "payment_declined", "released"} <= ex.phases
        assert [e.rule_id for e in ex.timeline] == [
            "place",
            "reserve",
            "reserve",
            "charge",
            "charge",
            "release",
        ]
        assert machine.execution(saga.OrderSaga, "o1") is not None
        assert machine.execution(saga.OrderSaga, "nope") is None
    finally:
        machine.host.close()


def test_a_failing_invariant_fails_the_run_with_its_message() -> None:
    def nothing_fails(execution: Execution) -> None:
        assert execution.status is not Status.FAILED, f"{execution.id} failed"

    machine = workflow_machine(saga.OrderSaga, invariants=[nothing_fails])
    with pytest.raises(AssertionError, match="failed"):
        run_state_machine_as_test(
            machine,
            settings=settings(
                machine.TestCase.settings, max_examples=50, database=None, derandomize=True
            ),
        )
