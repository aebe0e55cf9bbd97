"""What ``WorkflowMachine`` checks on every execution: field consistency, and the counts of what was published."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from reactive.compiled import ActionType, WorkflowDef
from reactive.dsl.state import ExecutionState, Status
from reactive.testing._states import _TERMINAL

__all__ = [
    "Terminal",
    "check_fields",
    "event_subject",
    "iso_time",
    "lifecycle_counts",
    "lifecycle_subjects",
    "nonwriting_counts",
    "request_counts",
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
    return ""


def lifecycle_subjects(d: WorkflowDef) -> set[str]:
    return {s for s in (d.on_complete, d.on_fail, d.on_escalate) if s}


def lifecycle_counts(d: WorkflowDef, published: Sequence[Any]) -> dict[str, int]:
    """Lifecycle events of ``d`` per execution id (events name both the execution and the workflow)."""
    subjects = lifecycle_subjects(d)
    counts: dict[str, int] = {}
    for m in published:
        if m.subject not in subjects:
            continue
        try:
            body = msgspec.json.decode(m.data)
        except msgspec.DecodeError:
            continue
        if isinstance(body, dict) and body.get("workflow_id") == d.id and "execution_id" in body:
            eid = str(body["execution_id"])
            counts[eid] = counts.get(eid, 0) + 1
    return counts


def request_counts(published: Sequence[Any]) -> dict[tuple[str, str], int]:
    """Async requests per (subject, task id)."""
    counts: dict[tuple[str, str], int] = {}
    for m in published:
        task_id = m.headers.get("Reactive-Task-Id") if m.headers else None
        if task_id:
            k = (m.subject, task_id)
            counts[k] = counts.get(k, 0) + 1
    return counts


def nonwriting_counts(d: WorkflowDef, published: Sequence[Any]) -> dict[str, int]:
    """Publishes by rules that do not write state, per KV key (from their message ids)."""
    prefixes = {f"{d.id}:{r.id}:{d.bucket}.": r for r in d.rules if not r.writes_state}
    counts: dict[str, int] = {}
    if not prefixes:
        return counts
    for m in published:
        mid = m.msg_id or ""
        for prefix in prefixes:
            if mid.startswith(prefix):
                key = mid[len(prefix) :].rsplit(":", 1)[0]
                counts[key] = counts.get(key, 0) + 1
    return counts
