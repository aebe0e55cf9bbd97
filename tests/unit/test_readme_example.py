"""The README's example workflow, as written there: approve, revise loop, escalation, timeout."""

from __future__ import annotations

import msgspec
import pytest

from reactive import ExecutionState, RuleContext, Status, Workflow, rule
from reactive.conditions import phase_is
from reactive.testing import TestEngine


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


@pytest.mark.anyio
async def test_a_plan_revised_once_then_approved_completes() -> None:
    async with TestEngine(PlanReview) as te:
        verdicts = iter(["revise", "approved"])
        te.respond("reviewer.input", lambda req: {"verdict": next(verdicts)})
        await te.trigger_message("plans.submitted", PlanSubmitted(plan_id="p1", plan="x"))
        await te.wait_for_status(PlanReview, "p1", Status.COMPLETED)
        st = te.state(PlanReview, "p1")
        assert [(e.rule_id, e.action) for e in st.timeline] == [
            ("accept", "mutate"),
            ("request_review", "publish_async"),
            ("request_review", "callback"),
            ("revise", "mutate"),
            ("request_review", "publish_async"),
            ("request_review", "callback"),
            ("done", "complete"),
        ]
        te.assert_published("plans.approved", count=1)
        assert st.iteration == 1


@pytest.mark.anyio
async def test_a_plan_always_sent_back_escalates_at_max_iterations() -> None:
    async with TestEngine(PlanReview) as te:
        te.respond("reviewer.input", lambda req: {"verdict": "revise"})
        await te.trigger_message("plans.submitted", PlanSubmitted(plan_id="p1", plan="x"))
        await te.wait_for_status(PlanReview, "p1", Status.ESCALATED)
        st = te.state(PlanReview, "p1")
        assert st.iteration == 3
        assert "max iterations" in st.error
        te.assert_published("plans.escalated", count=1)


@pytest.mark.anyio
async def test_a_review_that_never_comes_back_fails_at_the_task_timeout() -> None:
    async with TestEngine(PlanReview) as te:
        await te.trigger_message("plans.submitted", PlanSubmitted(plan_id="p1", plan="x"))
        te.assert_status(PlanReview, "p1", Status.WAITING)
        await te.advance(301)
        te.assert_status(PlanReview, "p1", Status.FAILED)


@pytest.mark.anyio
async def test_a_restart_while_waiting_resumes_and_a_deadline_passed_while_down_times_out() -> None:
    async with TestEngine(PlanReview) as te:
        await te.trigger_message("plans.submitted", PlanSubmitted(plan_id="p1", plan="x"))
        await te.trigger_message("plans.submitted", PlanSubmitted(plan_id="p2", plan="y"))
        te.assert_status(PlanReview, "p1", Status.WAITING)
        await te.restart()
        await te.callback(PlanReview, "p1", {"verdict": "approved"})
        te.assert_status(PlanReview, "p1", Status.COMPLETED)
        await te.restart(down_for=601)  # past p2's 10-minute deadline while no engine ran
        te.assert_status(PlanReview, "p2", Status.TIMED_OUT)
        te.assert_published("plans.approved", count=1)
