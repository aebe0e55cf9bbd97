"""A user's workflow, as the README writes one: it must type-check under ``mypy --strict``
against the installed package (tests/unit/test_typed_package.py)."""

from __future__ import annotations

import msgspec

from reactive import Engine, ExecutionState, NatsBackend, RuleContext, Status, Workflow, rule
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
    timeout="10m",
    max_iterations=3,
    on_complete="plans.approved",
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

    @rule(watch_kv=True, when=phase_is("approved"), complete=True)
    def done(self, ctx: RuleContext[Review, None]) -> None: ...


async def run() -> list[str]:
    async with Engine(NatsBackend("nats://127.0.0.1:4222"), [PlanReview]) as engine:
        await engine.publish("plans.submitted", PlanSubmitted(plan_id="p1", plan="..."))
        final = await engine.wait_for(PlanReview, "p1")
        return [e.rule_id for e in final.timeline]


async def check() -> None:
    async with TestEngine(PlanReview) as te:
        te.respond("reviewer.input", lambda req: {"verdict": "approved"})
        await te.trigger_message("plans.submitted", PlanSubmitted(plan_id="p1", plan="..."))
        te.assert_status(PlanReview, "p1", Status.COMPLETED)
