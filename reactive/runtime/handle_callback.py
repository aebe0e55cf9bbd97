"""Handling a callback: a worker's result (or error) for the task an execution waits for.

A callback whose task id is not the pending one (stale, duplicate, forged) is
acknowledged and ignored; one that comes after the task timeout or the deadline is
late; a result of the wrong shape fails the task at once. The callback message is
acknowledged once the transition it makes is committed.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

from reactive.codecs import decode, encode_json
from reactive.dsl.context import RuleContext, new_context
from reactive.dsl.state import ParentLink, Status
from reactive.errors import ConflictError, DecodeError, TransientBackendError
from reactive.runtime.children import cancel_child
from reactive.runtime.core import Runtime, log
from reactive.runtime.decide import FOREVER
from reactive.runtime.events import CallbackArrival, Committed
from reactive.runtime.failures import cancelled
from reactive.runtime.registry import BoundWorkflow
from reactive.runtime.schedules import GRACE
from reactive.runtime.store import Replaced, Store
from reactive.runtime.transition import TERMINAL, apply_result, end
from reactive.runtime.writer import Writer

__all__ = ["CallbackHandler"]

_WAITING = Status.WAITING


class _Envelope(msgspec.Struct):
    """The fields of a callback the engine reads besides the typed result."""

    task_id: str = ""
    error: str = ""
    # Not a worker's answer: a cancellation of the execution (``Engine.cancel``), its reason.
    cancel: str | None = None
    # Nor this: the start of a child execution (``reactive.runtime.children``), its first
    # state and its parent.
    start: msgspec.Raw = msgspec.Raw(b"")
    parent: ParentLink | None = None


class CallbackHandler:
    """Applies callbacks to the executions that wait for them."""

    def __init__(self, rt: Runtime, store: Store, writer: Writer) -> None:
        self.rt = rt
        self.store = store
        self.writer = writer
        self.clock = rt.clock
        self.tracing = rt.tracing
        self.owner = rt.options.instance_id

    async def on_callback(self, ev: CallbackArrival, fresh: list[Committed]) -> None:
        rt = self.rt
        bound, msg = ev.bound, ev.msg
        d = bound.definition
        try:
            env = decode(_Envelope, msg.data)
        except DecodeError as e:
            rt.metric(rt.metrics.poison_messages, d.id, "callback").inc()
            log.warning("terminating undecodable callback on %s: %s", msg.subject, e)
            await rt.settle(msg, "term")
            return
        if not env.task_id:
            env.task_id = msg.headers.get("Reactive-Task-Id", "")
        try:
            if env.cancel is not None:
                outcome = await self._cancel(bound, ev.execution_id, env.cancel, fresh)
            elif env.start:
                outcome = await self._start_child(bound, ev.execution_id, env.start, env.parent)
            else:
                with contextlib.ExitStack() as spans:
                    outcome = await self._apply(bound, ev.execution_id, env, ev, fresh, spans)
        except TransientBackendError as e:
            await rt.redeliver_later(msg, e, "callback ")
            return
        except Exception:
            log.exception("error handling callback on %s", msg.subject)
            how = "term" if msg.num_delivered >= rt.options.max_deliver else "nak"
            await rt.settle(msg, how, 1.0)
            return
        await rt.settle(msg, "term" if outcome == "poison" else "ack")

    async def _start_child(
        self, bound: BoundWorkflow, exec_id: str, first: msgspec.Raw, parent: ParentLink | None
    ) -> str:
        """Start the child execution a parent's rule asks for (one that exists already was
        started by this request, delivered before: left as it is)."""
        d = bound.definition
        try:
            state = decode(d.state_type, first)
        except DecodeError as e:
            log.warning("terminating the start of child %s.%s: %s", d.id, exec_id, e)
            if parent is not None:  # (its parent need not wait for its timeout)
                answer = {"task_id": parent.task_id, "error": f"child {d.id} not started: {e}"}
                await self.rt.backend.publish(parent.callback, encode_json(answer))
            return "poison"
        state.parent = parent
        try:
            await self.store.create(d, exec_id, state, self.clock.now())
        except ConflictError:
            return "stale"
        return "done"

    async def _cancel(
        self, bound: BoundWorkflow, exec_id: str, reason: str, fresh: list[Committed]
    ) -> str:
        """Cancel the execution (its handler's transition, or its end as cancelled); one that
        does not exist or has ended is left as it is."""
        rt = self.rt
        d = bound.definition
        key = d.key(exec_id)
        bucket = d.bucket
        leader = False  # (a replica may lag: "unknown" or "ended" is read from the leader)
        for _ in range(rt.options.conflict_retries):
            entry = await rt.backend.kv_get(bucket, key, leader=leader)
            state = decode(d.state_type, entry.value) if entry is not None else None
            if state is None or state.status in TERMINAL:
                if not leader:
                    leader = True
                    continue
                if state is None:
                    rt.metric(rt.metrics.unknown_executions, d.id).inc()
                    log.info("ignoring a cancellation of unknown execution %s", key)
                else:
                    log.info("ignoring a cancellation of %s: it ended (%s)", key, state.status)
                return "stale"
            assert entry is not None
            now = self.clock.now()
            ctx: RuleContext[Any, Any] = new_context(
                state, None, d.id, exec_id, key, bucket, entry.revision, "cancel", now
            )
            stop = cancel_child(d, state, reason or "cancelled", rt.options.callback_prefix)
            also = [stop] if stop is not None else []
            state, ended = cancelled(bound, state, ctx, reason or "cancelled", self.owner, also)
            try:
                await self.store.write(d, bucket, key, entry.revision, state, ended, fresh)
            except ConflictError:
                continue
            return "done"
        raise TransientBackendError(
            f"{key}: lost {rt.options.conflict_retries} compare-and-sets in a row"
        )

    async def _apply(
        self,
        bound: BoundWorkflow,
        exec_id: str,
        env: _Envelope,
        ev: CallbackArrival,
        fresh: list[Committed],
        spans: contextlib.ExitStack,
    ) -> str:
        """Apply the callback: "done", "stale" (ignored) or "poison" (to terminate)."""
        rt = self.rt
        d = bound.definition
        msg = ev.msg
        key = d.key(exec_id)
        bucket = d.bucket
        traced = not self.tracing.enabled
        # The waiting state this engine committed, if it still has it: a write based on it
        # is checked by the compare-and-set; anything else is decided on a fresh read.
        parked = self.store.take_parked(bucket, key)
        leader = False  # (a replica may lag: "unknown" or "stale" is read from the leader)
        for _ in range(rt.options.conflict_retries):
            now = self.clock.now()
            cached, parked = parked, None
            entry = (
                cached
                if cached is not None
                else await rt.backend.kv_get(bucket, key, leader=leader)
            )
            if entry is None:
                if not leader:
                    leader = True
                    continue
                rt.metric(rt.metrics.callbacks_received, d.id, "", "unknown").inc()
                log.info("ignoring callback for unknown execution %s", key)
                return "stale"
            state = decode(d.state_type, entry.value)
            if not traced:
                # The worker's trace context if it passed one on, else the execution's.
                traced = True
                spans.enter_context(
                    self.tracing.span(
                        "reactive.callback",
                        parent=self.tracing.parent_from(msg.headers, state.trace_parent),
                        workflow=d.id,
                        key=key,
                        task_id=env.task_id,
                    )
                )
            if state.outbox:
                wait = await self.store.outbox_pending(
                    bucket, key, state, now, entry.revision if cached else None
                )
                if wait is not None:
                    if wait < FOREVER:
                        # Another engine's outbox, in its grace: evaluate the key after it.
                        await rt.set_timer(d.id, GRACE, bucket, key, wait)
                    if cached is not None:
                        continue  # superseded: read it again
                    raise TransientBackendError(
                        f"{key}: an earlier outbox is still being delivered"
                    )
            if state.status is _WAITING and (
                state.is_expired(now)
                or (state.task_deadline is not None and state.task_deadline.timestamp() <= now)
            ):
                # Too late: the deadline or the task timeout came first.
                try:
                    await self.writer.enforce_deadlines(
                        bound, bucket, key, entry.revision, state, now, fresh
                    )
                except ConflictError:
                    continue
                # (The state has no pending rule any more: counted without one.)
                rt.metric(rt.metrics.callbacks_received, d.id, state.pending_rule_id, "late").inc()
                return "stale"
            if (
                state.status is not _WAITING
                or not env.task_id
                or state.pending_task_id != env.task_id
            ):
                if cached is not None or not leader:
                    leader = cached is None
                    continue  # read it again (from the leader) before calling the callback stale
                rt.metric(rt.metrics.callbacks_received, d.id, state.pending_rule_id, "stale").inc()
                log.info("ignoring stale or duplicate callback task=%s for %s", env.task_id, key)
                return "stale"
            rule_id = state.pending_rule_id
            r = d.rules_by_id.get(rule_id)
            if r is None:
                state.fail(f"callback for unknown rule {rule_id!r}")
                ended = end(
                    d, state, None, now, self.owner, "callback_error",
                    mode="callback", rule_id=rule_id,
                )  # fmt: skip
                try:
                    await self.store.write(d, bucket, key, entry.revision, state, ended, fresh)
                except ConflictError:
                    continue
                return "done"
            latency = now - state.pending_since.timestamp() if state.pending_since else 0.0
            result: Any = None
            failure = env.error
            invalid = False
            if not failure:
                try:
                    result = decode(r.result_type, msg.data)
                except DecodeError as e:
                    # A result of the wrong shape: the task failed, now (not at its timeout).
                    failure = f"its result does not decode: {e}"
                    invalid = True
            ctx: RuleContext[Any, Any] = RuleContext(
                state=state,
                message=None,
                workflow_id=d.id,
                execution_id=exec_id,
                key=key,
                bucket=bucket,
                revision=entry.revision,
                subject=msg.subject,
                trigger_mode="callback",
                now=now,
                rule_id=r.id,
            )
            applied = apply_result(
                bound, r, state, entry.value, ctx, result, failure, invalid, env.task_id, self.owner
            )
            if applied.error is not None:
                rt.metric(rt.metrics.dispatch_errors, d.id, r.id).inc()
            status = "invalid" if invalid else "error" if failure else "ok"
            work = applied.state
            try:
                await self.store.commit(d, bucket, key, entry.revision, work, applied.ended, fresh)
            except Replaced:
                status = "too_large"  # the execution failed instead: no longer waiting either
            except ConflictError:
                continue
            rt.metric(rt.metrics.callbacks_received, d.id, r.id, status).inc()
            rt.metric(rt.metrics.callback_latency, d.id, r.id).observe(max(latency, 0.0))
            rt.metric(rt.metrics.pending_callbacks, d.id).dec()
            log.info(
                "transition workflow=%s execution=%s rule=%s action=%s phase=%s status=%s",
                d.id,
                exec_id,
                r.id,
                applied.action,
                work.phase,
                work.status.value,
            )
            if invalid:
                rt.metric(rt.metrics.poison_messages, d.id, "callback").inc()
                log.warning("terminating callback on %s: %s", msg.subject, work.error)
                return "poison"  # (terminated: its effect is committed, it must not come back)
            return "done"
        raise TransientBackendError(
            f"{key}: lost {rt.options.conflict_retries} compare-and-sets in a row"
        )
