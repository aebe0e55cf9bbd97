"""Test your workflows in process: an in-memory engine with assertions and waits.

``TestEngine`` runs the real engine on the in-memory backend (same semantics as
NATS JetStream: revisions, compare-and-set, watches with replay, durable
consumers) and a manual clock, so timeouts and cooldowns are tested by moving
time, never by sleeping::

    async with TestEngine(PlanReview) as te:
        te.respond("reviewer.input", lambda req: ReviewResult(task_id=req["task_id"], verdict="approved"))
        await te.trigger_message("plans.submitted", PlanSubmitted(plan_id="p1", plan="..."))
        te.assert_status(PlanReview, "p1", Status.COMPLETED)
        te.assert_published("plans.approved")

Property-based tests of a rule set live in ``reactive.testing.strategies``:
``TestOrders = workflow_test(Orders)`` is one (a Hypothesis state machine that
drives the engine with progress-biased events and checks its invariants after
every step), with the strategies it is made of.
"""

from __future__ import annotations

from reactive.backends.memory import PublishedMessage
from reactive.testing._engine import TestEngine

__all__ = ["PublishedMessage", "TestEngine"]

TestEngine.__module__ = __name__  # shown as reactive.testing.TestEngine
