"""Plan review: a plan is reviewed by an asynchronous reviewer until it is approved.

The loop:

1. A plan arrives on ``plans.submitted`` (message + state: the message's
   ``plan_id`` names the execution, which is started by it). A resubmission of
   a plan already taken in is ignored (``max_firings=1``).
2. ``request_review`` asks the reviewer (``publish_async="reviewer.input"``);
   the execution waits for its callback.
3. ``reviewed`` handles the verdict: ``approved`` ends the execution
   (``complete=True``: the ``plans.approved`` event), ``revise`` sends it
   round the loop: ``revise`` takes the feedback into the plan, counts an
   iteration and submits it again.
4. A plan that would need a fourth revision passes ``max_iterations=3`` and
   is escalated (the ``plans.escalated`` event). A reviewer that does not
   answer within ``task_timeout`` fails the execution (``plans.failed``).

The simulated reviewer (``reviewer_worker``) is written against the backend
interface, so the same coroutine serves the in-memory backend and NATS. It is
deterministic: it wants every topic of ``CHECKLIST`` covered and asks for the
first missing one; each revision adds the section asked for. A plan missing k
topics is therefore approved after k revisions, and escalated when k > 3.

Run it::

    python -m reactive demo examples/plan_review.py
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from reactive import Engine, ExecutionState, RuleContext, Status, Workflow, rule
from reactive.backends.base import Backend
from reactive.conditions import phase_is

log = logging.getLogger("reactive.examples.plan_review")

#: What the reviewer wants a plan to cover, in the order it asks for them.
CHECKLIST = ("scope", "tests", "rollback", "monitoring")

SUBMITTED = "plans.submitted"
REVIEWER = "reviewer.input"
APPROVED = "plans.approved"
FAILED = "plans.failed"
ESCALATED = "plans.escalated"


# --------------------------------------------------------------------------- types


class Review(ExecutionState):
    """The state of one plan's review."""

    title: str = ""
    plan: str = ""
    verdict: str = ""
    feedback: str = ""
    missing: str = ""  # the checklist topic the last review asked for
    reviews: int = 0


class PlanSubmitted(msgspec.Struct):
    plan_id: str
    title: str
    plan: str


class ReviewRequest(msgspec.Struct):
    plan_id: str
    title: str
    plan: str
    revision: int = 0
    # Callback fields: the engine fills them in.
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class ReviewResult(msgspec.Struct):
    task_id: str
    verdict: str  # "approved" or "revise"
    feedback: str = ""
    missing: str = ""


# --------------------------------------------------------------------------- the workflow


class PlanReview(
    Workflow,
    id="plan-review",
    state=Review,
    bucket="PLAN_REVIEW",
    timeout="10m",
    task_timeout="1m",
    max_iterations=3,
    on_complete=APPROVED,
    on_fail=FAILED,
    on_escalate=ESCALATED,
):
    """A plan goes to the reviewer until it is approved, or escalated after three revisions."""

    @rule(
        on_subject=SUBMITTED,
        stream="PLANS",
        state_key=lambda m: m.plan_id,
        mutate=True,
        max_firings=1,
    )
    def submit(self, ctx: RuleContext[Review, PlanSubmitted]) -> None:
        """Take the plan in (once per plan id)."""
        ctx.state.title = ctx.message.title
        ctx.state.plan = ctx.message.plan
        ctx.state.phase = "submitted"

    @rule(watch_kv=True, when=phase_is("submitted"), publish_async=REVIEWER)
    def request_review(self, ctx: RuleContext[Review, None]) -> ReviewRequest:
        """Ask the reviewer; the execution waits for the verdict."""
        st = ctx.state
        return ReviewRequest(plan_id=st.id, title=st.title, plan=st.plan, revision=st.iteration)

    @request_review.on_result
    def reviewed(self, ctx: RuleContext[Review, None], result: ReviewResult) -> None:
        st = ctx.state
        st.reviews += 1
        st.verdict = result.verdict
        st.feedback = result.feedback
        st.missing = result.missing
        st.phase = "approved" if result.verdict == "approved" else "revise"

    @rule(watch_kv=True, when=phase_is("revise"), mutate=True)
    def revise(self, ctx: RuleContext[Review, None]) -> None:
        """Address the feedback (add the section asked for) and submit the plan again."""
        st = ctx.state
        st.iteration += 1
        st.plan += f"\n{st.missing.capitalize()}: added in revision {st.iteration} ({st.feedback})."
        st.phase = "submitted"

    @rule(watch_kv=True, when=phase_is("approved"), complete=True)
    def approve(self, ctx: RuleContext[Review, None]) -> None:
        """Approved: the execution completes and ``plans.approved`` is published."""


WORKFLOWS: list[type[Workflow]] = [PlanReview]


# --------------------------------------------------------------------------- the simulated reviewer


def review_plan(request: ReviewRequest) -> ReviewResult:
    """The reviewer's decision: approve once every checklist topic is covered.

    Deterministic: it depends on the plan text only.
    """
    text = request.plan.lower()
    missing = [topic for topic in CHECKLIST if topic not in text]
    if not missing:
        return ReviewResult(task_id=request.task_id, verdict="approved", feedback="looks good")
    topic = missing[0]
    return ReviewResult(
        task_id=request.task_id,
        verdict="revise",
        feedback=f"please add a section on {topic}",
        missing=topic,
    )


async def reviewer_worker(
    backend: Backend,
    *,
    subject: str = REVIEWER,
    decide: Callable[[ReviewRequest], ReviewResult] = review_plan,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve review requests until cancelled: read ``subject``, publish each verdict to its callback subject.

    Start it with ``await task_group.start(reviewer_worker, backend)``: it
    reports started once it is subscribed, so no request is missed.
    """
    async with backend.subscribe(subject, queue="plan-reviewers") as requests:
        task_status.started()
        async for msg in requests:
            try:
                request = msgspec.json.decode(msg.data, type=ReviewRequest)
            except msgspec.DecodeError as e:
                log.warning("reviewer: ignoring an undecodable request: %s", e)
                continue
            reply_to = request.callback_subject or msg.headers.get("Reactive-Callback-Subject", "")
            if not request.task_id:
                request.task_id = msg.headers.get("Reactive-Task-Id", "")
            if not reply_to:
                log.warning("reviewer: request for %s has no callback subject", request.plan_id)
                continue
            await backend.publish(reply_to, msgspec.json.encode(decide(request)))


# --------------------------------------------------------------------------- the demo

#: The demo's plans: approved at once, approved after one revision, escalated.
DEMO_PLANS = [
    PlanSubmitted(
        plan_id="plan-cache",
        title="Read-through cache for the catalogue API",
        plan=(
            "Scope: the catalogue read path only.\n"
            "Tests: load tests at twice the peak.\n"
            "Rollback: a feature flag turns the cache off.\n"
            "Monitoring: hit ratio and p99 latency dashboards."
        ),
    ),
    PlanSubmitted(
        plan_id="plan-migration",
        title="Move sessions to the new database",
        plan=(
            "Scope: the session store.\n"
            "Tests: replay a day of production traffic.\n"
            "Monitoring: error rate alerts during the switch."
        ),
    ),
    PlanSubmitted(
        plan_id="plan-rewrite",
        title="Rewrite billing over a weekend",
        plan="Rewrite the billing service from scratch and ship it on Monday.",
    ),
]

#: What each demo plan should end as.
EXPECTED = {
    "plan-cache": Status.COMPLETED,
    "plan-migration": Status.COMPLETED,
    "plan-rewrite": Status.ESCALATED,
}


async def run_demo(
    backend: Backend,
    engine: Engine,
    out: Callable[[str], None] = print,
    *,
    timeout: float = 20.0,
) -> None:
    """Submit the demo plans to a running engine, wait for each to end, print their timelines."""
    await engine.wait_ready(timeout)
    events: list[tuple[str, dict[str, Any]]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(reviewer_worker, backend)
        await tg.start(collect_events, backend, [APPROVED, FAILED, ESCALATED], events)
        for plan in DEMO_PLANS:
            out(f"submitting {plan.plan_id}: {plan.title}")
            await engine.publish(SUBMITTED, plan)
        states = [await engine.wait_for(PlanReview, p.plan_id, timeout=timeout) for p in DEMO_PLANS]
        # The lifecycle event goes out just after the state write that ends an execution.
        with anyio.move_on_after(5.0):
            while len(events) < len(states):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    for st in states:
        out("")
        for line in format_timeline(st):
            out(line)
    out("")
    out("lifecycle events:")
    for subject, event in events:
        detail = event.get("reason") or event.get("error") or event.get("final_phase", "")
        out(f"  {subject:<16} {event.get('execution_id', '?'):<16} {detail}")


# --------------------------------------------------------------------------- helpers (each example has its own copy)


async def collect_events(
    backend: Backend,
    subjects: list[str],
    into: list[tuple[str, dict[str, Any]]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Append every message on ``subjects`` to ``into`` as (subject, decoded JSON) until cancelled."""
    async with anyio.create_task_group() as tg:
        for subject in subjects:
            await tg.start(_collect_one, backend, subject, into)
        task_status.started()


async def _collect_one(
    backend: Backend,
    subject: str,
    into: list[tuple[str, dict[str, Any]]],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    async with backend.subscribe(subject) as messages:
        task_status.started()
        async for msg in messages:
            into.append((msg.subject, msgspec.json.decode(msg.data)))


def format_timeline(state: ExecutionState) -> list[str]:
    """An execution's history as aligned text lines: a header, then one line per entry."""
    head = (
        f"{state.workflow_id}/{state.id}: {state.status.value}"
        f"  phase={state.phase or '-'}  iteration={state.iteration}"
    )
    if state.error:
        head += f"  error={state.error!r}"
    lines = [
        head,
        f"  {'time (UTC)':<12}  {'rule':<18} {'trigger':<34} {'action':<14} {'phase':<12} iter",
    ]
    for e in state.timeline:
        # A message names its subject; KV and callback triggers are the execution's own.
        trigger = e.trigger_mode or "-"
        if e.trigger_mode.startswith("message") and e.trigger_info:
            trigger += f" {e.trigger_info}"
        lines.append(
            f"  {e.timestamp:%H:%M:%S}.{e.timestamp.microsecond // 1000:03d}  {e.rule_id:<18} "
            f"{trigger[:34]:<34} {e.action or '-':<14} {e.phase or '-':<12} {e.iteration}"
        )
    return lines
