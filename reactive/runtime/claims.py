"""Claims in the meta bucket: firings of rules that do not write state, and workflow-wide cooldowns.

Guarantees kept here:

* A rule that fires without writing state claims its firing by compare-and-set of
  ``fire.<workflow>.<rule>.<bucket>.<key>``, keyed by the revision (or message)
  that triggered it: it fires once per revision, whatever the number of processes.
  The claim records the count, the time, the trigger and the message; the message
  is published and the claim cleared. A ``pend.`` key marks a claim not yet
  cleared, so that the sweep delivers it if its process died in between.
* Cooldowns and max firings of those rules are counted in the claim: durable and
  shared. A workflow-wide cooldown is one claim, ``cool.<workflow>.<rule>``.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import anyio

from reactive.codecs import encode, encode_json
from reactive.dsl.context import RuleContext
from reactive.dsl.definition import RuleDef, TriggerMode, WorkflowDef
from reactive.errors import BackendError, ConflictError, TransientBackendError
from reactive.meta import (
    CooldownClaim,
    FiringRecord,
    cooldown_key,
    decode_claim,
    decode_record,
    firing_key,
    remember,
    too_old,
)
from reactive.runtime.core import Runtime, log, within
from reactive.runtime.decide import FOREVER, hold_until
from reactive.runtime.events import SWEEP_TARGET, Committed, SweepDue
from reactive.runtime.registry import BoundWorkflow
from reactive.runtime.schedules import cooldown_kind, grace_kind
from reactive.runtime.transition import outbox_message

__all__ = ["Claims"]

_FAILED: Any = object()
_STATE = TriggerMode.STATE
_MESSAGE_AND_STATE = TriggerMode.MESSAGE_AND_STATE


class Claims:
    """Fires the rules that only publish, and claims workflow-wide cooldowns."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.backend = rt.backend
        self.clock = rt.clock
        self.meta_bucket = rt.options.meta_bucket
        self.instance_id = rt.options.instance_id

    def fire(
        self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any], trigger: str
    ) -> Awaitable[None]:
        """Fire a rule that publishes without writing state (the firing to await, in a
        dispatch span when tracing)."""
        firing = self._fire(bound, r, ctx, trigger)
        tracing = self.rt.tracing
        if not tracing.enabled:
            return firing
        d = bound.definition
        span = tracing.span("reactive.dispatch", workflow=d.id, rule=r.id, action=r.action.value)
        return within(span, firing)

    async def _fire(
        self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any], trigger: str
    ) -> None:
        rt = self.rt
        d = bound.definition
        exec_part = f"{ctx.bucket}.{ctx.key}" if ctx.key else "_"
        msg_id = f"{d.id}:{r.id}:{exec_part}:{trigger}"
        claim = (
            r.mode is _STATE
            or r.has_limits
            or (r.mode is _MESSAGE_AND_STATE and not trigger.startswith("c"))
        )
        if not claim:
            payload = self._build(bound, r, ctx)
            if payload is not _FAILED:
                await self.backend.publish(r.publish_subject, encode(payload), msg_id=msg_id)
                rt.metric(rt.metrics.action_dispatches, d.id, r.id, r.action.value).inc()
            return
        suffix = f"{d.id}.{r.id}.{exec_part}"
        meta_key = firing_key(suffix)
        target = (ctx.bucket, ctx.key) if ctx.key else None
        # (A revision's trigger, "r<revision>", or "r<revision>@<tick>" for a timer rule.)
        trigger_rev = int(trigger[1:].partition("@")[0]) if trigger.startswith("r") else 0
        grace = rt.options.outbox_grace
        waited = 0
        for _ in range(rt.options.conflict_retries + 10):
            entry = await self.backend.kv_get(self.meta_bucket, meta_key)
            rec = decode_record(entry)
            rev = entry.revision if entry is not None else 0
            now = self.clock.now()
            if rec.pending:
                if rec.pending_owner != self.instance_id and now < rec.pending_at + grace:
                    # Another process is delivering its claim; it normally clears in milliseconds.
                    if waited < 10:
                        waited += 1
                        await anyio.sleep(0.005 * waited)
                        continue
                    if target is not None:
                        # Look again once its grace is over (the sweep delivers its claim).
                        await rt.set_timer(d.id, grace_kind(r.id), *target, rec.pending_at + grace)
                    return
                if not await self.deliver(d, meta_key, rec, rev):
                    continue
                entry = await self.backend.kv_get(self.meta_bucket, meta_key)
                rec = decode_record(entry)
                rev = entry.revision if entry is not None else 0
            if trigger_rev and too_old(rec, trigger_rev):
                return  # older than every revision remembered: treated as fired
            until = hold_until(r, rec, trigger, now)
            if until is not None:
                if target is not None and until < FOREVER:
                    # Held by its cooldown: the rule fires for the key's latest revision then.
                    await rt.set_timer(d.id, cooldown_kind(r.id), *target, until)
                return
            if r.shared_cooldown and not await self.claim_cooldown(
                d, r, exec_part, rec.count, now, target
            ):
                return
            payload = self._build(bound, r, ctx)
            if payload is _FAILED:
                return
            m = outbox_message(r.publish_subject, payload, msg_id)
            rec.count += 1
            rec.last_at = now
            rec.last_trigger = trigger
            remember(rec, trigger)
            rec.pending = [m]
            rec.pending_owner = self.instance_id
            rec.pending_at = now
            # Mark first, claim second: a mark without a pending claim is only swept away.
            await self.backend.kv_put(self.meta_bucket, "pend." + suffix, b"")
            try:
                if rev == 0:
                    claimed = await self.backend.kv_create(
                        self.meta_bucket, meta_key, encode_json(rec)
                    )
                else:
                    claimed = await self.backend.kv_update(
                        self.meta_bucket, meta_key, encode_json(rec), rev
                    )
            except ConflictError:
                rt.metric(rt.metrics.cas_conflicts, d.id).inc()
                continue
            await self.deliver(d, meta_key, rec, claimed)
            log.info(
                "fired workflow=%s rule=%s key=%s trigger=%s action=publish",
                d.id,
                r.id,
                ctx.key or "-",
                trigger,
            )
            return
        log.warning("gave up claiming %s after %d conflicts", meta_key, rt.options.conflict_retries)

    def _build(self, bound: BoundWorkflow, r: RuleDef, ctx: RuleContext[Any, Any]) -> Any:
        """The rule's payload, or _FAILED (counted and logged) if it raised."""
        try:
            if r.mutator is not None:
                r.mutator(ctx)
            return bound.methods[r.id](ctx)
        except Exception as e:
            self.rt.metric(self.rt.metrics.dispatch_errors, bound.definition.id, r.id).inc()
            log.warning("rule %s.%s raised %r; nothing published", bound.definition.id, r.id, e)
            return _FAILED

    async def deliver(self, d: WorkflowDef, meta_key: str, rec: FiringRecord, rev: int) -> bool:
        """Publish a claim's pending messages, clear the claim and its mark. False if the clear lost."""
        rt = self.rt
        for m in rec.pending:
            await self.backend.publish(
                m.subject, m.payload(), headers=m.headers or None, msg_id=m.msg_id
            )
            rt.metric(rt.metrics.action_dispatches, d.id, meta_key.split(".")[2], "publish").inc()
        rec.pending = []
        try:
            await self.backend.kv_update(self.meta_bucket, meta_key, encode_json(rec), rev)
        except ConflictError:
            rt.metric(rt.metrics.cas_conflicts, d.id).inc()
            return False
        await self.backend.kv_delete(self.meta_bucket, "pend." + meta_key[len("fire.") :])
        return True

    async def on_sweep(self, ev: SweepDue, fresh: list[Committed]) -> None:
        try:
            await self.sweep()
        except BackendError as e:
            log.warning("claim sweep failed (%s); trying again later", e)
            delay = min(self.rt.options.sweep_interval, 5.0)
            self.rt.timers.schedule(self.clock.now() + delay, SWEEP_TARGET)

    async def sweep(self) -> None:
        """Deliver claims whose process died between claiming and publishing."""
        rt = self.rt
        now = self.clock.now()
        grace = rt.options.outbox_grace
        next_due = now + rt.options.sweep_interval
        for mark in await self.backend.kv_keys(self.meta_bucket, "pend.>"):
            meta_key = firing_key(mark[len("pend.") :])
            entry = await self.backend.kv_get(self.meta_bucket, meta_key)
            rec = decode_record(entry)
            if entry is None or not rec.pending:
                await self.backend.kv_delete(self.meta_bucket, mark)
                continue
            if now < rec.pending_at + grace:
                next_due = min(next_due, rec.pending_at + grace)
                continue
            wf_id = meta_key.split(".")[1]
            bound = rt.registry.workflows.get(wf_id)
            if bound is None:
                continue  # not ours to deliver: another engine serves that workflow
            log.info("delivering claim %s left by %s", meta_key, rec.pending_owner or "?")
            await self.deliver(bound.definition, meta_key, rec, entry.revision)
        rt.timers.schedule(next_due, SWEEP_TARGET)

    async def claim_cooldown(
        self,
        d: WorkflowDef,
        r: RuleDef,
        exec_key: str,
        count: int,
        now: float,
        target: tuple[str, str] | None,
    ) -> bool:
        """Claim the workflow-wide cooldown of ``r`` for its firing number ``count + 1`` for
        ``exec_key``; False while another firing's cooldown runs (with ``target``, the
        bucket and key to evaluate again then, a timer is set for its end).

        One compare-and-set of ``cool.<workflow>.<rule>`` in the meta bucket, before the
        firing's own commit: of several processes (or executions) only one claims it.
        """
        rt = self.rt
        meta_key = cooldown_key(d.id, r.id)
        for _ in range(rt.options.conflict_retries):
            entry = await self.backend.kv_get(self.meta_bucket, meta_key)
            claim = decode_claim(entry)
            if claim is not None:
                ready_at = claim.at + r.cooldown
                if now < ready_at:
                    if claim.key == exec_key and claim.count == count:
                        return True  # claimed for this very firing, whose commit was not made yet
                    if target is not None:
                        await rt.set_timer(d.id, cooldown_kind(r.id), *target, ready_at)
                    return False
            value = encode_json(CooldownClaim(at=now, key=exec_key, count=count))
            # It means nothing once the cooldown is over: it goes then.
            ttl = r.cooldown
            try:
                if entry is None:
                    await self.backend.kv_create(self.meta_bucket, meta_key, value, ttl=ttl)
                else:
                    await self.backend.kv_update(
                        self.meta_bucket, meta_key, value, entry.revision, ttl=ttl
                    )
            except ConflictError:
                rt.metric(rt.metrics.cas_conflicts, d.id).inc()
                continue
            return True
        raise TransientBackendError(
            f"{meta_key}: lost {rt.options.conflict_retries} compare-and-sets in a row"
        )
