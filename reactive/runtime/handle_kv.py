"""Handling a KV revision, or a timer of a key: evaluate the rules that watch it.

The hot path of the engine: decode the state, settle what an earlier write left
(its outbox, a passed deadline), select the rules that fire (``decide.select``),
fire the ones that only publish, then the one that writes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any, Final

import msgspec

from reactive.backends.base import InboundMessage, KVEntry
from reactive.codecs import decode, decoder_for
from reactive.dsl.context import RuleContext, new_context
from reactive.dsl.definition import RuleDef
from reactive.dsl.state import ExecutionState, Status
from reactive.errors import ConflictError, TransientBackendError
from reactive.runtime.claims import Claims
from reactive.runtime.core import DONE, Runtime, log, within
from reactive.runtime.decide import FOREVER, select, tick
from reactive.runtime.events import Committed, KVChange, TimerDue
from reactive.runtime.registry import BoundWorkflow
from reactive.runtime.schedules import GRACE, TICK
from reactive.runtime.shards import KeyOrder
from reactive.runtime.store import Store
from reactive.runtime.transition import TERMINAL, start_timers, utc
from reactive.runtime.writer import Writer

__all__ = ["KVHandler"]

# How soon a change whose compare-and-set lost with nothing newer there, or a fired timer
# that found no state, comes again; and how many deliveries a key the leader reads as
# gone gets: a refused change about 10 s (a new leader that lags, or a key really gone:
# rare, after a refused compare-and-set); a fired timer 2.5 s (a key removed by its
# retention before its deadline fires is common, and the leader's view lags briefly).
_RECHECK: Final = 0.5
_RECHECKS: Final = 20
_TIMER_RECHECKS: Final = 5

_PENDING = Status.PENDING


class KVHandler:
    """Evaluates the rules that watch a key, on each revision and when its timers come."""

    def __init__(
        self, rt: Runtime, order: KeyOrder, store: Store, claims: Claims, writer: Writer
    ) -> None:
        self.rt = rt
        self.order = order
        self.store = store
        self.claims = claims
        self.writer = writer
        self.clock = rt.clock
        self.tracing = rt.tracing
        self.owner = rt.options.instance_id

    async def on_change(self, ev: KVChange, fresh: list[Committed]) -> None:
        entry = ev.entry
        order = self.order
        bound = ev.bound
        k = (entry.bucket, entry.key)
        latest = order.latest.get(k, entry.revision)
        # A newer revision of this key is queued behind this one: rules that write
        # state would only lose their compare-and-set, so only the rules that just
        # publish are evaluated here (they fire once per revision).
        stale = entry.revision < latest
        if latest == entry.revision:
            order.latest.pop(k, None)
        rules = ev.rules
        if stale:
            rules = [r for r in rules if not r.writes_state]
        if rules and not (
            order.chained
            and order.seen((bound.definition.id, entry.bucket, entry.key), entry.revision)
        ):  # (seen: queued before its evaluation right after the commit; done)
            if entry.operation != "PUT":
                await self.on_delete(bound, rules, entry.bucket, entry.key, entry.revision, "kv")
            else:
                conflicted = self.rt.conflicted  # (empty but in a failover)
                target = (bound.definition.id, entry.bucket, entry.key)
                if conflicted:
                    conflicted.discard(target)
                await self.evaluate(
                    bound, rules, entry.bucket, entry.key, entry.revision, entry.value, "kv",
                    fresh, stale,
                )  # fmt: skip
                if conflicted and target in conflicted:
                    conflicted.discard(target)
                    if ev.msg is not None and not await self._superseded(
                        entry, ev.msg.num_delivered
                    ):
                        # Its compare-and-set lost, yet no newer revision is there: a new
                        # leader's view that lags (or a read that does). Evaluated again
                        # soon, rather than acknowledged and lost.
                        await self.rt.settle(ev.msg, "nak", _RECHECK)
                        return
        if ev.msg is not None:
            await self._settle(ev.msg, bound, entry.bucket, entry.key)

    async def _superseded(self, entry: KVEntry, deliveries: int) -> bool:
        """Whether the key has a revision newer than ``entry``'s (a failed read: no), as
        the bucket's leader has it (a replica may lag: it would tell of no key at all). A
        key read as gone counts as superseded from the _RECHECKS-th delivery on (deleted,
        or a new leader's view that lags for that long)."""
        try:
            current = await self.rt.backend.kv_get(entry.bucket, entry.key, leader=True)
        except TransientBackendError:
            return False
        if current is None:
            return deliveries >= _RECHECKS
        return current.revision > entry.revision

    async def _settle(
        self, msg: InboundMessage, bound: BoundWorkflow, bucket: str, key: str
    ) -> None:
        """Acknowledge a change or a timer once evaluated. While its evaluation fails, this
        process retries the key (``Runtime.retry_later``) and holds the message in progress
        (``Runtime.hold``): it comes again once a retry succeeds, or, if this process dies,
        to the partition's next owner an ack wait after the death."""
        rt = self.rt
        wf = bound.definition.id
        if rt.retries and rt.retries.get((wf, bucket, key)):
            rt.hold(wf, bucket, key, msg)
        else:
            await rt.settle(msg, "ack")

    async def on_timer(self, ev: TimerDue, fresh: list[Committed]) -> None:
        """A timer of the key: evaluate its latest revision (a missing key: nothing to do).

        A timer from NATS is acknowledged once that is done, or held in progress while
        this process retries a transient failure (``_settle``): not lost with the process.
        """
        rt = self.rt
        bound = rt.registry.workflows.get(ev.workflow_id)
        bucket, key = ev.bucket, ev.key
        if bound is not None:
            try:
                current = await rt.backend.kv_get(bucket, key)
                if current is None:  # (a replica that lags would have the timer dropped)
                    current = await rt.backend.kv_get(bucket, key, leader=True)
            except TransientBackendError as e:
                rt.retry_later(bound, bucket, key, e)
            else:
                if (
                    current is None
                    and ev.msg is not None
                    and ev.msg.num_delivered < _TIMER_RECHECKS
                ):
                    # No state for a timer set on one: deleted, or a view that lags (a new
                    # leader's). Acknowledged, a lagging view would lose the timer for good:
                    # it comes again first (0.5 s later, up to _TIMER_RECHECKS deliveries).
                    await rt.settle(ev.msg, "nak", _RECHECK)
                    return
                if current is None:
                    await rt.succeeded(ev.workflow_id, bucket, key)
                else:
                    rules = [
                        r for b, rs in rt.registry.match_kv(bucket, key) if b is bound for r in rs
                    ]
                    target = (ev.workflow_id, bucket, key)
                    conflicted = rt.conflicted
                    if conflicted:
                        conflicted.discard(target)
                    await self.evaluate(
                        bound, rules, bucket, key, current.revision, current.value, "timer", fresh
                    )
                    if conflicted and target in conflicted:
                        conflicted.discard(target)
                        if ev.msg is not None and ev.msg.num_delivered < _RECHECKS:
                            # Its compare-and-set lost: to a newer revision, or the revision
                            # read was a lagging replica's. Evaluated again on a new read.
                            await rt.settle(ev.msg, "nak", _RECHECK)
                            return
        if ev.msg is not None and bound is not None:
            await self._settle(ev.msg, bound, bucket, key)
        elif ev.msg is not None:
            await rt.settle(ev.msg, "ack")

    async def on_delete(
        self, bound: BoundWorkflow, rules: list[RuleDef], bucket: str, key: str, revision: int,
        mode: str,
    ) -> None:  # fmt: skip
        """A delete or purge: only rules that ask for them fire."""
        rt = self.rt
        d = bound.definition
        try:
            for r in rules:
                if r.on_deletes:
                    ctx: RuleContext[Any, Any] = RuleContext(
                        state=None,
                        message=None,
                        workflow_id=d.id,
                        execution_id=d.execution_id_for(key),
                        key=key,
                        bucket=bucket,
                        revision=revision,
                        trigger_mode=mode,
                        now=self.clock.now(),
                        rule_id=r.id,
                    )
                    if rt.check(bound, r, ctx):
                        await self.claims.fire(bound, r, ctx, f"r{revision}")
        except TransientBackendError as e:
            rt.retry_later(bound, bucket, key, e)
        else:
            await rt.succeeded(d.id, bucket, key)

    def evaluate(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        bucket: str,
        key: str,
        revision: int,
        raw: bytes,
        mode: str,
        fresh: list[Committed],
        stale: bool = False,
    ) -> Awaitable[None]:
        """Evaluate ``rules`` on one revision of a state (``raw``), in the trigger's span when
        tracing. A transient failure is retried later (``Runtime.retry_later``).

        Not a coroutine: it returns the evaluation to await (one coroutine per event).
        """
        d = bound.definition
        try:
            state: ExecutionState = decoder_for(d.state_type).decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.rt.decode_state(d, bucket, key, revision, raw)  # (counted and logged there)
            return DONE
        evaluation = self._evaluate(
            bound, rules, bucket, key, revision, raw, mode, fresh, stale, state
        )
        if not self.tracing.enabled:
            return evaluation
        span = self.tracing.span(
            f"reactive.{mode}",
            parent=self.tracing.parent_from(None, state.trace_parent),
            workflow=d.id,
            bucket=bucket,
            key=key,
            revision=revision,
        )
        return within(span, evaluation)

    async def _evaluate(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        bucket: str,
        key: str,
        revision: int,
        raw: bytes,
        mode: str,
        fresh: list[Committed],
        stale: bool,
        state: ExecutionState,
    ) -> None:
        rt = self.rt
        d = bound.definition
        failed = False
        try:
            now = self.clock.now()
            exec_id = state.id or d.execution_id_for(key)
            if stale:
                # Superseded: the newer revision settles outboxes, deadlines and writers.
                if state.status not in TERMINAL:
                    await self._publishers_only(bound, rules, state, exec_id, key, bucket, revision, mode, now)  # fmt: skip
                return
            if state.outbox:
                wait = await self.store.outbox_pending(bucket, key, state, now, revision)
                if wait is not None:
                    if wait < FOREVER:
                        # Another engine's outbox, in its grace period: look again after it.
                        await rt.set_timer(d.id, GRACE, bucket, key, wait)
                    return
            # Started here (from a PENDING state someone wrote), or by someone else
            # (no engine wrote it: the CLI's start): its timers are scheduled by the
            # engine's first write, the writer's or this one's.
            started = needs_init = False
            if state.status is _PENDING:
                state.initialize(exec_id, d.id, now, d.timeout)
                started = True
                needs_init = d.timeout is not None
            elif not state.owner:
                started = True
                needs_init = state.deadline is not None or state.task_deadline is not None
            if state.status in TERMINAL:
                return
            try:
                if (
                    state.deadline is not None or state.task_deadline is not None
                ) and await self.writer.enforce_deadlines(
                    bound, bucket, key, revision, state, now, fresh
                ):
                    return
            except ConflictError:
                return  # a newer revision beat us; its partition brings it
            ctx: RuleContext[Any, Any] = new_context(
                state, None, d.id, exec_id, key, bucket, revision, mode, now
            )
            trigger = f"r{revision}"
            evaluating = (
                self.tracing.start("reactive.evaluate", workflow=d.id, rules=len(rules))
                if self.tracing.enabled
                else None
            )
            chosen = select(bound, rules, ctx, state, trigger, now, rt.check)
            while chosen.unclaimed:
                w = chosen.writer
                assert w is not None
                firing = state.firings.get(w.id)
                if not await self.claims.claim_cooldown(
                    d, w, f"{bucket}.{key}", firing.count if firing else 0, now, (bucket, key)
                ):
                    chosen.writer = None
                chosen = select(bound, rules, ctx, state, trigger, now, rt.check, chosen)
            writer, others = chosen.writer, chosen.others
            if chosen.tick_at < FOREVER:
                # A timer rule whose conditions hold waits for its time: look again then.
                await rt.set_timer(d.id, TICK, bucket, key, chosen.tick_at)
            # (A rule held by its own cooldown, chosen.wake_at, needs no timer here: the
            # firing that started the cooldown scheduled its end, in its outbox.)
            if evaluating is not None:
                evaluating.set_attribute(
                    "reactive.fired", [r.id for r in ([writer] if writer else []) + others]
                )
                evaluating.end()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "evaluated workflow=%s key=%s revision=%d trigger=%s status=%s phase=%s writer=%s publishers=%s",
                    d.id,
                    key,
                    revision,
                    mode,
                    state.status.value,
                    state.phase,
                    writer.id if writer else "-",
                    ",".join(r.id for r in others) or "-",
                )
            # Rules that only publish go first: if this process dies after the state write
            # below, the revision they fired for is gone, and with it their chance to fire.
            for r in others:
                ctx.rule_id = r.id
                # (An ``every`` rule fires once per tick of a revision, not once per revision.)
                fired = f"{trigger}@{tick(r, state, now)[0]}" if r.every else trigger
                await self.claims.fire(bound, r, ctx, fired)
            try:
                if writer is not None:
                    if others:
                        # Rules that only publish saw ``state``: the writer gets a copy of its own.
                        base = decode(d.state_type, raw)
                        if base.status is _PENDING:
                            base.initialize(exec_id, d.id, now, d.timeout)
                    else:
                        base = state  # conditions only read it (and an initialized PENDING is the same)
                    commit = self.writer.fire(
                        bound, writer, bucket, key, revision, base, None, mode, key, trigger,
                        fresh, ctx if base is state else None, started,
                    )  # fmt: skip
                    await (
                        commit
                        if not self.tracing.enabled
                        else self.writer.in_span(commit, bound, writer)
                    )
                elif needs_init:
                    state.updated_at = utc(now)
                    state.owner = self.owner
                    state.outbox = start_timers(d, state, bucket, key, revision)
                    state.outbox_id = f"{d.id}:{exec_id}:{revision}"
                    await self.store.write(d, bucket, key, revision, state, None, fresh)
            except ConflictError:
                # A newer revision beat us; its partition brings it, to be evaluated then.
                # (Noted for the caller: a "newer" one may be a new leader's lagging view.)
                rt.conflicted.add((d.id, bucket, key))
        except TransientBackendError as e:
            failed = True
            rt.retry_later(bound, bucket, key, e)
        except BaseException:
            failed = True  # (not a transient failure: counted by no backoff)
            raise
        finally:
            if (rt.retries or rt.held) and not failed:
                await rt.succeeded(d.id, bucket, key)  # it completed: back off from 0 again

    async def _publishers_only(
        self,
        bound: BoundWorkflow,
        rules: list[RuleDef],
        state: ExecutionState,
        exec_id: str,
        key: str,
        bucket: str,
        revision: int,
        mode: str,
        now: float,
    ) -> None:
        """A superseded revision: only the rules that publish fire for it (once per revision)."""
        d = bound.definition
        ctx: RuleContext[Any, Any] = new_context(
            state, None, d.id, exec_id, key, bucket, revision, mode, now
        )
        for r in rules:
            if not r.writes_state and not r.on_deletes and not (r.after or r.every):
                ctx.rule_id = r.id
                if self.rt.check(bound, r, ctx):
                    await self.claims.fire(bound, r, ctx, f"r{revision}")
