"""GitHub issue to pull request, by three asynchronous agents on a token budget.

The flow of one issue (one execution, keyed by repository and issue number):

1. ``take_issue``: the ``github.issue.opened`` webhook (message + state, from
   the ``GITHUB_ISSUES`` stream) records the issue and puts it in triage.
   GitHub redelivers webhooks and an edited issue may be announced again: a
   repeat within the ``cooldown`` (1 minute) is dropped, and an issue is taken
   in at most ``max_firings=3`` times (a later announcement only refreshes the
   title, body and labels).
2. ``qualify``: the qualifier agent decides whether to take the issue on. A
   rejection fails the execution (``on_fail``: ``github.issue.failed``).
3. ``develop``: the developer agent writes (or updates) a pull request and
   reports the tokens it used.
4. ``review``: the reviewer agent approves the PR (``complete``: the
   ``github.pr.ready`` event) or requests changes; ``rework`` sends the PR back
   to the developer, one iteration per review cycle. A fourth cycle passes
   ``max_iterations=3`` and escalates (``github.issue.escalated``).
5. ``over_budget``: whenever the tokens used pass the issue's budget, the
   execution escalates. It is the first state rule in definition order, so it
   wins over whatever else would fire on that revision.

The three agents are simulated by one deterministic worker coroutine,
``agent_worker``, written against the backend interface (in memory or NATS).

Run it::

    python -m reactive demo examples/github_issue_to_pr.py
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskStatus

from reactive import Engine, ExecutionState, RuleContext, Status, Workflow, rule
from reactive.backends.base import Backend
from reactive.conditions import condition, phase_is

log = logging.getLogger("reactive.examples.github_issue_to_pr")

OPENED = "github.issue.opened"
QUALIFIER = "agents.qualifier"
DEVELOPER = "agents.developer"
REVIEWER = "agents.reviewer"
PR_READY = "github.pr.ready"
ISSUE_FAILED = "github.issue.failed"
ISSUE_ESCALATED = "github.issue.escalated"

DEFAULT_TOKEN_BUDGET = 100_000


def issue_execution_id(repo: str, number: int) -> str:
    """The execution id of an issue: ``acme/widgets`` #101 -> ``acme-widgets-101``."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{repo}-{number}")


# --------------------------------------------------------------------------- types


class Issue(ExecutionState):
    """One issue on its way to a pull request."""

    repo: str = ""
    number: int = 0
    title: str = ""
    body: str = ""
    labels: list[str] = []
    author: str = ""
    announcements: int = 0  # how often the entry rule took the issue in
    decision: str = ""  # the qualifier's reason
    pr_number: int = 0
    pr_url: str = ""
    changes: list[str] = []  # what the current PR contains
    feedback: list[str] = []  # what the reviewer asked for, in order
    reviews: int = 0
    token_budget: int = DEFAULT_TOKEN_BUDGET
    tokens_used: int = 0


class IssueOpened(msgspec.Struct):
    """The part of GitHub's ``issues`` webhook payload this workflow reads."""

    repo: str
    number: int
    title: str
    body: str = ""
    labels: list[str] = []
    author: str = ""


class QualifyRequest(msgspec.Struct, kw_only=True):
    repo: str
    number: int
    title: str
    body: str
    labels: list[str]
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class QualifyResult(msgspec.Struct, kw_only=True):
    task_id: str
    accept: bool
    reason: str = ""
    tokens_used: int = 0


class DevelopRequest(msgspec.Struct, kw_only=True):
    repo: str
    number: int
    title: str
    body: str
    labels: list[str]
    attempt: int
    pr_number: int = 0  # 0: open a new PR
    feedback: list[str] = []  # review requests to address
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class DevelopResult(msgspec.Struct, kw_only=True):
    task_id: str
    pr_number: int
    pr_url: str
    changes: list[str]
    tokens_used: int


class CodeReviewRequest(msgspec.Struct, kw_only=True):
    repo: str
    number: int
    labels: list[str]
    pr_number: int
    pr_url: str
    changes: list[str]
    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class CodeReviewResult(msgspec.Struct, kw_only=True):
    task_id: str
    approved: bool
    comment: str = ""
    requested: str = ""  # the change asked for, when not approved
    tokens_used: int = 0


# --------------------------------------------------------------------------- the workflow


@condition
def over_budget(ctx: RuleContext[Issue, None]) -> bool:
    """More tokens used than the issue's budget allows."""
    return ctx.state.tokens_used > ctx.state.token_budget


class IssueToPR(
    Workflow,
    id="issue-to-pr",
    state=Issue,
    bucket="ISSUE_TO_PR",
    timeout="1h",
    task_timeout="10m",
    max_iterations=3,
    on_complete=PR_READY,
    on_fail=ISSUE_FAILED,
    on_escalate=ISSUE_ESCALATED,
):
    """An issue is qualified, implemented and reviewed by agents, within a token budget."""

    @rule(
        on_subject=OPENED,
        stream="GITHUB_ISSUES",
        state_key=lambda m: issue_execution_id(m.repo, m.number),
        mutate=True,
        cooldown="1m",
        max_firings=3,
    )
    def take_issue(self, ctx: RuleContext[Issue, IssueOpened]) -> None:
        """Record the issue; a new one goes to triage, a known one is only refreshed."""
        st, m = ctx.state, ctx.message
        st.repo, st.number, st.author = m.repo, m.number, m.author
        st.title, st.body, st.labels = m.title, m.body, list(m.labels)
        st.announcements += 1
        if not st.phase:
            st.phase = "triage"

    @rule(watch_kv=True, when=over_budget, mutate=True)
    def budget_guard(self, ctx: RuleContext[Issue, None]) -> None:
        """Escalate as soon as the agents have used more tokens than the budget."""
        st = ctx.state
        st.escalate(f"token budget exceeded: {st.tokens_used} > {st.token_budget}")

    @rule(watch_kv=True, when=phase_is("triage"), publish_async=QUALIFIER)
    def qualify(self, ctx: RuleContext[Issue, None]) -> QualifyRequest:
        st = ctx.state
        return QualifyRequest(
            repo=st.repo, number=st.number, title=st.title, body=st.body, labels=st.labels
        )

    @qualify.on_result
    def qualified(self, ctx: RuleContext[Issue, None], result: QualifyResult) -> None:
        st = ctx.state
        st.tokens_used += result.tokens_used
        st.decision = result.reason
        if result.accept:
            st.phase = "developing"
        else:
            st.phase = "rejected"
            st.fail(f"rejected by the qualifier: {result.reason}")

    @rule(watch_kv=True, when=phase_is("developing"), publish_async=DEVELOPER)
    def develop(self, ctx: RuleContext[Issue, None]) -> DevelopRequest:
        st = ctx.state
        return DevelopRequest(
            repo=st.repo,
            number=st.number,
            title=st.title,
            body=st.body,
            labels=st.labels,
            attempt=st.iteration + 1,
            pr_number=st.pr_number,
            feedback=st.feedback,
        )

    @develop.on_result
    def developed(self, ctx: RuleContext[Issue, None], result: DevelopResult) -> None:
        st = ctx.state
        st.tokens_used += result.tokens_used
        st.pr_number, st.pr_url, st.changes = result.pr_number, result.pr_url, result.changes
        st.phase = "in_review"

    @rule(watch_kv=True, when=phase_is("in_review"), publish_async=REVIEWER)
    def review(self, ctx: RuleContext[Issue, None]) -> CodeReviewRequest:
        st = ctx.state
        return CodeReviewRequest(
            repo=st.repo,
            number=st.number,
            labels=st.labels,
            pr_number=st.pr_number,
            pr_url=st.pr_url,
            changes=st.changes,
        )

    @review.on_result
    def reviewed(self, ctx: RuleContext[Issue, None], result: CodeReviewResult) -> None:
        st = ctx.state
        st.tokens_used += result.tokens_used
        st.reviews += 1
        if result.approved:
            st.phase = "approved"
        else:
            st.feedback = [*st.feedback, result.requested]
            st.phase = "changes_requested"

    @rule(watch_kv=True, when=phase_is("changes_requested"), mutate=True)
    def rework(self, ctx: RuleContext[Issue, None]) -> None:
        """Another review cycle: back to the developer."""
        ctx.state.iteration += 1
        ctx.state.phase = "developing"

    @rule(watch_kv=True, when=phase_is("approved"), complete=True)
    def ready(self, ctx: RuleContext[Issue, None]) -> None:
        """The PR is approved: the execution completes and ``github.pr.ready`` is published."""


WORKFLOWS: list[type[Workflow]] = [IssueToPR]


# --------------------------------------------------------------------------- the simulated agents

QUALIFIER_TOKENS = 400
REVIEWER_TOKENS = 2_000
DEVELOPER_TOKENS = {"size/S": 6_000, "size/M": 15_000, "size/L": 40_000}


def _size(labels: list[str]) -> str:
    return next((label for label in labels if label in DEVELOPER_TOKENS), "size/M")


def required_changes(labels: list[str]) -> list[str]:
    """What the reviewer wants in a PR for an issue with these labels, in the order it asks."""
    wanted = ["code"]
    if "bug" in labels:
        wanted.append("regression-test")
    if "enhancement" in labels:
        wanted += ["tests", "docs"]
    if "security" in labels:
        wanted += ["security-review", "threat-model"]
    return wanted


def qualify_issue(req: QualifyRequest) -> QualifyResult:
    """Take bugs and enhancements that say what they want; decline the rest."""
    if "question" in req.labels:
        reason, accept = "a question, not a change: answered in Discussions", False
    elif not ({"bug", "enhancement"} & set(req.labels)):
        reason, accept = "not labelled bug or enhancement", False
    elif not req.body.strip():
        reason, accept = "no description to work from", False
    else:
        reason, accept = f"actionable {_size(req.labels)} change", True
    return QualifyResult(
        task_id=req.task_id, accept=accept, reason=reason, tokens_used=QUALIFIER_TOKENS
    )


def develop_pr(req: DevelopRequest) -> DevelopResult:
    """Write the code, plus whatever the reviews asked for so far."""
    pr_number = req.pr_number or 1000 + req.number
    changes = ["code", *(f for f in req.feedback if f != "code")]
    return DevelopResult(
        task_id=req.task_id,
        pr_number=pr_number,
        pr_url=f"https://github.com/{req.repo}/pull/{pr_number}",
        changes=changes,
        tokens_used=DEVELOPER_TOKENS[_size(req.labels)],
    )


def review_pr(req: CodeReviewRequest) -> CodeReviewResult:
    """Approve once the PR has everything required; otherwise ask for the first thing missing."""
    missing = [c for c in required_changes(req.labels) if c not in req.changes]
    if not missing:
        return CodeReviewResult(
            task_id=req.task_id, approved=True, comment="LGTM", tokens_used=REVIEWER_TOKENS
        )
    return CodeReviewResult(
        task_id=req.task_id,
        approved=False,
        comment=f"please add {missing[0]}",
        requested=missing[0],
        tokens_used=REVIEWER_TOKENS,
    )


AGENTS: dict[str, tuple[type[Any], Callable[[Any], msgspec.Struct]]] = {
    QUALIFIER: (QualifyRequest, qualify_issue),
    DEVELOPER: (DevelopRequest, develop_pr),
    REVIEWER: (CodeReviewRequest, review_pr),
}


async def agent_worker(
    backend: Backend,
    *,
    agents: dict[str, tuple[type[Any], Callable[[Any], msgspec.Struct]]] | None = None,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the three agents' requests (``agents.*``) until cancelled.

    Each request is decoded into its type, answered by the agent's function, and
    the result published to the request's callback subject. Start it with
    ``await task_group.start(agent_worker, backend)``.
    """
    table = agents if agents is not None else AGENTS
    async with backend.subscribe("agents.*", queue="issue-agents") as requests:
        task_status.started()
        async for msg in requests:
            entry = table.get(msg.subject)
            if entry is None:
                continue
            request_type, act = entry
            try:
                request = msgspec.json.decode(msg.data, type=request_type)
            except msgspec.DecodeError as e:
                log.warning("agent %s: ignoring an undecodable request: %s", msg.subject, e)
                continue
            reply_to = request.callback_subject or msg.headers.get("Reactive-Callback-Subject", "")
            if not request.task_id:
                request.task_id = msg.headers.get("Reactive-Task-Id", "")
            if not reply_to:
                continue
            try:
                result: Any = act(request)
            except Exception as e:  # report the failure: the engine fails the execution
                result = {"task_id": request.task_id, "error": f"{type(e).__name__}: {e}"}
            await backend.publish(reply_to, msgspec.json.encode(result))


# --------------------------------------------------------------------------- the demo

REPO = "acme/widgets"

#: The demo's issues and how each should end.
DEMO_ISSUES = [
    IssueOpened(
        repo=REPO,
        number=101,
        title="Crash when the config file is empty",
        body="Starting with an empty widgets.toml raises KeyError.",
        labels=["bug", "size/S"],
        author="ana",
    ),
    IssueOpened(
        repo=REPO,
        number=102,
        title="How do I change the log level?",
        body="I can't find the setting.",
        labels=["question"],
        author="ben",
    ),
    IssueOpened(
        repo=REPO,
        number=103,
        title="Rewrite the storage layer",
        body="Replace the file store with an embedded database.",
        labels=["enhancement", "size/L"],
        author="cleo",
    ),
    IssueOpened(
        repo=REPO,
        number=104,
        title="Single sign-on",
        body="Log in with the company's identity provider.",
        labels=["enhancement", "security", "size/M"],
        author="dev",
    ),
]

EXPECTED = {
    issue_execution_id(REPO, 101): Status.COMPLETED,  # one review cycle, then approved
    issue_execution_id(REPO, 102): Status.FAILED,  # rejected by the qualifier
    issue_execution_id(REPO, 103): Status.ESCALATED,  # token budget exceeded
    issue_execution_id(REPO, 104): Status.ESCALATED,  # max iterations (review cycles)
}


async def run_demo(
    backend: Backend,
    engine: Engine,
    out: Callable[[str], None] = print,
    *,
    timeout: float = 20.0,
) -> None:
    """Open the demo issues on a running engine, wait for each to end, print their timelines."""
    await engine.wait_ready(timeout)
    events: list[tuple[str, dict[str, Any]]] = []
    ids = [issue_execution_id(i.repo, i.number) for i in DEMO_ISSUES]
    async with anyio.create_task_group() as tg:
        await tg.start(agent_worker, backend)
        await tg.start(collect_events, backend, [PR_READY, ISSUE_FAILED, ISSUE_ESCALATED], events)
        for issue in DEMO_ISSUES:
            out(f"webhook: {issue.repo}#{issue.number} opened: {issue.title} {issue.labels}")
            await engine.publish(OPENED, issue)
        out(
            f"webhook: {DEMO_ISSUES[0].repo}#{DEMO_ISSUES[0].number} delivered again (dropped: cooldown)"
        )
        await engine.publish(OPENED, DEMO_ISSUES[0])
        states = [await engine.wait_for(IssueToPR, i, timeout=timeout) for i in ids]
        with anyio.move_on_after(5.0):
            while len(events) < len(states):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    for st in states:
        out("")
        for line in format_timeline(st):
            out(line)
        out(
            f"  tokens {st.tokens_used}/{st.token_budget}  reviews {st.reviews}"
            f"  taken in {st.announcements}x  PR {st.pr_url or '-'}"
        )
    out("")
    out("lifecycle events:")
    for subject, event in events:
        detail = event.get("reason") or event.get("error") or event.get("final_phase", "")
        out(f"  {subject:<24} {event.get('execution_id', '?'):<20} {detail}")


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
        f"  {'time (UTC)':<12}  {'rule':<18} {'trigger':<34} {'action':<14} {'phase':<17} iter",
    ]
    for e in state.timeline:
        # A message names its subject; KV and callback triggers are the execution's own.
        trigger = e.trigger_mode or "-"
        if e.trigger_mode.startswith("message") and e.trigger_info:
            trigger += f" {e.trigger_info}"
        lines.append(
            f"  {e.timestamp:%H:%M:%S}.{e.timestamp.microsecond // 1000:03d}  {e.rule_id:<18} "
            f"{trigger[:34]:<34} {e.action or '-':<14} {e.phase or '-':<17} {e.iteration}"
        )
    return lines
