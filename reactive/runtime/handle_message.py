"""Handling a message: the rules on its subject that fire for the message alone, then those
that fire for the message together with an execution's state (starting it if it is missing).

A message is acknowledged once its effects are committed; a transient failure hands
it back for redelivery with backoff, and one that cannot succeed is terminated.
"""

from __future__ import annotations

import operator
import uuid
from typing import Any

from reactive.codecs import decode
from reactive.dsl.context import RuleContext
from reactive.dsl.definition import ActionType, RuleDef, TriggerMode
from reactive.dsl.state import ExecutionState, Status
from reactive.errors import ConflictError, DecodeError, TransientBackendError
from reactive.runtime.claims import Claims
from reactive.runtime.core import Runtime, log, within
from reactive.runtime.decide import FOREVER, hold_until
from reactive.runtime.events import Committed, MessageArrival
from reactive.runtime.registry import BoundWorkflow
from reactive.runtime.schedules import GRACE
from reactive.runtime.store import Store
from reactive.runtime.transition import TERMINAL
from reactive.runtime.writer import Writer

__all__ = ["MessageHandler"]

_by_index = operator.attrgetter("index")

_PENDING = Status.PENDING
_WAITING = Status.WAITING
_PUBLISH_ASYNC = ActionType.PUBLISH_ASYNC
_MESSAGE = TriggerMode.MESSAGE
_MESSAGE_AND_STATE = TriggerMode.MESSAGE_AND_STATE


class MessageHandler:
    """Fires the rules of one subscription for a message, then settles the message."""

    def __init__(self, rt: Runtime, store: Store, claims: Claims, writer: Writer) -> None:
        self.rt = rt
        self.store = store
        self.claims = claims
        self.writer = writer
        self.clock = rt.clock
        self.tracing = rt.tracing

    async def on_message(self, ev: MessageArrival, fresh: list[Committed]) -> None:
        handling = self._handle(ev, fresh)
        if not self.tracing.enabled:
            await handling
            return
        span = self.tracing.span(
            "reactive.message",
            parent=self.tracing.parent_from(ev.msg.headers),
            workflow=ev.sub.bound.definition.id,
            subject=ev.msg.subject,
        )
        await within(span, handling)

    async def _handle(self, ev: MessageArrival, fresh: list[Committed]) -> None:
        rt = self.rt
        sub, msg, decoded = ev.sub, ev.msg, ev.decoded
        d = sub.bound.definition
        trigger = f"m{msg.stream}:{msg.sequence}" if msg.stream else f"c{uuid.uuid4().hex}"
        try:
            # Message-only rules: every one whose conditions pass fires.
            for r in sub.rules:
                if r.mode is _MESSAGE:
                    ctx: RuleContext[Any, Any] = RuleContext(
                        state=None,
                        message=decoded[r.message_type],
                        workflow_id=d.id,
                        subject=msg.subject,
                        trigger_mode="message",
                        now=self.clock.now(),
                        rule_id=r.id,
                    )
                    if rt.check(sub.bound, r, ctx):
                        await self.claims.fire(sub.bound, r, ctx, trigger)
            by_key: dict[str, list[RuleDef]] = {}
            for r in sub.rules:
                if r.mode is _MESSAGE_AND_STATE:
                    by_key.setdefault(ev.keyed[r.id], []).append(r)
            unknown = 0
            for exec_id, rules in by_key.items():
                if not await self._with_state(sub.bound, rules, exec_id, ev, trigger, fresh):
                    unknown += 1
            if by_key and unknown == len(by_key):
                # For executions that do not exist, whose rules may not start them: a
                # signal to no one.
                rt.metric(rt.metrics.unknown_executions, d.id).inc()
                log.warning(
                    "terminating message on %s for %s: no such execution (%s)",
                    msg.subject,
                    d.id,
                    ", ".join(by_key),
                )
                await rt.settle(msg, "term")
                return
        except TransientBackendError as e:
            await rt.redeliver_later(msg, e, "")
            return
        except DecodeError as e:
            rt.metric(rt.metrics.state_decode_errors, d.id).inc()
            log.warning(
                "terminating message on %s: the execution's state cannot be decoded: %s",
                msg.subject,
                e,
            )
            await rt.settle(msg, "term")
            return
        except Exception:
            log.exception("error handling message on %s", msg.subject)
            if msg.num_delivered >= rt.options.max_deliver:
                await rt.settle(msg, "term")
            else:
                await rt.settle(msg, "nak", min(0.5 * msg.num_delivered, 30.0))
            return
        await rt.settle(msg, "ack")

    async def _with_state(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        exec_id: str,
        ev: MessageArrival,
        trigger: str,
        fresh: list[Committed],
    ) -> bool:
        """The message + state rules for one execution, on its latest revision (a missing one
        is started by the rules that may: ``create``); a compare-and-set that loses is tried
        again on the newer revision. False: it does not exist and none of them may start it."""
        rt = self.rt
        d = bound.definition
        msg, decoded = ev.msg, ev.decoded
        key = d.key(exec_id)
        bucket = d.bucket
        pending = list(rules)  # the rules this message has not fired yet
        refused: list[RuleDef] = []  # those that may not start it, while it is missing
        for _ in range(rt.options.conflict_retries):
            now = self.clock.now()
            entry = await rt.backend.kv_get(bucket, key)
            # Started now, or by someone other than an engine: its deadline has no timer yet.
            started = True
            if entry is None:
                if not all(r.creates for r in pending):
                    # (Set aside: they fire if it exists after all, written meanwhile.)
                    refused = [r for r in pending if not r.creates]
                    pending = [r for r in pending if r.creates]
                    if not pending:
                        return False
                revision, raw = 0, b""
                state = d.state_type()
                state.initialize(exec_id, d.id, now, d.timeout)
            else:
                revision, raw = entry.revision, entry.value
                state = decode(d.state_type, raw)
                if state.outbox:
                    wait = await self.store.outbox_pending(bucket, key, state, now)
                    if wait is not None:
                        if wait < FOREVER:
                            # Another engine's outbox, in its grace: evaluate the key after it.
                            await rt.set_timer(d.id, GRACE, bucket, key, wait)
                        raise TransientBackendError(
                            f"{key}: an earlier outbox is still being delivered"
                        )
                started = state.status is _PENDING or not state.owner
                if state.status is _PENDING:
                    state.initialize(state.id or exec_id, d.id, now, d.timeout)
            if state.status in TERMINAL:
                return True
            try:
                if entry is not None and await self.writer.enforce_deadlines(
                    bound, bucket, key, revision, state, now, fresh
                ):
                    return True
                writer: RuleDef | None = None
                others: list[RuleDef] = []
                deferred = False

                def message_ctx(
                    r: RuleDef,
                    state: ExecutionState = state,
                    revision: int = revision,
                    now: float = now,
                ) -> RuleContext[Any, Any]:
                    return RuleContext(
                        state=state,
                        message=decoded[r.message_type],
                        workflow_id=d.id,
                        execution_id=exec_id,
                        key=key,
                        bucket=bucket,
                        revision=revision,
                        subject=msg.subject,
                        trigger_mode="message+state",
                        now=now,
                        rule_id=r.id,
                    )

                for r in pending:
                    if r.writes_state and writer is not None:
                        deferred = True
                        continue
                    if r.action is _PUBLISH_ASYNC and state.status is _WAITING:
                        continue
                    if not rt.check(bound, r, message_ctx(r)):
                        continue
                    if r.writes_state:
                        firing = state.firings.get(r.id)
                        if hold_until(r, firing, trigger, now) is not None:
                            continue
                        if r.shared_cooldown and not await self.claims.claim_cooldown(
                            d, r, f"{bucket}.{key}", firing.count if firing else 0, now, None
                        ):
                            continue
                        writer = r
                    else:
                        others.append(r)
                for r in others:
                    await self.claims.fire(bound, r, message_ctx(r), trigger)
                if others:
                    pending = [r for r in pending if r not in others]
                if writer is not None:
                    if entry is None:
                        work = d.state_type()
                        work.initialize(exec_id, d.id, now, d.timeout)
                    else:
                        work = decode(d.state_type, raw)
                        if work.status is _PENDING:
                            work.initialize(work.id or exec_id, d.id, now, d.timeout)
                    commit = self.writer.fire(
                        bound, writer, bucket, key, revision, work, decoded[writer.message_type],
                        "message+state", msg.subject, trigger, fresh, None, started,
                    )  # fmt: skip
                    await self.writer.in_span(commit, bound, writer)
                if writer is not None and deferred:
                    # The later writers are evaluated again, on the revision this one wrote.
                    pending = [r for r in pending if r is not writer]
                    continue
                return True
            except ConflictError:
                if refused:
                    pending = sorted([*pending, *refused], key=_by_index)
                    refused = []
                continue
        raise TransientBackendError(
            f"{key}: lost {rt.options.conflict_retries} compare-and-sets in a row"
        )
