"""The meta bucket's schema: what engines announce, and the records they keep for each other.

``REACTIVE_META`` (by default) holds, by key:

* ``wf.<workflow>``: a :class:`WorkflowInfo`, announced by every engine that serves the
  workflow, so the command line and other tools need no access to its code;
* ``fire.<workflow>.<rule>.<bucket>.<key>``: a :class:`FiringRecord`, the firings of a
  rule that does not write state (its claim for a revision or message, its cooldown
  and count), and ``pend.<…>`` beside it while a claimed message is being published;
* ``cool.<workflow>.<rule>``: a :class:`CooldownClaim`, a workflow-wide cooldown;
* ``out.<bucket>.<key>``: the id of the last outbox of that execution that went out;
* ``streams.<stream>``: the subjects processes asked a stream to keep
  (:mod:`reactive.meta.streams`), so two adding at once do not drop each other's.

The engine and the command line both read it from here.
"""

from __future__ import annotations

import typing
from typing import Any

import msgspec

from reactive.backends.base import KVEntry
from reactive.codecs import decode
from reactive.dsl.definition import TriggerMode, WorkflowDef
from reactive.dsl.state import Firing, OutboxMessage
from reactive.errors import DecodeError
from reactive.meta.inputs import id_field, input_schema

__all__ = [
    "CooldownClaim",
    "FiringRecord",
    "RuleInfo",
    "WorkflowInfo",
    "cooldown_key",
    "decode_claim",
    "decode_record",
    "describe_workflow",
    "firing_key",
    "outbox_marker_key",
    "remember",
    "too_old",
    "workflow_key",
]


def workflow_key(workflow_id: str) -> str:
    return f"wf.{workflow_id}"


def firing_key(suffix: str) -> str:
    """The claim of a rule's firings; ``suffix`` is ``<workflow>.<rule>.<bucket>.<key>``."""
    return "fire." + suffix


def cooldown_key(workflow_id: str, rule_id: str) -> str:
    return f"cool.{workflow_id}.{rule_id}"


def outbox_marker_key(bucket: str, key: str) -> str:
    return f"out.{bucket}.{key}"


class FiringRecord(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """Firings of a rule that does not write state, kept in the meta bucket."""

    count: int = 0
    last_at: float = 0.0
    last_trigger: str = ""
    recent: list[str] = []
    pending: list[OutboxMessage] = []
    pending_owner: str = ""
    pending_at: float = 0.0


class CooldownClaim(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The start of a workflow-wide cooldown, at ``cool.<workflow>.<rule>`` in the meta bucket.

    ``key`` and ``count`` name the firing it was claimed for: the execution, and how
    many times the rule had fired for it before. That firing alone may use the claim
    while the cooldown runs (the commit it was claimed for may lose a compare-and-set
    and be tried again, by this process or another); every other one is held.
    """

    at: float = 0.0
    key: str = ""
    count: int = 0


_RECENT = 32


def remember(firing: Firing | FiringRecord, trigger: str) -> None:
    """Keep the last triggers that fired a rule, so a late repeat of one is recognised.

    Stream messages for every rule (a redelivery may come late), revisions for the
    claims of rules that only publish (another process may evaluate a revision late).
    """
    if trigger.startswith("m") or (trigger.startswith("r") and isinstance(firing, FiringRecord)):
        firing.recent.append(trigger)
        if len(firing.recent) > _RECENT:
            del firing.recent[: len(firing.recent) - _RECENT]


def too_old(rec: FiringRecord, revision: int) -> bool:
    """Whether ``revision`` predates every revision the claim remembers (when it remembers many)."""
    revs = [int(t[1:].partition("@")[0]) for t in rec.recent if t.startswith("r")]
    return len(revs) >= _RECENT and revision < min(revs)


def decode_claim(entry: KVEntry | None) -> CooldownClaim | None:
    if entry is None or not entry.value:
        return None
    try:
        return typing.cast(CooldownClaim, decode(CooldownClaim, entry.value))
    except DecodeError:
        return None  # overwritten by the next claim


def decode_record(entry: KVEntry | None) -> FiringRecord:
    if entry is None:
        return FiringRecord()
    try:
        return typing.cast(FiringRecord, decode(FiringRecord, entry.value))
    except DecodeError:
        return FiringRecord()


class RuleInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A rule as the command line shows it."""

    id: str
    trigger: str
    action: str
    bucket: str = ""
    pattern: str = ""
    subject: str = ""
    stream: str = ""
    publish: str = ""
    when: str = ""
    cooldown: float = 0.0
    cooldown_scope: str = "execution"
    max_firings: int = 0
    schedule: str = ""  # a scheduled rule's pattern (and time zone, after a space)
    child: str = ""  # a child rule's workflow


class WorkflowInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What an engine announces about a workflow it serves, at ``wf.<id>`` in the meta bucket."""

    id: str
    bucket: str
    key_prefix: str
    state_type: str
    description: str = ""
    timeout: float | None = None
    max_iterations: int = 0
    task_timeout: float = 0.0
    on_complete: str = ""
    on_fail: str = ""
    on_escalate: str = ""
    on_cancel: str = ""
    callback_prefix: str = ""
    start_subject: str = ""
    start_stream: str = ""
    rules: list[RuleInfo] = []
    # What ``start`` takes: the start message (or, with no start subject, the first state)
    # as JSON Schema, and the message field the execution id comes from ("" if only the
    # code knows: see reactive.meta.inputs).
    input_schema: dict[str, Any] | None = None
    id_field: str = ""
    # The rules as a Mermaid flowchart (reactive.graph), for the web view ("" if not drawn).
    graph: str = ""


def describe_workflow(d: WorkflowDef, callback_prefix: str = "reactive.callback") -> WorkflowInfo:
    """A workflow definition as plain data (what ``wf.<id>`` in the meta bucket holds)."""
    starter = next(
        (r for r in d.rules if r.mode is TriggerMode.MESSAGE_AND_STATE and not r.schedule), None
    )
    return WorkflowInfo(
        id=d.id,
        bucket=d.bucket,
        key_prefix=f"{d.id}.",
        state_type=f"{d.state_type.__module__}:{d.state_type.__qualname__}",
        description=d.description,
        timeout=d.timeout,
        max_iterations=d.max_iterations,
        task_timeout=d.task_timeout,
        on_complete=d.on_complete,
        on_fail=d.on_fail,
        on_escalate=d.on_escalate,
        on_cancel=d.on_cancel,
        callback_prefix=f"{callback_prefix}.{d.id}",
        start_subject=starter.subject if starter else "",
        start_stream=(starter.stream or "") if starter else "",
        rules=[
            RuleInfo(
                id=r.id,
                trigger=r.mode.value,
                action=r.action.value,
                bucket=r.bucket,
                pattern=r.pattern,
                subject=r.subject,
                stream=r.stream or "",
                publish=r.publish_subject,
                when=r.condition_description,
                cooldown=r.cooldown,
                cooldown_scope=r.cooldown_scope,
                max_firings=r.max_firings,
                schedule=" ".join(filter(None, (r.schedule, r.schedule_tz))),
                child=r.child,
            )
            for r in d.rules
        ],
        input_schema=input_schema(starter.message_type if starter else d.state_type),
        id_field=id_field(starter.state_key, starter.message_type) if starter else "",
        graph=_graph(d),
    )


def _graph(d: WorkflowDef) -> str:
    """The workflow's Mermaid flowchart, or "" where its source cannot be read."""
    from reactive.graph import mermaid

    try:
        return mermaid(d)
    except Exception:  # drawn from the methods' source: never a reason not to announce
        return ""
