"""Executions as read from NATS, without the workflow's code: what the commands (``list``,
``show``, ``cancel``, ``start``) and the web view (``reactive.ui``) share.

* :class:`Head`: the few fields of a stored state a list shows, decoded without the rest;
* :func:`pending_task` / :func:`deadline_text`: an execution's pending task and deadline, readable;
* :func:`find_execution` and :func:`timers_due`: one execution, and its schedules in NATS;
* :func:`send_cancel`: the cancellation request, as ``Engine.cancel`` sends it;
* :func:`check_start` and :func:`start_action`: a start, its input checked against the JSON
  Schema the engine announced, then published (or its first state written).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from reactive.cli.common import (
    TERMINAL,
    CLIError,
    UsageError,
    age_of,
    decode_state,
    format_age,
    format_time,
    parse_time,
)

if TYPE_CHECKING:
    from reactive import NatsBackend
    from reactive.backends.base import Backend
    from reactive.meta import WorkflowInfo

__all__ = [
    "Head",
    "check_start",
    "deadline_text",
    "find_execution",
    "own_fields",
    "pending_task",
    "read_head",
    "schema_title",
    "send_cancel",
    "start_action",
    "timers_due",
]


class Head(msgspec.Struct, kw_only=True, gc=False):
    """What a list shows of a stored state; the rest (its timeline, its own fields) is skipped."""

    phase: str = ""
    status: str = "pending"
    iteration: int = 0
    error: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    completed_at: datetime | None = None


_HEAD = msgspec.json.Decoder(Head)


def read_head(value: bytes) -> Head | None:
    """The head of a stored state; None if it is not one (undecodable, or a field of odd type)."""
    try:
        head = _HEAD.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    head.status = head.status or "pending"
    return head


# --------------------------------------------------------------------------- one execution, readable


_BASE_FIELDS: frozenset[str] | None = None


def own_fields(state: dict[str, Any]) -> dict[str, Any]:
    """The workflow's own fields of a state: what its state type adds to ExecutionState."""
    global _BASE_FIELDS
    if _BASE_FIELDS is None:
        from reactive.dsl.state import ExecutionState

        _BASE_FIELDS = frozenset(ExecutionState.__struct_fields__)
    return {k: v for k, v in state.items() if k not in _BASE_FIELDS}


def child_of(info: WorkflowInfo, state: dict[str, Any]) -> tuple[str, str] | None:
    """The child execution (workflow, id) that the pending task is, for a ``child=`` rule's."""
    from reactive.runtime.children import child_id

    task, rule_id = state.get("pending_task_id"), state.get("pending_rule_id")
    rule = next((r for r in info.rules if r.id == rule_id), None) if task else None
    if rule is None or not rule.child:
        return None
    return rule.child, child_id(str(task))


def pending_task(state: dict[str, Any], now: float) -> str:
    """The pending task: its id and rule, since when, its deadline and attempt; ``-`` if none."""
    if state.get("pending_task_id"):
        text = f"{state['pending_task_id']} (rule {state.get('pending_rule_id') or '?'})"
        since = parse_time(state.get("pending_since"))
        if since is not None:
            text += f", waiting {age_of(since, now)}"
        task_deadline = parse_time(state.get("task_deadline"))
        if task_deadline is not None:
            text += f", times out {format_time(task_deadline)}"
        if state.get("task_attempt", 0) > 1:
            text += f", attempt {state['task_attempt']}"
        return text
    if state.get("pending_rule_id") and str(state.get("status")) == "waiting":
        # Between two attempts of the rule's task (its retry policy).
        retry_at = parse_time(state.get("task_deadline"))
        return (
            f"none: attempt {state.get('task_attempt') or 1} of rule {state['pending_rule_id']} "
            "failed" + (f", the next goes {format_time(retry_at)}" if retry_at is not None else "")
        )
    return "-"


def deadline_text(state: dict[str, Any], now: float) -> str:
    """The workflow's deadline, and how far it is (none once the execution has ended)."""
    deadline = parse_time(state.get("deadline"))
    if str(state.get("status")) in TERMINAL:
        # Ended: the workflow's deadline no longer applies, whatever the state still says.
        return "- (the execution has ended)"
    if deadline is None:
        return "-"
    if deadline.timestamp() >= now:
        return f"{format_time(deadline)} (in {format_age(deadline.timestamp() - now)})"
    return f"{format_time(deadline)} ({age_of(deadline, now)} ago)"


async def find_execution(
    backend: Backend, candidates: list[WorkflowInfo], exec_id: str
) -> list[tuple[WorkflowInfo, bytes]]:
    """The stored states of ``exec_id`` among the candidate workflows (several: ambiguous)."""
    from reactive.errors import NotFoundError

    hits: list[tuple[WorkflowInfo, bytes]] = []
    for info in candidates:
        try:
            entry = await backend.kv_get(info.bucket, f"{info.key_prefix}{exec_id}")
        except NotFoundError:
            continue
        if entry is not None:
            hits.append((info, entry.value))
    return hits


async def timers_due(
    backend: NatsBackend, stream: str, info: WorkflowInfo, key: str
) -> list[tuple[str, datetime]]:
    """The execution's timers pending in NATS: the schedules its engines left on the timer
    stream (one per kind; a fired one is gone), each with its time."""
    import nats.js.errors

    from reactive.backends.base import SCHEDULE_HEADER

    kinds = ["deadline", "task", "tick", "grace"] + [f"cool-{r.id}" for r in info.rules]
    js = backend.nc.jetstream()
    found: list[tuple[str, datetime]] = []
    for kind in kinds:
        subject = f"reactive.timer.at.{info.id}.{kind}.{info.bucket}.{key}"
        try:
            msg = await js.get_last_msg(stream, subject)
        except (nats.js.errors.NotFoundError, nats.js.errors.APIError):
            continue  # none pending (or no timer stream at all)
        spec = (msg.headers or {}).get(SCHEDULE_HEADER, "")
        at = parse_time(spec.removeprefix("@at ")) if spec.startswith("@at ") else None
        if at is not None:
            found.append((kind, at))
    return found


# --------------------------------------------------------------------------- actions


async def send_cancel(
    backend: Backend, info: WorkflowInfo, exec_id: str, reason: str
) -> dict[str, Any]:
    """Ask the engines serving ``info`` to cancel ``exec_id``; its state as it was. CLIError if
    there is no such execution or it has ended."""
    key = f"{info.key_prefix}{exec_id}"
    entry = await backend.kv_get(info.bucket, key)
    state = decode_state(entry.value) if entry is not None else None
    if state is None:
        raise CLIError(f"no execution {info.id}.{exec_id!s}")
    if state.get("status") in TERMINAL:
        raise CLIError(f"{info.id}.{exec_id} has ended already ({state.get('status')})")
    # (The workflow's callback subjects, as its engines announce them: <prefix>.<workflow>.)
    prefix = info.callback_prefix or f"reactive.callback.{info.id}"
    await backend.publish(f"{prefix}.{exec_id}", msgspec.json.encode({"cancel": reason}))
    return state


def schema_title(info: WorkflowInfo, default: str) -> str:
    """The name of what the start takes, from the announced schema's title."""
    schema = info.input_schema or {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = (schema.get("$defs") or {}).get(ref[len("#/$defs/") :]) or {}
        return str(target.get("title") or default)
    return str(schema.get("title") or default)


def _check_announced(info: WorkflowInfo, what: str, value: Any) -> None:
    """The input against the JSON Schema the engine announced: every problem named at once."""
    from reactive.cli.schema import problems

    if info.input_schema is None:
        return  # announced by an engine that describes no input (older, or raw bytes)
    found = problems(info.input_schema, value)
    if found:
        raise UsageError(
            f"the input is not a valid {what} for {info.id}; nothing was started", found
        )


def _announced_id(info: WorkflowInfo, message: Any) -> str | None:
    """The execution id the start rule derives from ``message``, if the announcement says which
    field it is (None: only the code knows)."""
    from reactive.subjects import is_valid_execution_id

    field = info.id_field
    if not field or not isinstance(message, dict):
        return None
    if field in message:
        value = message[field]
    else:  # a field with a default: the schema has it
        schema = info.input_schema or {}
        ref = str(schema.get("$ref") or "")
        body = (schema.get("$defs") or {}).get(ref[len("#/$defs/") :], schema)
        value = ((body.get("properties") or {}).get(field) or {}).get("default")
    if not isinstance(value, str) or not is_valid_execution_id(value):
        raise UsageError(
            f"the start rule of {info.id} takes the execution id from the input's {field!r}, "
            f"and {value!r} is not one (letters, digits, '-', '_'); nothing was started"
        )
    return value


def check_start(info: WorkflowInfo, raw: bytes, exec_id: str | None) -> tuple[str | None, bytes]:
    """A start of an announced workflow, checked against what its engines announced.

    ``raw`` is the input as JSON. A message-started workflow: (the execution id its start
    rule derives from the message, or None if only its code knows; the message). Any other:
    (``exec_id`` or a new one, the first state to write). UsageError, naming every wrong
    field, if the input does not fit.
    """
    try:
        fields = msgspec.json.decode(raw)
    except msgspec.DecodeError as e:
        raise UsageError(f"the input is not valid JSON: {e}") from e
    if info.start_subject:
        _check_announced(info, schema_title(info, "start message"), fields)
        return _announced_id(info, fields), raw
    if not isinstance(fields, dict):
        raise UsageError("the input must be a JSON object (the execution's first state)")
    _check_announced(info, schema_title(info, "first state"), fields)
    exec_id = exec_id or uuid.uuid4().hex[:12]
    now = time.time()
    created = datetime.fromtimestamp(now, UTC)
    fields.update(
        id=exec_id, workflow_id=info.id, status="running", created_at=created, updated_at=created
    )
    if info.timeout:
        fields["deadline"] = datetime.fromtimestamp(now + info.timeout, UTC)
    else:
        fields.pop("deadline", None)
    return exec_id, msgspec.json.encode(fields)


def start_action(
    backend: Backend, info: WorkflowInfo, exec_id: str | None, value: bytes, meta_bucket: str
) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Where a start goes, and the coroutine that does it: publish ``value`` on the start
    subject (its stream given the subject as engines give it, through ``meta_bucket``), or
    write it as the first state of ``exec_id`` (CLIError if it exists)."""
    from reactive.errors import ConflictError
    from reactive.meta.streams import ensure_shared_stream

    if info.start_subject:

        async def publish() -> None:
            if info.start_stream:
                await backend.ensure_bucket(meta_bucket)
                await ensure_shared_stream(
                    backend, meta_bucket, info.start_stream, [info.start_subject]
                )
            await backend.publish(
                info.start_subject, value, msg_id=f"reactive-cli-start-{uuid.uuid4().hex}"
            )

        return f"published to {info.start_subject}", publish

    key = f"{info.key_prefix}{exec_id}"

    async def create() -> None:
        await backend.ensure_bucket(info.bucket)
        try:
            await backend.kv_create(info.bucket, key, value)
        except ConflictError:
            raise CLIError(f"execution {key} already exists (see: show {key})") from None

    return f"first state written to {info.bucket}/{key}", create
