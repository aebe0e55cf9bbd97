"""Transitioning: a state and what happened to it -> the next state, with its outbox, timeline
and lifecycle event. No I/O: the handlers commit what these functions return.

What a transition that ends an execution must count once its write has committed
(and never if it lost) is returned as :class:`Ended`, for the store to count.

The execution's timers that a transition decides (its deadline when it starts or
moves, its task's timeout when a request is parked, the end of the cooldown of the
rule that fired) are message schedules in its outbox (``schedules``): published
after the write, never lost.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import msgspec

from reactive.codecs import decode, encode, encode_json, inject_callback_fields
from reactive.dsl.context import RuleContext
from reactive.dsl.definition import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.state import (
    ExecutionState,
    Firing,
    LimitReached,
    OutboxMessage,
    Status,
    TaskFailure,
    TimelineEntry,
    WorkflowCancellationEvent,
    WorkflowCompletionEvent,
    WorkflowEscalationEvent,
    WorkflowFailureEvent,
)
from reactive.meta import remember
from reactive.runtime.children import child_request, end_report, first_state
from reactive.runtime.registry import BoundWorkflow
from reactive.runtime.schedules import DEADLINE, TASK, cooldown_kind, timer_id, timer_message

__all__ = [
    "TERMINAL",
    "Applied",
    "Ended",
    "add_timers",
    "apply_result",
    "apply_rule",
    "completion_event",
    "end",
    "finish",
    "outbox_message",
    "retry_later",
    "start_timers",
    "task_request",
    "timer_for",
    "utc",
]

TERMINAL = frozenset(
    {Status.COMPLETED, Status.FAILED, Status.ESCALATED, Status.TIMED_OUT, Status.CANCELLED}
)
# Enum members read on the hot path, as module constants (a member read through its
# class costs an attribute lookup on the enum type each time).
_COMPLETED = Status.COMPLETED
_PUBLISH = ActionType.PUBLISH
_PUBLISH_ASYNC = ActionType.PUBLISH_ASYNC
_COMPLETE = ActionType.COMPLETE
_WAITING = Status.WAITING
_STATE = TriggerMode.STATE

_last_utc: tuple[float, datetime] = (0.0, datetime.fromtimestamp(0.0, UTC))


def utc(ts: float) -> datetime:
    """``ts`` as a UTC datetime.

    One transition stamps the same instant several times (timeline, updated_at,
    completed_at, its event): datetimes are immutable, so the last one is reused.
    """
    global _last_utc
    if _last_utc[0] == ts:
        return _last_utc[1]
    dt = datetime.fromtimestamp(ts, UTC)
    _last_utc = (ts, dt)
    return dt


def outbox_message(subject: str, payload: Any, msg_id: str) -> OutboxMessage:
    """A message for an outbox: a JSON payload kept as JSON (see OutboxMessage)."""
    if payload is None or isinstance(payload, bytes | str):
        return OutboxMessage(subject=subject, data=encode(payload), msg_id=msg_id)
    return OutboxMessage(subject=subject, json=msgspec.Raw(encode_json(payload)), msg_id=msg_id)


def completion_event(d: WorkflowDef, st: ExecutionState, now: float) -> WorkflowCompletionEvent:
    return WorkflowCompletionEvent(
        execution_id=st.id,
        workflow_id=d.id,
        status=st.status.value,
        phase=st.phase,
        completed_at=utc(now),
    )


class Ended(msgspec.Struct, gc=False):
    """An execution a transition ends: what to count, and log, once its write has committed."""

    workflow_id: str
    execution_id: str
    status: Status
    reason: str
    duration: float
    error: str


def end(
    d: WorkflowDef,
    st: ExecutionState,
    outbox: list[OutboxMessage] | None,
    now: float,
    owner: str,
    reason: str,
    *,
    mode: str = "",
    rule_id: str | None = None,
) -> Ended:
    """Finish a write that makes the execution terminal: its times, its lifecycle event in the
    outbox (after ``outbox``), and with ``rule_id`` a timeline entry for the end itself."""
    out = list(outbox) if outbox else []
    stamp = utc(now)
    st.completed_at = st.updated_at = stamp
    st.owner = owner
    status = st.status
    event: Any = None
    if status is _COMPLETED:
        subject = d.on_complete
        if subject:
            event = completion_event(d, st, now)
    elif status is Status.ESCALATED:
        subject = d.on_escalate
        if subject:
            event = WorkflowEscalationEvent(
                execution_id=st.id,
                workflow_id=d.id,
                phase=st.phase,
                reason=st.error,
                escalated_at=stamp,
            )
    elif status is Status.CANCELLED:
        subject = d.on_cancel
        if subject:
            event = WorkflowCancellationEvent(
                execution_id=st.id,
                workflow_id=d.id,
                phase=st.phase,
                reason=st.error,
                cancelled_at=stamp,
            )
    else:
        subject = d.on_fail
        if subject:
            event = WorkflowFailureEvent(
                execution_id=st.id,
                workflow_id=d.id,
                phase=st.phase,
                error=st.error,
                failed_at=stamp,
            )
    if event is not None:
        out.append(
            OutboxMessage(
                subject=subject,
                json=msgspec.Raw(encode_json(event)),
                msg_id=f"{d.id}:{st.id}:{status}",
            )
        )
    if rule_id is not None:
        st.timeline.append(
            TimelineEntry(
                timestamp=stamp,
                rule_id=rule_id,
                trigger_mode=mode,
                action=st.status,
                phase=st.phase,
                iteration=st.iteration,
            )
        )
    if st.parent is not None:
        out.append(end_report(d, st))  # (a child: its end is its parent's answer)
    st.outbox = out
    st.outbox_id = f"{d.id}:{st.id}:{st.status}" if out else ""
    duration = now - st.created_at.timestamp() if st.created_at else 0.0
    return Ended(d.id, st.id, status, reason, duration, st.error or reason)


def timer_for(
    d: WorkflowDef,
    exec_id: str,
    kind: str,
    bucket: str,
    key: str,
    revision: int,
    at: float,
) -> OutboxMessage:
    return timer_message(d.id, kind, bucket, key, at, timer_id(d.id, exec_id, revision, kind, at))


def start_timers(
    d: WorkflowDef, st: ExecutionState, bucket: str, key: str, revision: int
) -> list[OutboxMessage]:
    """The timers of a state an engine writes for the first time (an execution it starts,
    or one started by someone else): its deadline, and its pending task's timeout."""
    out = []
    if st.deadline is not None:
        out.append(timer_for(d, st.id, DEADLINE, bucket, key, revision, st.deadline.timestamp()))
    if st.status is _WAITING and st.task_deadline is not None:
        out.append(timer_for(d, st.id, TASK, bucket, key, revision, st.task_deadline.timestamp()))
    return out


def add_timers(
    d: WorkflowDef,
    r: RuleDef | None,
    work: ExecutionState,
    outbox: list[OutboxMessage],
    bucket: str,
    key: str,
    revision: int,
    exec_id: str,
    now: float,
    started: bool,
    deadline_before: datetime | None,
    task_before: datetime | None,
) -> None:
    """Add to ``outbox`` the timers the transition decided: the deadline it set (starting)
    or moved, the timeout of the task it parked, the end of the cooldown of the rule that
    fired (a rule evaluated on revisions, held until then)."""
    if work.deadline is not None and (started or work.deadline is not deadline_before):
        at = work.deadline.timestamp()
        outbox.append(timer_for(d, exec_id, DEADLINE, bucket, key, revision, at))
    if work.task_deadline is not None and work.task_deadline is not task_before:
        at = work.task_deadline.timestamp()
        outbox.append(timer_for(d, exec_id, TASK, bucket, key, revision, at))
    if r is not None and r.cooldown and not r.shared_cooldown and r.mode is _STATE:
        # (The very sum decide.hold_until compares with: not held at this instant.)
        at = work.firings[r.id].last_at + r.cooldown
        outbox.append(timer_for(d, exec_id, cooldown_kind(r.id), bucket, key, revision, at))


class Applied(msgspec.Struct, gc=False):
    """A transition made: the new state (ready to commit), what the timeline calls it, the end
    it makes (if it ends the execution), and what the rule or handler raised (if it did)."""

    state: ExecutionState
    action: str
    ended: Ended | None = None
    error: Exception | None = None


def finish(
    d: WorkflowDef,
    work: ExecutionState,
    outbox: list[OutboxMessage],
    was_terminal: bool,
    now: float,
    stamp: datetime,
    owner: str,
    reason: str,
    revision: int,
    exec_id: str,
) -> Ended | None:
    """The end of a transition: its outbox (with the lifecycle event if it ends the
    execution), its times and owner, the timeline kept to its length."""
    ended = None
    if not was_terminal and work.status in TERMINAL:
        ended = end(d, work, outbox, now, owner, reason)
    else:
        work.outbox = outbox
    work.outbox_id = f"{d.id}:{exec_id}:{revision}" if work.outbox else ""
    work.updated_at = stamp
    work.owner = owner
    if d.max_timeline and len(work.timeline) > d.max_timeline:
        del work.timeline[: len(work.timeline) - d.max_timeline]
    return ended


def _limit_reached(
    bound: BoundWorkflow,
    rule_id: str,
    before: bytes,
    ctx: RuleContext[Any, Any],
    by: str,
    task_done: bool = False,
) -> tuple[ExecutionState, str]:
    """The state and action when a transition would pass ``max_iterations``: the state as it
    was (``before``) at the limit, given to the workflow's ``@on_max_iterations`` handler;
    escalated where there is none, where the handler changes nothing, or where it raises
    (then failed)."""
    d = bound.definition
    limit = d.max_iterations
    work = decode(d.state_type, before)
    work.iteration = limit
    if task_done:
        work.clear_pending_task()  # (its result came: the task is done either way)
    handler = bound.on_limit
    if handler is not None:
        ctx.state = work
        at_limit = encode_json(work)
        try:
            handler(ctx, LimitReached(limit=limit, rule_id=rule_id))
        except Exception as e:
            work = decode(d.state_type, before)
            work.iteration = limit
            work.fail(f"max-iterations handler raised {type(e).__name__}: {e}")
            return work, "error"
        if work.status in TERMINAL or encode_json(work) != at_limit:
            return work, "on_max_iterations"
    work.escalate(f"max iterations ({limit}) exceeded by {by}")
    return work, "escalate"


def task_request(
    d: WorkflowDef,
    r: RuleDef,
    work: ExecutionState,
    payload: Any,
    exec_id: str,
    revision: int,
    now: float,
    callback_prefix: str,
    attempt: int,
) -> OutboxMessage:
    """Park ``work`` on a new task of the async rule ``r`` (its ``attempt``) and return the
    request, to go out in the transition's outbox."""
    # Unguessable: only the worker given the request can answer it (the state and the
    # outbox keep it, so a redelivered request carries the same id).
    task_id = f"{exec_id}-{r.id}-{revision}-{secrets.token_hex(12)}"
    callback_subject = f"{callback_prefix}.{d.id}.{exec_id}"
    work.set_pending_task(task_id, r.id)
    work.task_deadline = utc(now + (r.task_timeout or d.task_timeout))
    work.pending_since = utc(now)
    work.task_attempt = attempt
    # (One message per rule and revision: the id of its revision, index 0, its rule.)
    msg_id = f"{d.id}:{exec_id}:{revision}:0:{r.id}"
    if r.child:
        return child_request(
            d, r, payload, exec_id, task_id, callback_subject, callback_prefix, msg_id
        )
    payload = inject_callback_fields(payload, task_id, callback_subject, exec_id)
    msg = outbox_message(r.publish_subject, payload, msg_id)
    msg.headers = {
        "Reactive-Task-Id": task_id,
        "Reactive-Callback-Subject": callback_subject,
        "Reactive-Execution-Id": exec_id,
    }
    return msg


def retry_later(r: RuleDef, work: ExecutionState, kind: str, message: str, now: float) -> bool:
    """If ``r``'s retry policy sends its failed task (``kind``, ``message``) again: park
    ``work`` until the next attempt (a pending rule with no task id, until
    ``task_deadline``) and return True."""
    policy = r.retry
    attempt = work.task_attempt or 1
    if policy is None or not policy.retries(kind, message, attempt):
        return False
    work.clear_pending_task()
    work.set_pending_task("", r.id)
    work.task_deadline = utc(now + policy.delay(attempt))
    work.task_attempt = attempt
    return True


def apply_rule(
    bound: BoundWorkflow,
    r: RuleDef,
    work: ExecutionState,
    ctx: RuleContext[Any, Any],
    revision: int,
    trigger: str,
    owner: str,
    callback_prefix: str,
    started: bool = False,
) -> Applied:
    """Run a state-writing rule on ``work`` (a copy of its own; ``ctx`` holds it) and make the
    transition: the action's outbox, the firing, the timeline, the max-iterations limit.

    ``started``: ``work`` is an execution just started (initialized for this
    transition, or by someone other than an engine), whose deadline has no timer yet.
    """
    d = bound.definition
    now = ctx.now
    exec_id = ctx.execution_id
    was_terminal = work.status in TERMINAL
    deadline_before, task_before = work.deadline, work.task_deadline
    # The state before the rule ran: where an escalation for max iterations starts from.
    before = encode_json(work) if d.max_iterations else b""
    outbox: list[OutboxMessage] = []
    error: Exception | None = None
    try:
        if r.mutator is not None:
            r.mutator(ctx)
        payload = bound.methods[r.id](ctx)
        if r.child:
            payload = first_state(r, payload)
    except Exception as e:
        error = e
        work.fail(f"rule {r.id} raised {type(e).__name__}: {e}")
        action: str = "error"
    else:
        action = r.action  # a StrEnum member is its value
        # (One message per rule: the id of its revision, index 0, its rule.)
        msg_id = f"{d.id}:{exec_id}:{revision}:0:{r.id}" if r.publish_subject else ""
        if r.action is _PUBLISH:
            outbox.append(outbox_message(r.publish_subject, payload, msg_id))
        elif r.action is _PUBLISH_ASYNC and work.status not in TERMINAL:
            outbox.append(
                task_request(d, r, work, payload, exec_id, revision, now, callback_prefix, 1)
            )
        elif r.action is _COMPLETE:
            if work.status not in TERMINAL:
                work.complete()
            if r.publish_subject:
                event = payload if payload is not None else completion_event(d, work, now)
                outbox.append(outbox_message(r.publish_subject, event, msg_id))
    if d.max_iterations and work.iteration > d.max_iterations and work.status not in TERMINAL:
        # The transition that would pass the limit does not happen: its handler, or an
        # escalation, from where it was.
        work, action = _limit_reached(bound, r.id, before, ctx, f"rule {r.id}")
        outbox = []
    firing = work.firings.get(r.id) or Firing()
    firing.count += 1
    firing.last_at = now
    firing.last_trigger = trigger
    if trigger[:1] == "m":
        remember(firing, trigger)  # (a revision is remembered only by claims)
    work.firings[r.id] = firing
    stamp = utc(now)
    work.timeline.append(
        TimelineEntry(
            timestamp=stamp,
            rule_id=r.id,
            trigger_mode=ctx.trigger_mode,
            trigger_info=ctx.subject or ctx.key,
            action=action,
            phase=work.phase,
            iteration=work.iteration,
        )
    )
    reason = (
        "max_iterations"
        if action == "escalate"
        else "rule_error"
        if error or action == "error"
        else "rule"
    )
    if (
        (started and work.deadline is not None)
        or r.cooldown
        or work.deadline is not deadline_before
        or work.task_deadline is not task_before
    ) and work.status not in TERMINAL:
        add_timers(
            d, r, work, outbox, ctx.bucket, ctx.key, revision, exec_id, now, started,
            deadline_before, task_before,
        )  # fmt: skip
    ended = finish(d, work, outbox, was_terminal, now, stamp, owner, reason, revision, exec_id)
    return Applied(work, action, ended, error)


_CALLBACK_REASONS = {
    "escalate": "max_iterations",
    "error": "rule_error",
    "callback_error": "callback_error",
    "invalid_result": "invalid_result",
}


def apply_result(
    bound: BoundWorkflow,
    r: RuleDef,
    work: ExecutionState,
    base: bytes,
    ctx: RuleContext[Any, Any],
    result: Any,
    failure: str,
    invalid: bool,
    task_id: str,
    owner: str,
) -> Applied:
    """A callback for the pending task of ``work`` (decoded from ``base``; ``ctx`` holds it):
    the result handler's transition, or the task's failure (``failure``: the worker's error,
    or with ``invalid`` why its result does not decode)."""
    d = bound.definition
    now = ctx.now
    action = "callback"
    error: Exception | None = None
    deadline_before = work.deadline
    retrying = bool(failure) and retry_later(
        r, work, "invalid" if invalid else "error", failure, now
    )
    on_error = bound.on_error.get(r.id) if failure and not retrying else None
    if retrying:
        action = "retry_later"
    elif failure and on_error is None:
        work.fail(f"task {task_id} of rule {r.id} failed: {failure}")
        action = "invalid_result" if invalid else "callback_error"
    else:
        attempt = work.task_attempt or 1
        work.clear_pending_task()
        try:
            if on_error is not None:
                action = "on_error"
                kind = "invalid" if invalid else "error"
                on_error(
                    ctx,
                    TaskFailure(
                        kind=kind, message=failure, rule_id=r.id, task_id=task_id, attempt=attempt
                    ),
                )
            else:
                bound.handlers[r.id](ctx, result)
        except Exception as e:
            error = e
            work = decode(d.state_type, base)
            which = "error" if on_error is not None else "result"
            work.fail(f"{which} handler of {r.id} raised {type(e).__name__}: {e}")
            action = "error"
        if d.max_iterations and work.iteration > d.max_iterations and work.status not in TERMINAL:
            work, action = _limit_reached(bound, r.id, base, ctx, f"result of {r.id}", True)
    stamp = utc(now)
    work.timeline.append(
        TimelineEntry(
            timestamp=stamp,
            rule_id=r.id,
            trigger_mode="callback",
            trigger_info=ctx.subject,
            action=action,
            phase=work.phase,
            iteration=work.iteration,
            error=failure
            if action in ("on_error", "retry_later")
            else work.error
            if action != "callback"
            else "",
        )
    )
    reason = _CALLBACK_REASONS.get(action, "rule")
    outbox: list[OutboxMessage] = []
    if (work.deadline is not deadline_before or retrying) and work.status not in TERMINAL:
        add_timers(
            d, None, work, outbox, ctx.bucket, ctx.key, ctx.revision, ctx.execution_id, now,
            False, deadline_before, None if retrying else work.task_deadline,
        )  # fmt: skip
    ended = finish(
        d, work, outbox, False, now, stamp, owner, reason, ctx.revision, ctx.execution_id
    )
    return Applied(work, action, ended, error)
