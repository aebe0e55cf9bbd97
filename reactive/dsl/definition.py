"""Compiled definitions: what the runtime sees. Built once, when a workflow class is created."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reactive.dsl.context import RuleContext
from reactive.dsl.state import ExecutionState

__all__ = ["MIN_TIMER", "ActionType", "RetryPolicy", "RuleDef", "TriggerMode", "WorkflowDef"]


class TriggerMode(enum.StrEnum):
    """Which reactive primitive(s) trigger a rule."""

    STATE = "kv"
    MESSAGE = "message"
    MESSAGE_AND_STATE = "message+state"


class ActionType(enum.StrEnum):
    """What happens when a rule fires."""

    PUBLISH = "publish"
    PUBLISH_ASYNC = "publish_async"
    MUTATE = "mutate"
    COMPLETE = "complete"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A rule's ``Retry``, checked and in seconds."""

    attempts: int
    backoff: float
    multiplier: float
    max_backoff: float
    non_retryable: tuple[str, ...]

    def delay(self, attempt: int) -> float:
        """How long after the failure of ``attempt`` (1 for the first) the next one goes."""
        return min(self.backoff * self.multiplier ** (attempt - 1), self.max_backoff)

    def retries(self, kind: str, message: str, attempt: int) -> bool:
        """Whether a task that failed so (``kind``: error, invalid, timeout) is tried again."""
        if attempt >= self.attempts or kind == "invalid":
            return False
        return not (kind == "error" and message.startswith(self.non_retryable))


# The shortest timer a definition may ask for, in seconds (a task's timeout): shorter
# ones would fire before a worker's answer could come back over NATS.
MIN_TIMER = 1.0


@dataclass(frozen=True, slots=True, eq=False)
class RuleDef:
    """One compiled rule."""

    id: str
    workflow_id: str
    index: int
    method_name: str
    mode: TriggerMode
    action: ActionType
    writes_state: bool
    condition: Callable[[RuleContext[Any, Any]], bool]
    condition_description: str
    bucket: str = ""
    pattern: str = ""
    subject: str = ""
    stream: str | None = None
    state_key: Callable[[Any], str] | None = None
    message_type: Any = None
    publish_subject: str = ""
    mutator: Callable[[RuleContext[Any, Any]], None] | None = None
    result_type: Any = None
    result_handler_name: str | None = None
    # Failures of an async rule's task: their handlers (None: the workflow's default), and
    # the task's timeout (None: the workflow's task_timeout).
    error_handler_name: str | None = None
    timeout_handler_name: str | None = None
    task_timeout: float | None = None
    # A message + state rule that starts a missing execution (False: it does not).
    creates: bool = True
    # An async rule's retry policy (None: a failed task is not sent again).
    retry: RetryPolicy | None = None
    # A timer rule: fires once the state has stayed unchanged ``after`` seconds, or every
    # ``every`` seconds while it stays so (0: not a timer rule).
    after: float = 0.0
    every: float = 0.0
    # A child rule: the id of the workflow its tasks are executions of, and that workflow's
    # state type ("" and None: not one).
    child: str = ""
    child_state: Any = None
    # A scheduled rule: its pattern as the server takes it, and its time zone ("": not one).
    schedule: str = ""
    schedule_tz: str | None = None
    cooldown: float = 0.0
    # The cooldown is one for all the workflow's executions (cooldown_scope="workflow"),
    # not one per execution.
    shared_cooldown: bool = False
    max_firings: int = 0
    on_deletes: bool = False
    phases: frozenset[str] | None = None  # the phases its conditions require, when known

    @property
    def has_limits(self) -> bool:
        return self.cooldown > 0 or self.max_firings > 0

    @property
    def cooldown_scope(self) -> str:
        """What one cooldown holds back: ``"execution"`` (each its own) or ``"workflow"`` (all)."""
        return "workflow" if self.shared_cooldown else "execution"


@dataclass(frozen=True, slots=True, eq=False)
class WorkflowDef:
    """One compiled workflow."""

    id: str
    cls: type[Any]
    state_type: type[ExecutionState]
    bucket: str
    rules: tuple[RuleDef, ...]
    description: str = ""
    timeout: float | None = None
    max_iterations: int = 0
    task_timeout: float = 300.0
    on_task_timeout: str = "fail"
    on_complete: str = ""
    on_fail: str = ""
    on_escalate: str = ""
    on_cancel: str = ""
    # The method that handles a cancellation (None: the execution is cancelled at once).
    cancel_handler_name: str | None = None
    max_timeline: int = 200
    # Seconds a terminal execution stays in its bucket (None: for ever); see Workflow.
    retention: float | None = None
    rules_by_id: dict[str, RuleDef] = field(default_factory=dict)
    # The method that handles the max-iterations limit (None: the execution escalates).
    limit_handler_name: str | None = None

    def key(self, execution_id: str) -> str:
        """The KV key of an execution's state."""
        return f"{self.id}.{execution_id}"

    def execution_id_for(self, key: str) -> str:
        prefix = self.id + "."
        return key[len(prefix) :] if key.startswith(prefix) else key

    @property
    def has_async(self) -> bool:
        return any(r.action is ActionType.PUBLISH_ASYNC for r in self.rules)
