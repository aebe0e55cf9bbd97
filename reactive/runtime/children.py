"""Child workflows: an async rule whose task is an execution of another workflow.

* The parent's transition that fires a ``child=`` rule parks the parent on a task, as a
  ``publish_async`` rule does, and in its outbox asks the child workflow for an
  execution: a message on the child's callback subject, ``{"start": <its first state>,
  "parent": <a ParentLink>}``. The child's id is the task's (``child_id``), so an outbox
  delivered again starts it once.
* Whichever engine serves the child workflow creates it (``start_child``): a repeat
  finds it there. ``state.parent`` links it to its parent's task.
* The transition that ends the child sends its end, in its outbox, to the parent's
  callback subject as the task's answer (``end_report``): its final state when it
  completed, else an error naming its status (failed, escalated, timed out, cancelled).
  The parent's ``on_result`` or ``on_error`` handler takes it, as any answer.
* A parent cancelled while it waits for a child, or whose child task timed out, cancels
  the child (``cancel_child``): the child's own cancellation handler can compensate.

Pure but for ``start_child``, which writes the child's first state.
"""

from __future__ import annotations

import typing

import msgspec

from reactive.codecs import encode_json
from reactive.dsl.definition import RuleDef, WorkflowDef
from reactive.dsl.state import ExecutionState, OutboxMessage, ParentLink, Status
from reactive.subjects import MAX_EXECUTION_ID_LENGTH

__all__ = [
    "cancel_child",
    "child_id",
    "child_request",
    "end_report",
    "first_state",
    "request_subject",
]

# Not sent to the parent with a child's final state: the engine's bookkeeping, and the
# error field, which the parent would read as the task's failure.
_NOT_REPORTED = frozenset({*ExecutionState.__reactive_bookkeeping__, "error", "parent"})


def child_id(task_id: str) -> str:
    """The id of the child execution of a task: the task id (its end, when that is too long)."""
    return task_id[-MAX_EXECUTION_ID_LENGTH:].lstrip("-_") or "child"


def request_subject(r: RuleDef, task_id: str, callback_prefix: str) -> str:
    """Where the child of ``r``'s task is asked for (and cancelled): its callback subject."""
    return f"{callback_prefix}.{r.child}.{child_id(task_id)}"


def first_state(r: RuleDef, returned: object) -> ExecutionState:
    """What a ``child=`` rule's method returned, as its child's first state (TypeError: not one)."""
    first: object = r.child_state() if returned is None else returned
    if not isinstance(first, r.child_state):
        raise TypeError(
            f"it returned a {type(first).__name__}: a child= rule returns the first state "
            f"of its child, a {r.child_state.__name__} (or None)"
        )
    return typing.cast(ExecutionState, first)


def child_request(
    d: WorkflowDef,
    r: RuleDef,
    first: ExecutionState,
    exec_id: str,
    task_id: str,
    callback_subject: str,
    callback_prefix: str,
    msg_id: str,
) -> OutboxMessage:
    """The request that starts the child of ``r``'s task, with ``first`` its first state."""
    parent = ParentLink(
        workflow=d.id, id=exec_id, task_id=task_id, rule_id=r.id, callback=callback_subject
    )
    body = {"start": msgspec.Raw(encode_json(first)), "parent": parent}
    return OutboxMessage(
        subject=request_subject(r, task_id, callback_prefix),
        json=msgspec.Raw(encode_json(body)),
        msg_id=msg_id,
        headers={"Reactive-Task-Id": task_id},
    )


def end_report(d: WorkflowDef, st: ExecutionState) -> OutboxMessage:
    """The child ``st`` has ended: its answer to the task of its parent."""
    link = st.parent
    assert link is not None
    if st.status is Status.COMPLETED:
        reported = msgspec.to_builtins(st)
        answer = {k: v for k, v in reported.items() if k not in _NOT_REPORTED}
    else:
        answer = {"error": f"child {d.id}.{st.id} {st.status.value}: {st.error}".rstrip(": ")}
    answer["task_id"] = link.task_id
    return OutboxMessage(
        subject=link.callback,
        json=msgspec.Raw(encode_json(answer)),
        msg_id=f"{d.id}:{st.id}:end",
        headers={"Reactive-Task-Id": link.task_id},
    )


def cancel_child(
    d: WorkflowDef, st: ExecutionState, reason: str, callback_prefix: str
) -> OutboxMessage | None:
    """The cancellation of the child ``st`` waits for (None: it waits for none)."""
    rule = next((r for r in d.rules if r.id == st.pending_rule_id), None)
    if rule is None or not rule.child or not st.pending_task_id:
        return None
    return OutboxMessage(
        subject=request_subject(rule, st.pending_task_id, callback_prefix),
        json=msgspec.Raw(encode_json({"cancel": f"parent {d.id}.{st.id}: {reason}"})),
        msg_id=f"{d.id}:{st.id}:cancel:{child_id(st.pending_task_id)}",
    )
