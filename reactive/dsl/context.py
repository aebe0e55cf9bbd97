"""RuleContext: what a condition, a payload builder and a mutator see."""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["M", "RuleContext", "S"]

S = TypeVar("S")
M = TypeVar("M")


class RuleContext(Generic[S, M]):
    """Typed access to the execution state and the triggering message.

    Which parts are set depends on the trigger: a KV watch gives ``state`` (and
    ``key``, ``revision``); a subject gives ``message`` and ``subject``; a
    subject with a state key gives both. ``now`` is the engine clock's time in
    seconds since the epoch, so conditions never read the wall clock themselves.
    """

    __slots__ = (
        "bucket",
        "execution_id",
        "key",
        "message",
        "now",
        "revision",
        "rule_id",
        "state",
        "subject",
        "trigger_mode",
        "workflow_id",
    )

    def __init__(
        self,
        *,
        state: S,
        message: M,
        workflow_id: str = "",
        execution_id: str = "",
        key: str = "",
        bucket: str = "",
        revision: int = 0,
        subject: str = "",
        trigger_mode: str = "kv",
        now: float = 0.0,
        rule_id: str = "",
    ) -> None:
        self.state = state
        self.message = message
        self.workflow_id = workflow_id
        self.execution_id = execution_id
        self.key = key
        self.bucket = bucket
        self.revision = revision
        self.subject = subject
        self.trigger_mode = trigger_mode
        self.now = now
        self.rule_id = rule_id

    def __repr__(self) -> str:
        return (
            f"RuleContext(workflow_id={self.workflow_id!r}, execution_id={self.execution_id!r}, "
            f"key={self.key!r}, revision={self.revision}, subject={self.subject!r}, "
            f"state={self.state!r}, message={self.message!r})"
        )


_new = object.__new__


def new_context(
    state: S,
    message: M,
    workflow_id: str,
    execution_id: str,
    key: str,
    bucket: str,
    revision: int,
    trigger_mode: str,
    now: float,
    rule_id: str = "",
    subject: str = "",
) -> RuleContext[S, M]:
    """``RuleContext(...)`` for the engine's hot path: positional, without keyword matching."""
    ctx: RuleContext[S, M] = _new(RuleContext)
    ctx.state = state
    ctx.message = message
    ctx.workflow_id = workflow_id
    ctx.execution_id = execution_id
    ctx.key = key
    ctx.bucket = bucket
    ctx.revision = revision
    ctx.subject = subject
    ctx.trigger_mode = trigger_mode
    ctx.now = now
    ctx.rule_id = rule_id
    return ctx
