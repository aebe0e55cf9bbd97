"""The class pass, for an async rule's task and a timer rule's time: the workflow a
``child=`` rule's tasks are executions of, the failure handlers, the timeout, the retry
policy, and ``after`` / ``every``. Each mistake is reported through ``bad`` (the class pass
raises them all together)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reactive.dsl.definition import MIN_TIMER, ActionType, RetryPolicy, TriggerMode, WorkflowDef
from reactive.dsl.durations import parse_duration
from reactive.dsl.rules import RuleMethod, RuleOptions
from reactive.dsl.state import Retry

__all__ = ["Timing", "child_definition", "compile_timing"]


@dataclass(frozen=True, slots=True)
class Timing:
    """What the class pass found of a rule's failures and time."""

    error_handler: str | None = None
    timeout_handler: str | None = None
    task_timeout: float | None = None
    retry: RetryPolicy | None = None
    after: float = 0.0
    every: float = 0.0


def child_definition(child: Any, bad: Callable[[str], None]) -> WorkflowDef | None:
    """The workflow of a rule's ``child=`` (None: not a child rule, or a mistake reported)."""
    if child is None:
        return None
    d = getattr(child, "__reactive__", None)
    if not isinstance(d, WorkflowDef):
        bad(f"child= takes a Workflow class, not {child!r}")
        return None
    return d


def compile_timing(
    o: RuleOptions,
    method: RuleMethod[Any],
    mode: TriggerMode,
    action: ActionType,
    bad: Callable[[str], None],
) -> Timing:
    """A rule's failure handlers, timeout, retry policy and timer, checked."""
    error_handler = timeout_handler = None
    task_timeout: float | None = None
    if action is ActionType.PUBLISH_ASYNC:
        error_handler = method.error_handler.__name__ if method.error_handler else None
        timeout_handler = method.timeout_handler.__name__ if method.timeout_handler else None
        if o.timeout is not None:
            try:
                task_timeout = parse_duration(o.timeout)
            except ValueError as e:
                bad(f"timeout: {e}")
            else:
                if task_timeout < MIN_TIMER:
                    bad(
                        f"timeout {o.timeout!r} is shorter than the engine allows "
                        f"(at least {MIN_TIMER:g}s)"
                    )
    else:
        for what, given in (
            ("on_error", method.error_handler),
            ("on_timeout", method.timeout_handler),
            ("timeout=", o.timeout),
        ):
            if given is not None:
                bad(f"{what} is only for publish_async rules (this rule's tasks are none)")
    retry: RetryPolicy | None = None
    if o.retry is not None:
        if action is not ActionType.PUBLISH_ASYNC:
            bad("retry= is only for publish_async rules (this rule's tasks are none)")
        else:
            retry = _retry_policy(o.retry, bad)
    after = every = 0.0
    for what, given in (("after", o.after), ("every", o.every)):
        if given is None:
            continue
        if mode is not TriggerMode.STATE:
            bad(
                f"{what}= is only for watch_kv rules (a time since the state last changed; "
                "to start executions on a clock, use schedule=)"
            )
            continue
        try:
            seconds = parse_duration(given)
        except ValueError as e:
            bad(f"{what}: {e}")
            continue
        if seconds < MIN_TIMER:
            bad(f"{what} {given!r} is shorter than the engine allows (at least {MIN_TIMER:g}s)")
        elif what == "after":
            after = seconds
        else:
            every = seconds
    if o.after is not None and o.every is not None:
        bad("after= and every= together: give one (every= fires the first time after it too)")
    if (o.after is not None or o.every is not None) and o.on_deletes:
        bad("a timer rule cannot fire on deletes (there is no state to wait on)")
    if not o.create and mode is not TriggerMode.MESSAGE_AND_STATE:
        bad("create=False is only for message + state rules (on_subject with state_key)")

    return Timing(error_handler, timeout_handler, task_timeout, retry, after, every)


def _retry_policy(given: Any, bad: Callable[[str], None]) -> RetryPolicy | None:
    """A rule's ``retry=``, checked (the mistakes reported through ``bad``)."""
    if not isinstance(given, Retry):
        bad(f"retry= takes a reactive.Retry, not {given!r}")
        return None
    problems: list[str] = []
    try:
        backoff = parse_duration(given.backoff)
        max_backoff = parse_duration(given.max_backoff)
    except ValueError as e:
        bad(f"retry: {e}")
        return None
    if not isinstance(given.attempts, int) or given.attempts < 1:
        problems.append(f"attempts must be an int of at least 1, got {given.attempts!r}")
    if backoff < MIN_TIMER:
        problems.append(
            f"backoff {given.backoff!r} is shorter than the engine allows (at least {MIN_TIMER:g}s)"
        )
    if not given.multiplier >= 1:
        problems.append(f"multiplier must be at least 1, got {given.multiplier!r}")
    if max_backoff < backoff:
        problems.append(f"max_backoff {given.max_backoff!r} is shorter than backoff")
    if not all(isinstance(e, str) and e for e in given.non_retryable):
        problems.append("non_retryable takes error prefixes (non-empty strings)")
    for problem in problems:
        bad(f"retry: {problem}")
    if problems:
        return None
    return RetryPolicy(
        given.attempts, backoff, float(given.multiplier), max_backoff, tuple(given.non_retryable)
    )
