"""What ``WorkflowMachine`` checks on every execution, and ``Execution``: what an invariant sees of one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

import msgspec

from reactive.backends.memory import PublishedMessage
from reactive.codecs import decode
from reactive.compiled import ActionType, WorkflowDef
from reactive.dsl.state import ExecutionState, Status, TimelineEntry
from reactive.subjects import matches_pattern
from reactive.testing._states import _TERMINAL

T = TypeVar("T")


@dataclass(frozen=True, eq=False, repr=False)
class Execution:
    """One execution as an invariant sees it after a step: its state, its timeline, what it published.

    ``published`` holds every message the engine published for this execution,
    in order: the messages of its rules (publish, async requests), those of
    rules that publish without writing state, and its lifecycle event (not
    the copies a stream dropped as duplicates). The timeline is the state's
    (the last ``max_timeline`` entries).
    """

    workflow: WorkflowDef
    key: str
    id: str
    revision: int
    state: Any
    published: tuple[PublishedMessage, ...]
    now: float  # the test clock

    def __repr__(self) -> str:
        return (
            f"<Execution {self.workflow.id}/{self.id}: {self.status.value}, phase "
            f"{self.phase!r}, {len(self.timeline)} transitions, {len(self.published)} published>"
        )

    @property
    def status(self) -> Status:
        return self.state.status  # type: ignore[no-any-return]

    @property
    def phase(self) -> str:
        return self.state.phase  # type: ignore[no-any-return]

    @property
    def timeline(self) -> list[TimelineEntry]:
        return self.state.timeline  # type: ignore[no-any-return]

    @property
    def phases(self) -> frozenset[str]:
        """The phases its timeline went through (each transition's phase after it)."""
        return frozenset(e.phase for e in self.state.timeline)

    @property
    def rules(self) -> frozenset[str]:
        """The rules its timeline shows firing (an async rule also for its result)."""
        return frozenset(e.rule_id for e in self.state.timeline)

    @overload
    def sent(self, subject: str) -> list[Any]: ...
    @overload
    def sent(self, subject: str, type: type[T]) -> list[T]: ...
    def sent(self, subject: str, type: Any = None) -> list[Any]:
        """The payloads it published on ``subject`` (a pattern), decoded into ``type`` (default: JSON)."""
        return [
            decode(type, m.data) if type is not None else msgspec.json.decode(m.data)
            for m in self.published
            if matches_pattern(m.subject, subject)
        ]


__all__ = [
    "Execution",
    "Terminal",
    "check_fields",
    "event_subject",
    "iso_time",
    "lifecycle_subjects",
    "time_points",
]


@dataclass
class Terminal:
    """What an execution's entry was when it was first seen terminal (it must stay so)."""

    revision: int
    value: bytes
    timeline: int
    fired: int


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def time_points(d: WorkflowDef, state: ExecutionState) -> list[float]:
    """Times at which something is due for a live execution: deadline, task deadline, cooldown ends."""
    out = []
    if state.deadline is not None:
        out.append(state.deadline.timestamp())
    if state.status is Status.WAITING and state.task_deadline is not None:
        out.append(state.task_deadline.timestamp())
    for r in d.rules:
        firing = state.firings.get(r.id)
        if r.cooldown and firing is not None:
            out.append(firing.last_at + r.cooldown)
    return out


def check_fields(d: WorkflowDef, exec_id: str, state: ExecutionState, where: str) -> None:
    status = state.status
    assert isinstance(status, Status), f"{where}: status {status!r} is not a Status"
    waiting = status is Status.WAITING
    assert waiting == bool(state.pending_task_id), (
        f"{where}: waiting must go with a pending task id, got pending_task_id={state.pending_task_id!r}"
    )
    assert bool(state.pending_task_id) == bool(state.pending_rule_id), (
        f"{where}: pending_task_id={state.pending_task_id!r} but pending_rule_id={state.pending_rule_id!r}"
    )
    if waiting:
        r = d.rules_by_id.get(state.pending_rule_id)
        assert r is not None and r.action is ActionType.PUBLISH_ASYNC, (
            f"{where}: waits on {state.pending_rule_id!r}, which is not an async rule of {d.id}"
        )
        assert state.task_deadline is not None, f"{where}: waiting without a task deadline"
    if status in _TERMINAL:
        assert state.completed_at is not None, f"{where}: terminal without completed_at"
    else:
        assert state.completed_at is None, (
            f"{where}: not terminal but completed_at={state.completed_at}"
        )
    if status is not Status.PENDING:
        assert state.id == exec_id, f"{where}: id {state.id!r} does not match its key"
        assert state.workflow_id == d.id, (
            f"{where}: workflow_id {state.workflow_id!r} is not {d.id!r}"
        )
    assert state.iteration >= 0, f"{where}: negative iteration {state.iteration}"
    if d.max_iterations:
        assert state.iteration <= d.max_iterations, (
            f"{where}: iteration {state.iteration} passed max_iterations {d.max_iterations}"
        )


def event_subject(d: WorkflowDef, status: Status) -> str:
    if status is Status.COMPLETED:
        return d.on_complete
    if status is Status.ESCALATED:
        return d.on_escalate
    if status in (Status.FAILED, Status.TIMED_OUT):
        return d.on_fail
    if status is Status.CANCELLED:
        return d.on_cancel
    return ""


def lifecycle_subjects(d: WorkflowDef) -> set[str]:
    return {s for s in (d.on_complete, d.on_fail, d.on_escalate, d.on_cancel) if s}
