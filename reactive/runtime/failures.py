"""What a failed, late, retried or cancelled task, or a cancellation, makes of a state.

Pure, as ``transition`` is (whose helpers it uses): each function returns the new state,
its outbox (in the state) and ``Ended`` when the execution ends, for the writer to commit.
The retry policy's decision (``transition.retry_later``) is made where a result comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reactive.codecs import decode, encode_json
from reactive.dsl.context import RuleContext
from reactive.dsl.definition import RuleDef, WorkflowDef
from reactive.dsl.state import ExecutionState, OutboxMessage, TaskFailure, TimelineEntry
from reactive.runtime.children import first_state
from reactive.runtime.registry import BoundWorkflow
from reactive.runtime.schedules import TASK
from reactive.runtime.transition import (
    TERMINAL,
    Ended,
    add_timers,
    end,
    finish,
    retry_later,
    task_request,
    timer_for,
    utc,
)

__all__ = [
    "cancelled",
    "retry_now",
    "task_timed_out",
    "task_timeout",
    "timeout_handled",
    "timeout_retried",
]


def task_timeout(d: WorkflowDef, rule_id: str) -> float:
    """How long a task of the rule waits for its answer: the rule's ``timeout=``, else the
    workflow's ``task_timeout``."""
    for r in d.rules:
        if r.id == rule_id:
            return r.task_timeout or d.task_timeout
    return d.task_timeout


def task_timed_out(
    d: WorkflowDef, st: ExecutionState, now: float, owner: str, also: list[OutboxMessage]
) -> Ended:
    """The pending task got no callback in time: fail or escalate, as the workflow says
    (``also``: what else its outbox sends, such as the cancellation of a child)."""
    reason = (
        f"task {st.pending_task_id} of rule {st.pending_rule_id} got no callback "
        f"within {task_timeout(d, st.pending_rule_id):g}s"
    )
    if d.on_task_timeout == "escalate":
        st.escalate(reason)
    else:
        st.fail(reason)
    return end(d, st, also, now, owner, "task_timeout", mode="timer", rule_id="task_timeout")


def cancelled(
    bound: BoundWorkflow,
    st: ExecutionState,
    ctx: RuleContext[Any, Any],
    reason: str,
    owner: str,
    also: list[OutboxMessage],
) -> tuple[ExecutionState, Ended | None]:
    """A cancellation of ``st`` (not ended): its handler's transition (``ctx`` holds ``st``),
    or the end as cancelled (also where the handler changes nothing; failed where it
    raises)."""
    d = bound.definition
    now = ctx.now
    st.clear_pending_task()  # (an answer that comes afterwards is stale)
    action = "cancelled"
    handler = bound.on_cancel
    if handler is not None:
        before = encode_json(st)
        try:
            handler(ctx, reason)
        except Exception as e:
            st = decode(d.state_type, before)
            st.fail(f"cancel handler raised {type(e).__name__}: {e}")
            action = "error"
        else:
            if st.status in TERMINAL or encode_json(st) != before:
                action = "on_cancel"
    if action == "cancelled":
        st.cancel(reason)
    stamp = utc(now)
    st.timeline.append(
        TimelineEntry(
            timestamp=stamp,
            rule_id="cancel",
            trigger_mode="cancel",
            trigger_info=reason,
            action=action,
            phase=st.phase,
            iteration=st.iteration,
            error=st.error if action == "error" else "",
        )
    )
    why = "rule_error" if action == "error" else "cancelled"
    ended = finish(d, st, also, False, now, stamp, owner, why, ctx.revision, ctx.execution_id)
    return st, ended


def timeout_retried(
    bound: BoundWorkflow,
    r: RuleDef,
    st: ExecutionState,
    ctx: RuleContext[Any, Any],
    owner: str,
    also: list[OutboxMessage],
) -> Ended | None:
    """The pending task got no callback in time, and its rule's retry policy sends it again:
    park ``st`` until the next attempt (``retry_later``)."""
    d = bound.definition
    now = ctx.now
    task_id = st.pending_task_id
    message = f"no callback within {task_timeout(d, r.id):g}s"
    retry_later(r, st, "timeout", message, now)
    stamp = utc(now)
    st.timeline.append(
        TimelineEntry(
            timestamp=stamp,
            rule_id=r.id,
            trigger_mode="timer",
            trigger_info=f"task {task_id}",
            action="retry_later",
            phase=st.phase,
            iteration=st.iteration,
            error=message,
        )
    )
    outbox = list(also)
    add_timers(
        d, None, st, outbox, ctx.bucket, ctx.key, ctx.revision, ctx.execution_id, now,
        False, st.deadline, None,
    )  # fmt: skip
    return finish(d, st, outbox, False, now, stamp, owner, "rule", ctx.revision, ctx.execution_id)


def timeout_handled(
    bound: BoundWorkflow,
    st: ExecutionState,
    ctx: RuleContext[Any, Any],
    handler: Callable[..., Any],
    owner: str,
    also: list[OutboxMessage],
) -> tuple[ExecutionState, Ended | None]:
    """The pending task got no callback in time and its rule has an ``on_timeout`` handler:
    the handler's transition (``ctx`` holds ``st``; a handler that raises fails the
    execution)."""
    d = bound.definition
    now = ctx.now
    rule_id, task_id = st.pending_rule_id, st.pending_task_id
    message = f"no callback within {task_timeout(d, rule_id):g}s"
    base = encode_json(st)
    deadline_before = st.deadline
    attempt = st.task_attempt or 1
    st.clear_pending_task()
    action = "on_timeout"
    try:
        handler(
            ctx,
            TaskFailure(
                kind="timeout", message=message, rule_id=rule_id, task_id=task_id, attempt=attempt
            ),
        )
    except Exception as e:
        st = decode(d.state_type, base)
        st.fail(f"timeout handler of {rule_id} raised {type(e).__name__}: {e}")
        action = "error"
    stamp = utc(now)
    st.timeline.append(
        TimelineEntry(
            timestamp=stamp,
            rule_id=rule_id,
            trigger_mode="timer",
            trigger_info=f"task {task_id}",
            action=action,
            phase=st.phase,
            iteration=st.iteration,
            error=message if action == "on_timeout" else st.error,
        )
    )
    outbox = list(also)
    if st.deadline is not deadline_before and st.status not in TERMINAL:
        add_timers(
            d, None, st, outbox, ctx.bucket, ctx.key, ctx.revision, ctx.execution_id, now,
            False, deadline_before, None,
        )  # fmt: skip
    reason = "rule_error" if action == "error" else "task_timeout"
    ended = finish(d, st, outbox, False, now, stamp, owner, reason, ctx.revision, ctx.execution_id)
    return st, ended


def retry_now(
    bound: BoundWorkflow,
    r: RuleDef,
    work: ExecutionState,
    ctx: RuleContext[Any, Any],
    owner: str,
    callback_prefix: str,
) -> Ended | None:
    """The wait before the next attempt of ``r``'s task is over: the request again, as a
    new task (the rule's method makes its payload from the state as it is now)."""
    d = bound.definition
    now = ctx.now
    attempt = work.task_attempt + 1
    work.clear_pending_task()
    outbox: list[OutboxMessage] = []
    action = "retry"
    try:
        payload = bound.methods[r.id](ctx)
        if r.child:
            payload = first_state(r, payload)
    except Exception as e:
        work.fail(f"rule {r.id} raised {type(e).__name__}: {e}")
        action = "error"
    else:
        outbox.append(
            task_request(
                d, r, work, payload, ctx.execution_id, ctx.revision, now, callback_prefix, attempt
            )
        )
        outbox.append(
            timer_for(d, ctx.execution_id, TASK, ctx.bucket, ctx.key, ctx.revision,
                   work.task_deadline.timestamp() if work.task_deadline else now)
        )  # fmt: skip
    stamp = utc(now)
    work.timeline.append(
        TimelineEntry(
            timestamp=stamp,
            rule_id=r.id,
            trigger_mode="timer",
            trigger_info=f"attempt {attempt}",
            action=action,
            phase=work.phase,
            iteration=work.iteration,
            error=work.error if action == "error" else "",
        )
    )
    reason = "rule_error" if action == "error" else "rule"
    return finish(d, work, outbox, False, now, stamp, owner, reason, ctx.revision, ctx.execution_id)
