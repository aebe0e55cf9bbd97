"""What the triggers hand to the shards: one typed record per kind of event.

A worker sends each record to the handler of its kind (``Engine`` wires them: KV
revisions and timers to :mod:`reactive.runtime.handle_kv`, messages to
:mod:`reactive.runtime.handle_message`, callbacks to
:mod:`reactive.runtime.handle_callback`, sweeps to :mod:`reactive.runtime.claims`).

They hold only references handed on (entries, messages, the workflow they are
for): they form no cycles, so the garbage collector does not track them.
"""

from __future__ import annotations

from typing import Any

import msgspec

from reactive.backends.base import InboundMessage, KVEntry
from reactive.runtime.registry import BoundWorkflow, Subscription

__all__ = [
    "SWEEP_TARGET",
    "CallbackArrival",
    "Committed",
    "Event",
    "KVChange",
    "MessageArrival",
    "SweepDue",
    "TimerDue",
]


class KVChange(msgspec.Struct, gc=False):
    """A revision of a watched key, for the rules of one workflow that watch it (``msg``: the
    change from the key's partition in the workflow's set, acknowledged once evaluated)."""

    entry: KVEntry
    bound: BoundWorkflow
    rules: list[Any]
    msg: InboundMessage | None = None


class MessageArrival(msgspec.Struct, gc=False):
    """A message for one workflow's rules on its subject, decoded once per message type.

    ``keyed``: the execution id each message + state rule derived from it.
    """

    sub: Subscription
    msg: InboundMessage
    decoded: dict[Any, Any]
    keyed: dict[str, str]


class CallbackArrival(msgspec.Struct, gc=False):
    """A worker's result (or error) for a task of an execution."""

    bound: BoundWorkflow
    msg: InboundMessage
    execution_id: str


class TimerDue(msgspec.Struct, gc=False):
    """A deadline, task timeout, cooldown end or grace period of a key has come (``msg``: the
    timer's message from NATS, acknowledged once the key is evaluated), or this process's
    retry of the key after a transient failure (no message)."""

    workflow_id: str
    bucket: str
    key: str
    msg: InboundMessage | None = None


class SweepDue(msgspec.Struct, gc=False):
    """Time to deliver the claims that dead processes left behind."""


Event = KVChange | MessageArrival | CallbackArrival | TimerDue | SweepDue

# The timer target of the claim sweep (a key's timer target is (workflow, bucket, key)).
SWEEP_TARGET = ("", "", "")


class Committed(msgspec.Struct, gc=False):
    """A state a worker has just committed, to be evaluated next (see ``Shards.follow``).

    ``value`` is empty for a terminal state: nothing fires for it; only its echo
    from the partition is to be skipped.
    """

    bucket: str
    key: str
    base: int
    revision: int
    value: bytes
