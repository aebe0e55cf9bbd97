"""Timers that live in NATS: message schedules on the timer stream (ADR-51, nats-server 2.12+).

An execution's time (its deadline, its task's timeout, the end of a rule's cooldown,
another engine's grace period) is a message schedule, not a timer in an engine:

* a timer is a publish on ``reactive.timer.at.<workflow>.<kind>.<bucket>.<key>``
  with ``Nats-Schedule: @at <time>``, targeting
  ``reactive.timer.due.<workflow>.<kind>.<bucket>.<key>`` (the key last: it may
  have several tokens); its data is the time, as the engine's clock reads it;
* when it is due the server stores the target message; the triggers consume
  ``reactive.timer.due.<workflow>.>`` with a durable shared by every engine, and
  the key's worker evaluates its latest revision (``TimerDue``);
* the server keeps one schedule per schedule subject: a later one replaces it.
  Each kind is chosen so that the latest schedule is the one that matters (see
  the kinds below); where the earliest would matter, the subject differs.

The timers a commit decides travel in the state's outbox (``timer_message``), so
they are published after the write and never lost; those decided while evaluating
are published directly (``Runtime.set_timer``). Pure: building subjects and
messages, reading them back.
"""

from __future__ import annotations

import math

from reactive.backends.base import schedule_headers
from reactive.dsl.state import OutboxMessage

__all__ = [
    "DEADLINE",
    "GRACE",
    "TASK",
    "TICK",
    "TIMER_PREFIX",
    "cooldown_kind",
    "due_at",
    "due_filter",
    "grace_kind",
    "parse_due",
    "timer_id",
    "timer_message",
    "timer_subject_length",
    "timer_subjects",
]

TIMER_PREFIX = "reactive.timer"
_AT = f"{TIMER_PREFIX}.at."
_DUE = f"{TIMER_PREFIX}.due."

# The kinds, one schedule subject per execution (or key) for each:
# The execution's deadline: fixed when it starts (a rule that moves it schedules the
# new one, which replaces the old: the latest deadline is the execution's).
DEADLINE = "deadline"
# The pending task's timeout: one task is pending at a time, and a new task's
# timeout replaces the timeout of the one before (answered or timed out by then).
TASK = "task"
# The grace period of the outbox another engine left on the key's latest revision:
# a newer revision's outbox is the only one still to deliver, so its grace replaces.
GRACE = "grace"
# The next tick of the key's timer rules (``after=``, ``every=``): the earliest due among
# those whose conditions hold on its latest revision, decided at each evaluation of it.
TICK = "tick"


def cooldown_kind(rule_id: str) -> str:
    """One subject per rule: a rule's latest firing decides when its cooldown ends (a
    later end replaces an earlier one); another rule's cooldown must not replace it."""
    return f"cool-{rule_id}"


def grace_kind(rule_id: str) -> str:
    """The grace period of another engine's claim for a rule that only publishes: one
    subject per rule, as several rules may each wait for a claim of their own."""
    return f"grace-{rule_id}"


def timer_subjects(workflow_id: str, kind: str, bucket: str, key: str) -> tuple[str, str]:
    """The schedule subject of a timer, and the subject its message is stored on when due."""
    tail = f"{workflow_id}.{kind}.{bucket}.{key}"
    return _AT + tail, _DUE + tail


def timer_subject_length(workflow_id: str, kind: str, bucket: str, key_length: int) -> int:
    """The length of the longest of a timer's subjects."""
    return len(_DUE) + len(workflow_id) + len(kind) + len(bucket) + 2 + key_length


def due_filter(workflow_id: str) -> str:
    """What the workflow's timer consumer takes: every due timer of the workflow."""
    return f"{_DUE}{workflow_id}.>"


def timer_id(workflow_id: str, execution_id: str, revision: int, kind: str, at: float) -> str:
    """The message id of a timer in an outbox: the same whenever the outbox is delivered
    again (the stream drops the repeat), another for another time (an execution created
    again with the same id)."""
    return f"{workflow_id}:{execution_id}:{revision}:{kind}@{at!r}"


def timer_message(
    workflow_id: str, kind: str, bucket: str, key: str, at: float, msg_id: str = ""
) -> OutboxMessage:
    """The schedule of a timer at ``at`` (on the engine's clock), as an outbox message."""
    schedule, due = timer_subjects(workflow_id, kind, bucket, key)
    return OutboxMessage(
        subject=schedule,
        data=repr(at).encode(),
        msg_id=msg_id,
        headers=schedule_headers(at, due),
    )


def parse_due(subject: str, workflow_id: str) -> tuple[str, str] | None:
    """The bucket and key of a due timer of the workflow, from its subject (None: not one)."""
    prefix = f"{_DUE}{workflow_id}."
    if not subject.startswith(prefix):
        return None
    parts = subject[len(prefix) :].split(".", 2)  # kind, bucket, key
    if len(parts) < 3 or not all(parts):
        return None
    return parts[1], parts[2]


def due_at(data: bytes) -> float | None:
    """The time a due timer was set for (on the engine's clock), or None if unreadable."""
    try:
        at = float(data)
    except ValueError:
        return None
    return at if math.isfinite(at) else None
