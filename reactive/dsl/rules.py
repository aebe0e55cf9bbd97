"""The ``@rule`` decorator. It only tags the method; the workflow class pass compiles."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Literal, TypeVar, overload

from reactive.dsl.context import RuleContext
from reactive.dsl.schedule import Schedule
from reactive.dsl.state import Retry

__all__ = [
    "CANCEL_HANDLER",
    "LIMIT_HANDLER",
    "RuleMethod",
    "RuleOptions",
    "on_max_iterations",
    "rule",
    "when_cancelled",
]

# The attribute that marks a workflow's cancellation handler.
CANCEL_HANDLER = "__reactive_cancel_handler__"

# The attribute that marks a workflow's max-iterations handler.
LIMIT_HANDLER = "__reactive_limit_handler__"

F = TypeVar("F", bound=Callable[..., Any])
H = TypeVar("H", bound=Callable[..., Any])

ConditionArg = (
    Callable[[RuleContext[Any, Any]], bool] | Sequence[Callable[[RuleContext[Any, Any]], bool]]
)

_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class RuleOptions:
    """The decorator's arguments, as given; checked by the class pass."""

    id: str | None = None
    watch_kv: str | bool | None = None
    bucket: str | None = None
    on_subject: str | None = None
    stream: str | None = None
    state_key: Callable[[Any], str] | None = None
    message: Any = None
    when: Any = None
    when_any: Any = None
    publish: str | None = None
    publish_async: str | None = None
    mutate: bool | Callable[[RuleContext[Any, Any]], None] = False
    complete: bool = False
    cooldown: float | str | timedelta | None = None
    cooldown_scope: str | None = None
    max_firings: int | None = None
    on_deletes: bool = False
    timeout: float | str | timedelta | None = None
    create: bool = True
    retry: Any = None
    after: float | str | timedelta | None = None
    every: float | str | timedelta | None = None
    schedule: Any = None
    child: Any = None


class RuleMethod(Generic[F]):
    """A method tagged by ``@rule``. Use ``@method.on_result`` to attach an async result handler."""

    def __init__(self, fn: F, options: RuleOptions) -> None:
        self.fn = fn
        self.options = options
        self.name = fn.__name__
        self.result_handler: Callable[..., Any] | None = None
        self.result_type: Any = _UNSET
        self.error_handler: Callable[..., Any] | None = None
        self.timeout_handler: Callable[..., Any] | None = None
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> RuleMethod[F]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> F: ...
    def __get__(self, obj: object | None, owner: type) -> Any:
        if obj is None:
            return self
        return self.fn.__get__(obj, owner)

    @overload
    def on_result(self, handler_or_type: H, /) -> H: ...
    @overload
    def on_result(self, handler_or_type: type[Any], /) -> Callable[[H], H]: ...
    def on_result(self, handler_or_type: Any, /) -> Any:
        """Register the handler for this async rule's callback result.

        ``@rule_method.on_result`` takes the result type from the handler's
        ``result`` annotation; ``@rule_method.on_result(ResultType)`` names it.
        """
        if not inspect.isroutine(handler_or_type):  # a class, or list[X], A | B, ...
            result_type = handler_or_type

            def deco(handler: H) -> H:
                self.result_type = result_type
                self.result_handler = handler
                return handler

            return deco
        self.result_handler = handler_or_type
        return handler_or_type

    def on_error(self, handler: H, /) -> H:
        """Register the handler of this async rule's failed task: the worker answered with
        an error, or with a result that does not decode. It gets ``(ctx, failure)``
        (a ``TaskFailure``) with the task no longer pending, and may change the state
        (enter a compensating phase), complete, fail or escalate it. Without one, a failed
        task fails the execution."""
        self.error_handler = handler
        return handler

    def on_timeout(self, handler: H, /) -> H:
        """Register the handler of this async rule's task that got no answer within its
        timeout (``timeout=`` of the rule, else the workflow's ``task_timeout``): as
        ``on_error``, with ``failure.kind == "timeout"``. Without one, the workflow's
        ``on_task_timeout`` (fail or escalate) applies."""
        self.timeout_handler = handler
        return handler

    def __repr__(self) -> str:
        return f"<rule {self.name}>"


def rule(
    *,
    id: str | None = None,
    watch_kv: str | bool | None = None,
    bucket: str | None = None,
    on_subject: str | None = None,
    stream: str | None = None,
    state_key: Callable[[Any], str] | None = None,
    message: type[Any] | None = None,
    when: ConditionArg | None = None,
    when_any: Sequence[Callable[[RuleContext[Any, Any]], bool]] | None = None,
    publish: str | None = None,
    publish_async: str | None = None,
    mutate: bool | Callable[[RuleContext[Any, Any]], None] = False,
    complete: bool = False,
    cooldown: float | str | timedelta | None = None,
    cooldown_scope: Literal["execution", "workflow"] | None = None,
    max_firings: int | None = None,
    on_deletes: bool = False,
    timeout: float | str | timedelta | None = None,
    create: bool = True,
    retry: Retry | None = None,
    after: float | str | timedelta | None = None,
    every: float | str | timedelta | None = None,
    schedule: str | timedelta | Schedule | None = None,
    child: type[Any] | None = None,
) -> Callable[[F], RuleMethod[F]]:
    """Declare a rule on a workflow method.

    Trigger (one of):
      * ``watch_kv="pattern"`` (or ``True`` for ``"<workflow_id>.*"``): a change of a
        matching key in the workflow's bucket, or in ``bucket=``; the value is the state.
      * ``on_subject="subject"``: a message; with ``stream=`` it is consumed durably
        from that JetStream stream, otherwise over core NATS (at-most-once).
      * ``on_subject`` with ``state_key=lambda msg: execution_id``: message + state; a
        missing execution is started (``create=False``: not; a message for an execution
        that does not exist is terminated and counted, a signal to no one).
      * ``schedule="0 2 * * *"`` (a cron expression, ``@daily``, ``@every 1h``, a
        ``timedelta``, or ``Schedule(pattern, tz=...)``): each run of the schedule
        starts an execution; the message is a ``ScheduledRun``, the execution id
        ``<rule>-<time of the run>`` (or ``state_key(run)``).

    Conditions: ``when=`` one condition or a list (all must pass); ``when_any=`` a
    list (one must pass).

    Action (one of):
      * ``publish="subject"``: the method returns the payload; with ``mutate=True``
        its changes to ``ctx.state`` are written too.
      * ``publish_async="subject"``: the method returns the request payload; the
        execution waits for the result, handled by ``@method.on_result``.
      * ``mutate=True`` (or a mutator callable run before the method): the method
        changes ``ctx.state``.
      * ``complete=True``: the execution completes after the method's changes;
        with ``publish=`` the method's return value is published as the event.
      * ``child=OtherWorkflow``: the method returns the first state of an execution of
        that workflow (or None); the execution waits for its end, which
        ``@method.on_result`` gets as its final state when it completed, and
        ``@method.on_error`` as a failure when it failed, escalated, timed out or was
        cancelled. Cancelling the parent cancels the child.

    Failures of an async rule: ``timeout=`` (seconds or '30s', at least 1 s) replaces
    the workflow's ``task_timeout`` for this rule's tasks; ``retry=Retry(...)`` sends a
    failed or late task again; ``@method.on_error`` and ``@method.on_timeout`` handle a
    failed task and one that timed out (after the last attempt).

    Time (a ``watch_kv`` rule): ``after="15m"`` fires once the execution has stayed
    unchanged that long with the rule's conditions holding; ``every="10m"`` fires every
    so often while they hold (counted from its last change). Both are schedules in NATS.

    Limits: ``cooldown`` (seconds or '30s'), ``max_firings`` per execution.
    ``cooldown_scope="workflow"`` makes the cooldown one for the whole workflow (the
    rule fires for one execution at most once per cooldown, whichever it is);
    the default, ``"execution"``, keeps one per execution.
    """
    options = RuleOptions(
        id=id,
        watch_kv=watch_kv,
        bucket=bucket,
        on_subject=on_subject,
        stream=stream,
        state_key=state_key,
        message=message,
        when=when,
        when_any=when_any,
        publish=publish,
        publish_async=publish_async,
        mutate=mutate,
        complete=complete,
        cooldown=cooldown,
        cooldown_scope=cooldown_scope,
        max_firings=max_firings,
        on_deletes=on_deletes,
        timeout=timeout,
        create=create,
        retry=retry,
        after=after,
        every=every,
        schedule=schedule,
        child=child,
    )

    def decorate(fn: F) -> RuleMethod[F]:
        if isinstance(fn, RuleMethod):
            raise TypeError(f"{fn.name}: @rule applied twice")
        if not callable(fn):
            raise TypeError(f"@rule decorates a method, not {fn!r}")
        return RuleMethod(fn, options)

    return decorate


def on_max_iterations(handler: H) -> H:
    """Mark the workflow's handler of its ``max_iterations`` limit.

    A transition that would pass the limit does not happen; instead the handler gets
    ``(ctx, limit)`` (a ``LimitReached``) with ``ctx.state`` as it was before that
    transition (its iteration at the limit) and may move it on (a phase where the rule
    that loops does not fire: a summary, a hand-over), complete, fail or escalate it.
    A handler that changes nothing escalates it, as without one.
    """
    setattr(handler, LIMIT_HANDLER, True)
    return handler


def when_cancelled(handler: H) -> H:
    """Mark the workflow's handler of a cancellation (``Engine.cancel``, ``python -m reactive
    cancel``): it gets ``(ctx, reason)``, with any pending task no longer pending (its
    answer, if it comes, is ignored), and may start a compensation (a phase whose rules
    undo what was done, the last of them ending it with ``ctx.state.cancel(reason)``),
    or end it. A handler that changes nothing cancels it, as without one.
    """
    setattr(handler, CANCEL_HANDLER, True)
    return handler
