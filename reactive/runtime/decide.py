"""Deciding: which rules fire for an event, what holds a rule back, what is overdue. No I/O.

Each answer says what must happen next (a time to look again) instead of doing it:
the handlers schedule the wake-ups.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgspec

from reactive.dsl.context import RuleContext
from reactive.dsl.definition import ActionType, RuleDef, WorkflowDef
from reactive.dsl.state import ExecutionState, Firing, Status
from reactive.meta import FiringRecord
from reactive.runtime.registry import BoundWorkflow

__all__ = ["FOREVER", "Selection", "hold_until", "overdue", "select", "tick"]

FOREVER = math.inf
_PUBLISH_ASYNC = ActionType.PUBLISH_ASYNC
_WAITING = Status.WAITING

Check = Callable[[BoundWorkflow, RuleDef, RuleContext[Any, Any]], bool]


def hold_until(
    r: RuleDef, firing: Firing | FiringRecord | None, trigger: str, now: float
) -> float | None:
    """What holds ``r`` back from firing for ``trigger`` now: None if nothing, else until when.

    FOREVER: it fired for this trigger already, or has fired ``max_firings`` times.
    A time: its cooldown (per execution) ends then. A workflow-wide cooldown is a
    claim in the meta bucket, not decided here.
    """
    if firing is None:
        return None
    if firing.last_trigger == trigger or trigger in firing.recent:
        return FOREVER
    if r.max_firings and firing.count >= r.max_firings:
        return FOREVER
    if r.cooldown and not r.shared_cooldown:
        # One expression for the hold and the wake-up: ``now - last_at < cooldown``
        # can hold at ``last_at + cooldown`` itself (float rounding), and the rule
        # would be held at its own wake-up, re-arming it for that instant forever.
        ready_at = firing.last_at + r.cooldown
        if now < ready_at:
            return ready_at
    return None


def tick(r: RuleDef, state: ExecutionState, now: float) -> tuple[int, float]:
    """A timer rule's tick now (0: not due yet; with ``every``, the count of periods since
    the state's last change), and when its next one is due."""
    changed = state.updated_at or state.created_at
    base = changed.timestamp() if changed is not None else now
    period = r.after or r.every
    if now < base + period:
        return 0, base + period
    if r.after:
        return 1, FOREVER  # (once per revision)
    n = int((now - base) // period)
    due = base + (n + 1) * period
    if due <= now:  # (float rounding at the boundary)
        n, due = n + 1, base + (n + 2) * period
    return n, due


class Selection(msgspec.Struct, gc=False):
    """The rules that fire for one revision of a state.

    ``writer``: the one rule that writes the state (the first whose conditions pass
    and that nothing holds back), or None. ``others``: the rules that only publish.
    ``wake_at``: the earliest end of a cooldown that held a rule (FOREVER: none).
    ``tick_at``: when the next tick of a timer rule (``after=``, ``every=``) whose
    conditions hold is due (FOREVER: none): a timer to schedule.
    ``unclaimed``: the writer has a workflow-wide cooldown, to be claimed in the meta
    bucket before it may fire; the selection stopped there, and goes on from
    ``resume`` once the claim is decided (``select(..., after=...)``, with ``writer``
    set to None if it was refused).
    """

    writer: RuleDef | None
    others: list[RuleDef]
    wake_at: float
    resume: int
    unclaimed: bool = False
    tick_at: float = FOREVER


def select(
    bound: BoundWorkflow,
    rules: list[RuleDef],
    ctx: RuleContext[Any, Any],
    state: ExecutionState,
    trigger: str,
    now: float,
    check: Check,
    after: Selection | None = None,
) -> Selection:
    """Evaluate ``rules`` in definition order on ``ctx`` (whose state is ``state``).

    Every rule's conditions are evaluated at most once per revision: with ``after``,
    the evaluation goes on from where that selection stopped.
    """
    if after is None:
        writer: RuleDef | None = None
        others: list[RuleDef] = []
        wake_at = tick_at = FOREVER
        start = 0
    else:
        writer, others, wake_at, start = after.writer, after.others, after.wake_at, after.resume
        tick_at = after.tick_at
    waiting = state.status is _WAITING
    for i in range(start, len(rules)):
        r = rules[i]
        if r.on_deletes:
            continue
        if r.writes_state:
            if writer is not None:
                continue
            if waiting and r.action is _PUBLISH_ASYNC:
                continue
        ctx.rule_id = r.id
        if not check(bound, r, ctx):
            continue
        if r.after or r.every:
            n, due = tick(r, state, now)
            if due < tick_at:
                tick_at = due
            if not n:
                continue  # not yet
        if r.writes_state:
            firing = state.firings.get(r.id)
            if firing is not None:
                until = hold_until(r, firing, trigger, now)
                if until is not None:
                    if until < wake_at:
                        wake_at = until
                    continue
            writer = r
            if r.shared_cooldown:
                return Selection(writer, others, wake_at, i + 1, True, tick_at)
        else:
            others.append(r)
    return Selection(writer, others, wake_at, len(rules), tick_at=tick_at)


def overdue(d: WorkflowDef, state: ExecutionState, now: float) -> tuple[str, float]:
    """Which of the execution's deadlines has passed ("deadline", "task" or ""), and when
    the next one is due (FOREVER: none)."""
    wake_at = FOREVER
    if state.deadline is not None:
        deadline = state.deadline.timestamp()
        if now >= deadline:
            return "deadline", FOREVER
        wake_at = deadline
    if state.status is _WAITING and state.task_deadline is not None:
        task_deadline = state.task_deadline.timestamp()
        if now >= task_deadline:
            return "task", FOREVER
        wake_at = min(wake_at, task_deadline)
    return "", wake_at
