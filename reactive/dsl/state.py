"""Execution state: the base every workflow state type subclasses, and the lifecycle events."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import ClassVar

import msgspec

__all__ = [
    "CallbackFields",
    "ExecutionState",
    "Firing",
    "LimitReached",
    "OutboxMessage",
    "ParentLink",
    "Status",
    "TaskFailure",
    "TimelineEntry",
    "WorkflowCancellationEvent",
    "WorkflowCompletionEvent",
    "WorkflowEscalationEvent",
    "WorkflowFailureEvent",
    "is_terminal_status",
]


class Status(enum.StrEnum):
    """The overall status of an execution. The last five are terminal."""

    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    ESCALATED = "escalated"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {Status.COMPLETED, Status.FAILED, Status.ESCALATED, Status.TIMED_OUT, Status.CANCELLED}
)


def is_terminal_status(status: Status) -> bool:
    """Whether no rule may fire any more for an execution with this status."""
    return status in _TERMINAL


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class TimelineEntry(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """One rule firing (or lifecycle change) in an execution's history."""

    timestamp: datetime
    rule_id: str
    trigger_mode: str = ""  # "kv", "message", "message+state", "callback", "timer"
    trigger_info: str = ""  # the KV key or the subject that triggered
    action: str = ""
    phase: str = msgspec.field(default="", name="phase_after")
    iteration: int = 0
    error: str = ""  # why this transition failed or escalated the execution, when it did


class Firing(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """How often and when a rule last fired for one execution: cooldown and max firings."""

    count: int = 0
    last_at: float = 0.0
    last_trigger: str = ""
    recent: list[str] = []  # the last few stream messages that fired it, against redeliveries


class OutboxMessage(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """A publish decided by a committed state write, delivered after the write.

    A JSON payload is kept as it is, inside the state's JSON (``json``); other
    payloads (bytes, text) as ``data``, which JSON holds in base64, a third
    larger. A request built from a large state field is then carried once more,
    not once and a third.
    """

    subject: str
    data: bytes = b""
    json: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    msg_id: str
    headers: dict[str, str] = {}

    def payload(self) -> bytes:
        """The bytes to publish."""
        return self.data if self.json is msgspec.UNSET else bytes(self.json)


class ParentLink(msgspec.Struct, kw_only=True, frozen=True):
    """A child execution's parent: its workflow and id, and the task of the parent's
    ``child=`` rule whose answer this execution's end is (sent to ``callback``)."""

    workflow: str
    id: str
    rule_id: str
    task_id: str
    callback: str


class ExecutionState(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The state of one workflow execution; workflow state types subclass it.

    Subclass fields need defaults: a new execution starts from ``YourState()``.
    The fields after ``timeline`` are the engine's bookkeeping.
    """

    id: str = ""
    workflow_id: str = ""
    phase: str = ""
    iteration: int = 0
    status: Status = Status.PENDING
    error: str = ""
    pending_task_id: str = ""
    pending_rule_id: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    completed_at: datetime | None = None
    deadline: datetime | None = None
    # A child execution's parent (a ``child=`` rule started it); None for the others.
    parent: ParentLink | None = None
    timeline: list[TimelineEntry] = []
    # Engine bookkeeping, written in the same compare-and-set as everything else.
    task_deadline: datetime | None = None
    pending_since: datetime | None = None
    firings: dict[str, Firing] = {}
    outbox: list[OutboxMessage] = []
    outbox_id: str = ""
    owner: str = ""
    trace_parent: str = ""  # W3C traceparent of the trace this execution belongs to
    # The attempt of the pending task (1 for the first); with no task id, the attempt that
    # failed and waits, until ``task_deadline``, for the next (its rule's ``retry=``).
    task_attempt: int = 0

    __reactive_bookkeeping__: ClassVar[frozenset[str]] = frozenset(
        {
            "task_deadline",
            "pending_since",
            "firings",
            "outbox",
            "outbox_id",
            "owner",
            "trace_parent",
            "task_attempt",
        }
    )

    # --- reading -----------------------------------------------------------------

    @property
    def is_terminal(self) -> bool:
        return self.status in _TERMINAL

    @property
    def is_waiting(self) -> bool:
        return self.status is Status.WAITING

    def can_proceed(self) -> bool:
        """Not terminal and not waiting for a callback."""
        return self.status not in _TERMINAL and self.status is not Status.WAITING

    def is_expired(self, now: float) -> bool:
        """Whether the deadline has passed at ``now`` (seconds since the epoch)."""
        return self.deadline is not None and self.deadline.timestamp() <= now

    # --- lifecycle ----------------------------------------------------------------

    def initialize(
        self, execution_id: str, workflow_id: str, now: float, timeout: float | None = None
    ) -> None:
        """Start the execution: id, workflow, status running, created time, deadline."""
        self.id = execution_id
        self.workflow_id = workflow_id
        self.status = Status.RUNNING
        self.created_at = self.updated_at = _utc(now)
        self.deadline = _utc(now + timeout) if timeout else None

    def set_deadline(self, deadline: datetime) -> None:
        self.deadline = deadline

    def complete(self, phase: str | None = None) -> None:
        """Mark completed (optionally in a final phase)."""
        if phase is not None:
            self.phase = phase
        self.status = Status.COMPLETED
        self.clear_pending_task()

    def fail(self, error: str) -> None:
        """Mark failed with ``error``."""
        self.status = Status.FAILED
        self.error = error
        self.clear_pending_task()

    def escalate(self, reason: str) -> None:
        """Mark escalated; the reason is kept in ``error``."""
        self.status = Status.ESCALATED
        self.error = reason
        self.clear_pending_task()

    def cancel(self, reason: str) -> None:
        """Mark cancelled; the reason is kept in ``error``."""
        self.status = Status.CANCELLED
        self.error = reason
        self.clear_pending_task()

    def time_out(self) -> None:
        """Mark timed out."""
        self.status = Status.TIMED_OUT
        self.error = self.error or "execution timed out"
        self.clear_pending_task()

    def set_status(self, status: Status) -> None:
        self.status = status

    def set_phase(
        self,
        phase: str,
        *,
        rule_id: str = "",
        trigger_mode: str = "",
        trigger_info: str = "",
        action: str = "",
        now: float | None = None,
    ) -> None:
        """Set the phase and record it in the timeline."""
        self.phase = phase
        ts = _utc(now) if now is not None else datetime.now(UTC)
        self.timeline.append(
            TimelineEntry(
                timestamp=ts,
                rule_id=rule_id,
                trigger_mode=trigger_mode,
                trigger_info=trigger_info,
                action=action,
                phase=phase,
                iteration=self.iteration,
            )
        )

    def record_timeline(self, entry: TimelineEntry) -> None:
        self.timeline.append(entry)

    # --- iteration, errors, pending tasks -------------------------------------------

    def increment_iteration(self) -> int:
        self.iteration += 1
        return self.iteration

    def set_iteration(self, iteration: int) -> None:
        self.iteration = iteration

    def set_error(self, error: str) -> None:
        self.error = error

    def clear_error(self) -> None:
        self.error = ""

    def set_pending_task(self, task_id: str, rule_id: str) -> None:
        self.pending_task_id = task_id
        self.pending_rule_id = rule_id
        self.status = Status.WAITING

    def clear_pending_task(self) -> None:
        if self.status is Status.WAITING:
            self.status = Status.RUNNING
        self.pending_task_id = ""
        self.pending_rule_id = ""
        self.task_deadline = None
        self.pending_since = None
        self.task_attempt = 0


class CallbackFields(msgspec.Struct, kw_only=True):
    """Injected into async task payloads that declare these fields (any of them)."""

    task_id: str = ""
    callback_subject: str = ""
    execution_id: str = ""


class Retry(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """An async rule's retry policy (``@rule(publish_async=..., retry=Retry(...))``).

    A failed task (the worker's error, or no answer within the rule's timeout) is sent
    again, as a new task with a new id, after ``backoff`` (then ``backoff * multiplier``,
    ..., at most ``max_backoff``), up to ``attempts`` tasks in all; a worker error that
    starts with one of ``non_retryable`` is not retried, nor is a result that does not
    decode. After the last attempt the rule's ``on_error`` / ``on_timeout`` handler (or
    the default: fail) takes it. Durations: seconds, or strings such as ``"30s"``.
    """

    attempts: int = 3
    backoff: float | str = 1.0
    multiplier: float = 2.0
    max_backoff: float | str = 60.0
    non_retryable: tuple[str, ...] = ()


class TaskFailure(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """What an async rule's ``on_error`` / ``on_timeout`` handler gets about its task.

    ``kind``: ``"error"`` (the worker answered with an error), ``"invalid"`` (its
    result does not decode as the rule's result type) or ``"timeout"`` (no answer
    within the rule's timeout); ``message``: the worker's error, the decode error, or
    how long the task waited.
    """

    kind: str
    message: str
    rule_id: str
    task_id: str
    attempt: int = 1


class LimitReached(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """What a workflow's ``@on_max_iterations`` handler gets: the limit, and the rule whose
    transition (or whose result's) would have passed it."""

    limit: int
    rule_id: str


class WorkflowCancellationEvent(msgspec.Struct, kw_only=True, gc=False):
    """Published on ``on_cancel`` when an execution is cancelled."""

    execution_id: str
    workflow_id: str
    phase: str
    reason: str
    cancelled_at: datetime


class WorkflowCompletionEvent(msgspec.Struct, kw_only=True, gc=False):
    """Published on ``on_complete`` when an execution completes."""

    execution_id: str
    workflow_id: str
    status: str
    phase: str = msgspec.field(name="final_phase")
    completed_at: datetime


class WorkflowFailureEvent(msgspec.Struct, kw_only=True, gc=False):
    """Published on ``on_fail`` when an execution fails or times out."""

    execution_id: str
    workflow_id: str
    phase: str
    error: str
    failed_at: datetime


class WorkflowEscalationEvent(msgspec.Struct, kw_only=True, gc=False):
    """Published on ``on_escalate`` when an execution is escalated."""

    execution_id: str
    workflow_id: str
    phase: str
    reason: str
    escalated_at: datetime
