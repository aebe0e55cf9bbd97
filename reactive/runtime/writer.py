"""Dispatching a rule that writes state, and the engine's own writes at a deadline.

The transition itself is :func:`reactive.runtime.transition.apply_rule`; this module
gives it its context, commits what it returns and counts it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from typing import Any

from reactive.dsl.context import RuleContext, new_context
from reactive.dsl.definition import ActionType, RuleDef
from reactive.dsl.state import ExecutionState, Status
from reactive.runtime.children import cancel_child
from reactive.runtime.core import Runtime, log, within
from reactive.runtime.decide import overdue
from reactive.runtime.events import Committed
from reactive.runtime.failures import (
    retry_now,
    task_timed_out,
    timeout_handled,
    timeout_retried,
)
from reactive.runtime.registry import BoundWorkflow
from reactive.runtime.store import Store
from reactive.runtime.transition import Ended, apply_rule, end

__all__ = ["Writer"]

_WAITING = Status.WAITING
_PUBLISH_ASYNC = ActionType.PUBLISH_ASYNC


class Writer:
    """Fires state-writing rules: one transition, one compare-and-set."""

    def __init__(self, rt: Runtime, store: Store) -> None:
        self.rt = rt
        self.store = store
        self.clock = rt.clock
        self.tracing = rt.tracing
        self.owner = rt.options.instance_id
        self.callback_prefix = rt.options.callback_prefix

    def in_span(self, firing: Awaitable[None], bound: BoundWorkflow, r: RuleDef) -> Awaitable[None]:
        """``firing`` (of ``r``) in its dispatch span when tracing is on, else itself."""
        if not self.tracing.enabled:
            return firing
        span = self.tracing.span(
            "reactive.dispatch", workflow=bound.definition.id, rule=r.id, action=r.action.value
        )
        return within(span, firing)

    async def fire(
        self,
        bound: BoundWorkflow,
        r: RuleDef,
        bucket: str,
        key: str,
        revision: int,
        work: ExecutionState,
        message: Any,
        mode: str,
        info: str,
        trigger: str,
        fresh: list[Committed] | None,
        reuse: RuleContext[Any, Any] | None = None,
        new: bool = False,
    ) -> None:
        """Apply ``r`` to ``work`` (a copy of its own) and commit it with one compare-and-set;
        raises ConflictError when the write lost. (``in_span`` puts it in its span.)

        ``reuse``: the context its condition was evaluated with, when it holds ``work``
        and no message: the rule runs with it (and its instant) instead of a new one.
        ``new``: ``work`` has just been started, and its deadline has no timer yet.
        """
        rt = self.rt
        d = bound.definition
        started = time.perf_counter()
        ctx: RuleContext[Any, Any]
        if reuse is not None:
            ctx = reuse
            ctx.rule_id = r.id
            ctx.subject = info if mode != "kv" else ""
        else:
            ctx = new_context(
                work,
                message,
                d.id,
                work.id or d.execution_id_for(key),
                key,
                bucket,
                revision,
                mode,
                self.clock.now(),
                r.id,
                info if mode != "kv" else "",
            )
        applied = apply_rule(
            bound, r, work, ctx, revision, trigger, self.owner, self.callback_prefix, new
        )
        if applied.error is not None:
            e = applied.error
            rt.metric(rt.metrics.dispatch_errors, d.id, r.id).inc()
            log.warning(
                "rule %s.%s raised %r: failing execution %s", d.id, r.id, e, ctx.execution_id
            )
        work = applied.state
        await self.store.commit(d, bucket, key, revision, work, applied.ended, fresh)
        handles = bound.dispatched[r.index]
        if handles is None:
            # (StrEnum members are their values: as labels they are the same strings.)
            handles = bound.dispatched[r.index] = (
                rt.metric(rt.metrics.action_dispatches, d.id, r.id, r.action),
                rt.metric(rt.metrics.rule_duration, d.id, r.id),
            )
        handles[0].inc()
        if revision == 0:
            rt.metric(rt.metrics.executions_created, d.id).inc()
        if work.status is _WAITING and r.action is _PUBLISH_ASYNC:
            rt.metric(rt.metrics.pending_callbacks, d.id).inc()
        handles[1].observe(time.perf_counter() - started)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "transition workflow=%s execution=%s rule=%s action=%s phase=%s status=%s",
                d.id,
                ctx.execution_id,
                r.id,
                applied.action,
                work.phase,
                work.status.value,
            )

    async def enforce_deadlines(
        self,
        bound: BoundWorkflow,
        bucket: str,
        key: str,
        revision: int,
        state: ExecutionState,
        now: float,
        fresh: list[Committed] | None,
    ) -> bool:
        """Time out or fail an overdue execution (True if it did).

        Raises ConflictError when the write lost. (The next deadline needs no timer
        here: the write that set it scheduled it, in its outbox.)
        """
        d = bound.definition
        passed, _ = overdue(d, state, now)
        if passed == "deadline":
            state.time_out()
            ended = end(
                d, state, None, now, self.owner, "timeout", mode="timer", rule_id="deadline"
            )
            await self.store.write(d, bucket, key, revision, state, ended, fresh)
            return True
        if passed == "task":
            rt = self.rt
            rule_id = state.pending_rule_id
            r = d.rules_by_id.get(rule_id)
            exec_id = state.id or d.execution_id_for(key)
            ctx: RuleContext[Any, Any] = new_context(
                state, None, d.id, exec_id, key, bucket, revision, "timer", now
            )
            ctx.rule_id = rule_id
            if not state.pending_task_id and r is not None:
                # The wait before the next attempt is over: the task again, a new one.
                again = retry_now(bound, r, state, ctx, self.owner, rt.options.callback_prefix)
                await self.store.write(d, bucket, key, revision, state, again, fresh)
                if state.status is _WAITING:
                    rt.metric(rt.metrics.pending_callbacks, d.id).inc()
                return True
            handler = bound.on_timeout.get(rule_id)
            timed_out: Ended | None
            # (A child that its parent waits no longer for is cancelled.)
            stop = cancel_child(d, state, "its task timed out", rt.options.callback_prefix)
            also = [stop] if stop is not None else []
            if (
                r is not None
                and r.retry
                and r.retry.retries("timeout", "", state.task_attempt or 1)
            ):
                timed_out = timeout_retried(bound, r, state, ctx, self.owner, also)
            elif handler is None:
                timed_out = task_timed_out(d, state, now, self.owner, also)
            else:
                state, timed_out = timeout_handled(bound, state, ctx, handler, self.owner, also)
            await self.store.write(d, bucket, key, revision, state, timed_out, fresh)
            rt.metric(rt.metrics.pending_callbacks, d.id).dec()
            rt.metric(rt.metrics.callbacks_received, d.id, rule_id, "timeout").inc()
            return True
        return False
