"""The Workflow base class and the class pass that compiles its rules."""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any, ClassVar

from reactive.dsl._hints import context_args, decodable, param_hint, resolve_hints
from reactive.dsl._timing import child_definition, compile_timing
from reactive.dsl.conditions import Condition, all_of, any_of, as_condition
from reactive.dsl.definition import (
    ActionType,
    RuleDef,
    TriggerMode,
    WorkflowDef,
)
from reactive.dsl.durations import parse_duration
from reactive.dsl.rules import _UNSET, CANCEL_HANDLER, LIMIT_HANDLER, RuleMethod
from reactive.dsl.schedule import ScheduledRun, compile_schedule, run_id
from reactive.dsl.state import ExecutionState
from reactive.errors import DefinitionError
from reactive.subjects import validate_key_pattern, validate_subject

__all__ = ["Workflow", "WorkflowMeta", "definition_of"]

_WORKFLOW_OPTIONS = (
    "id",
    "state",
    "bucket",
    "timeout",
    "max_iterations",
    "task_timeout",
    "on_task_timeout",
    "on_complete",
    "on_fail",
    "on_escalate",
    "on_cancel",
    "description",
    "max_timeline",
    "retention",
)
_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_COOLDOWN_SCOPES = ("execution", "workflow")
_BUCKET_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


class WorkflowMeta(type):
    """Compiles ``@rule`` methods into a frozen WorkflowDef when the class is created."""

    __reactive__: WorkflowDef

    def __new__(
        mcls,
        name: str,
        bases: tuple[type, ...],
        namespace: dict[str, Any],
        *,
        abstract: bool = False,
        **options: Any,
    ) -> WorkflowMeta:
        unknown = set(options) - set(_WORKFLOW_OPTIONS)
        if unknown:
            raise DefinitionError(
                name, [f"unknown workflow option(s): {', '.join(sorted(unknown))}"]
            )
        cls = super().__new__(mcls, name, bases, namespace)
        is_root = not any(isinstance(b, WorkflowMeta) for b in bases)
        if is_root or abstract:
            return cls
        frame = sys._getframe(1)
        localns = dict(frame.f_locals) if frame.f_code.co_name != "<module>" else {}
        localns.update(namespace)
        definition = _compile(cls, namespace, options, localns)
        type.__setattr__(cls, "__reactive__", definition)
        return cls


class Workflow(metaclass=WorkflowMeta):
    """Base class of every workflow. Subclass it with options as class keywords::

        class PlanReview(Workflow, id="plan-review", state=Review, timeout="10m"):
            @rule(watch_kv=True, when=phase_is("submitted"), mutate=True)
            def start(self, ctx: RuleContext[Review, None]) -> None: ...

    Instances may carry dependencies (clients, settings) for the rule methods;
    the engine takes a class (instantiated with no arguments) or an instance.
    A class meant only as a base for others is declared with ``abstract=True``
    (``class Base(Workflow, abstract=True)``): it is not compiled, and may have no rules.
    """

    __reactive__: ClassVar[WorkflowDef]

    @classmethod
    def key(cls, execution_id: str) -> str:
        """The KV key of an execution of this workflow."""
        from reactive.subjects import validate_execution_id

        return cls.__reactive__.key(validate_execution_id(execution_id))


def definition_of(workflow: type[Workflow] | Workflow) -> WorkflowDef:
    """The compiled definition of a workflow class or instance."""
    cls = workflow if isinstance(workflow, type) else type(workflow)
    d = cls.__dict__.get("__reactive__")
    if not isinstance(d, WorkflowDef):
        raise TypeError(f"{cls.__name__} is not a concrete reactive workflow class")
    return d


def _option(
    cls: type, namespace: dict[str, Any], options: dict[str, Any], name: str, default: Any
) -> Any:
    if name in options:
        return options[name]
    if (name in namespace and not callable(namespace[name])) or (
        name == "state" and name in namespace
    ):
        return namespace[name]
    for base in cls.__mro__[1:]:
        d = base.__dict__.get("__reactive__")
        if isinstance(d, WorkflowDef) and name != "id":
            mapped = {"state": "state_type"}.get(name, name)
            return getattr(d, mapped)
    return default


def _compile(
    cls: type, namespace: dict[str, Any], options: dict[str, Any], localns: dict[str, Any]
) -> WorkflowDef:
    reasons: list[str] = []
    name = cls.__name__

    wf_id = _option(cls, namespace, options, "id", None) or _kebab(name)
    if not isinstance(wf_id, str) or not _ID_RE.match(wf_id):
        reasons.append(f"workflow id {wf_id!r} must use only letters, digits, '-' and '_'")
        wf_id = str(wf_id)

    state_type = _option(cls, namespace, options, "state", ExecutionState)
    if not (isinstance(state_type, type) and issubclass(state_type, ExecutionState)):
        reasons.append(f"state type {state_type!r} does not subclass reactive.ExecutionState")
        state_type = ExecutionState
    else:
        try:
            state_type()
        except Exception as e:
            reasons.append(
                f"state type {state_type.__name__} cannot be created empty ({e}); give every field a default"
            )
        problem = decodable(state_type)
        if problem:
            reasons.append(f"state type {state_type.__name__} cannot be decoded: {problem}")

    bucket = _option(cls, namespace, options, "bucket", None) or wf_id.upper().replace("-", "_")
    if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket):
        reasons.append(f"bucket {bucket!r} must use only letters, digits, '-' and '_'")

    def duration(opt: str, default: Any) -> float | None:
        value = _option(cls, namespace, options, opt, default)
        if value is None:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            reasons.append(f"{opt}: {e}")
            return None
        if seconds <= 0:
            reasons.append(f"{opt} must be positive, got {value!r}")
            return None
        return seconds

    timeout = duration("timeout", None)
    retention = duration("retention", None)
    task_timeout = duration("task_timeout", 300.0) or 300.0
    max_iterations = _option(cls, namespace, options, "max_iterations", 0) or 0
    if not isinstance(max_iterations, int) or max_iterations < 0:
        reasons.append(f"max_iterations must be a non-negative int, got {max_iterations!r}")
        max_iterations = 0
    on_task_timeout = _option(cls, namespace, options, "on_task_timeout", "fail")
    if on_task_timeout not in ("fail", "escalate"):
        reasons.append(f"on_task_timeout must be 'fail' or 'escalate', got {on_task_timeout!r}")
    max_timeline = _option(cls, namespace, options, "max_timeline", 200)
    if not isinstance(max_timeline, int) or max_timeline < 0:
        reasons.append(f"max_timeline must be a non-negative int, got {max_timeline!r}")
        max_timeline = 200
    events: dict[str, str] = {}
    for opt in ("on_complete", "on_fail", "on_escalate", "on_cancel"):
        subject = _option(cls, namespace, options, opt, "") or ""
        if subject:
            problem = validate_subject(subject, wildcards=False)
            if problem:
                reasons.append(f"{opt}: {problem}")
        events[opt] = subject
    description = _option(cls, namespace, options, "description", None) or inspect.getdoc(cls) or ""
    if description == inspect.getdoc(Workflow):
        description = ""

    # Gather rule methods through the MRO, base rules first, a subclass overriding by name.
    methods: dict[str, RuleMethod[Any]] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in klass.__dict__.items():
            if isinstance(value, RuleMethod):
                methods.pop(attr, None)
                methods[attr] = value
            elif attr in methods:
                methods.pop(attr)

    limit_handlers = _marked(cls, LIMIT_HANDLER)
    cancel_handlers = _marked(cls, CANCEL_HANDLER)
    if len(limit_handlers) > 1:
        reasons.append(
            "more than one @on_max_iterations handler: " + ", ".join(sorted(limit_handlers))
        )
    if len(cancel_handlers) > 1:
        reasons.append(
            "more than one @when_cancelled handler: " + ", ".join(sorted(cancel_handlers))
        )
    elif limit_handlers and not max_iterations:
        reasons.append(
            f"@on_max_iterations handler {next(iter(limit_handlers))!r} without a limit: "
            "give the workflow max_iterations=N"
        )

    if not methods:
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        reasons.append(
            "no rules: a workflow needs at least one @rule method (a base class meant "
            f"only for subclassing says so: `class {name}({bases}, abstract=True)`)"
        )
    rules: list[RuleDef] = []
    seen_ids: dict[str, str] = {}
    for index, (attr, method) in enumerate(methods.items()):
        rd = _compile_rule(wf_id, bucket, state_type, index, attr, method, localns, reasons)
        if rd is None:
            continue
        if rd.id in seen_ids:
            reasons.append(f"rule {rd.id!r}: duplicate rule id (also used by {seen_ids[rd.id]!r})")
        seen_ids[rd.id] = attr
        rules.append(rd)

    if reasons:
        raise DefinitionError(name, reasons)
    return WorkflowDef(
        id=wf_id,
        cls=cls,
        state_type=state_type,
        bucket=bucket,
        rules=tuple(rules),
        description=description,
        timeout=timeout,
        max_iterations=max_iterations,
        task_timeout=task_timeout,
        on_task_timeout=on_task_timeout,
        on_complete=events["on_complete"],
        on_fail=events["on_fail"],
        on_escalate=events["on_escalate"],
        on_cancel=events["on_cancel"],
        max_timeline=max_timeline,
        retention=retention,
        rules_by_id={r.id: r for r in rules},
        limit_handler_name=next(iter(limit_handlers), None),
        cancel_handler_name=next(iter(cancel_handlers), None),
    )


def _compile_rule(
    wf_id: str,
    wf_bucket: str,
    state_type: type[ExecutionState],
    index: int,
    attr: str,
    method: RuleMethod[Any],
    localns: dict[str, Any],
    reasons: list[str],
) -> RuleDef | None:
    o = method.options
    rule_id = o.id or attr
    start = len(reasons)

    def bad(reason: str) -> None:
        reasons.append(f"rule {rule_id!r}: {reason}")

    if not isinstance(rule_id, str) or not _ID_RE.match(rule_id):
        bad("rule id must use only letters, digits, '-' and '_'")

    # --- trigger -------------------------------------------------------------------
    watch = o.watch_kv
    pattern = ""
    bucket = o.bucket or wf_bucket
    if o.bucket is not None and not (isinstance(o.bucket, str) and _BUCKET_RE.match(o.bucket)):
        bad(f"bucket {o.bucket!r} must use only letters, digits, '-' and '_'")
    if watch is True:
        pattern = f"{wf_id}.*"
    elif isinstance(watch, str):
        pattern = watch
        problem = validate_key_pattern(pattern)
        if problem:
            bad(problem)
    elif watch not in (None, False):
        bad(f"watch_kv must be a key pattern or True, got {watch!r}")
    schedule = compile_schedule(o.schedule, wf_id, rule_id, bad)
    subject = schedule.subject if schedule else (o.on_subject or "")
    if schedule and (pattern or o.on_subject or o.stream):
        bad("schedule= is a trigger of its own: drop watch_kv=, on_subject= and stream=")
    elif o.on_subject is not None:
        problem = validate_subject(o.on_subject)
        if problem:
            bad(problem)
    if pattern and subject and not schedule:
        bad(
            "watch_kv and on_subject are two triggers; use on_subject with state_key for message + state"
        )
    if not pattern and not subject:
        bad("no trigger: give watch_kv=..., on_subject=... or schedule=...")
    if o.state_key is not None and not subject:
        bad("state_key needs on_subject")
    if o.state_key is not None and not callable(o.state_key):
        bad("state_key must be a callable msg -> execution id")
    if (
        o.stream is not None
        and not schedule
        and (not subject or not isinstance(o.stream, str) or not _BUCKET_RE.match(o.stream))
    ):
        bad("stream needs on_subject and a valid stream name (letters, digits, '-' and '_')")
    if o.bucket is not None and not pattern:
        bad("bucket applies to watch_kv rules")
    if o.on_deletes and not pattern:
        bad("on_deletes applies to watch_kv rules")
    if pattern:
        mode = TriggerMode.STATE
    elif o.state_key is not None or schedule:
        mode = TriggerMode.MESSAGE_AND_STATE
    else:
        mode = TriggerMode.MESSAGE

    # --- action --------------------------------------------------------------------
    mutate = o.mutate
    mutator = mutate if callable(mutate) and not isinstance(mutate, bool) else None
    if mutate not in (True, False, None) and mutator is None:
        bad(f"mutate must be True or a mutator callable, got {mutate!r}")
    has_publish = o.publish is not None
    child = child_definition(o.child, bad)
    has_async = o.publish_async is not None or child is not None
    has_mutate = bool(mutate)
    has_complete = bool(o.complete)
    for opt, value in (("publish", o.publish), ("publish_async", o.publish_async)):
        if value is not None:
            if not isinstance(value, str) or not value:
                bad(f"{opt} needs a subject")
            else:
                problem = validate_subject(value, wildcards=False)
                if problem:
                    bad(f"{opt}: {problem}")
    chosen = [
        n
        for n, v in (
            ("publish", has_publish),
            ("publish_async", o.publish_async is not None),
            ("child", child is not None),
            ("mutate", has_mutate),
            ("complete", has_complete),
        )
        if v
    ]
    allowed_pairs = ({"publish", "mutate"}, {"publish", "complete"})
    if not chosen:
        bad("no action: give publish=, publish_async=, mutate=True or complete=True")
        action = ActionType.MUTATE
    elif len(chosen) > 1 and set(chosen) not in allowed_pairs:
        bad(f"two actions on one rule ({' and '.join(chosen)})")
        action = ActionType.MUTATE
    elif has_complete:
        action = ActionType.COMPLETE
    elif has_async:
        action = ActionType.PUBLISH_ASYNC
    elif has_publish:
        action = ActionType.PUBLISH
    else:
        action = ActionType.MUTATE
    writes_state = action is not ActionType.PUBLISH or has_mutate
    if o.on_deletes and writes_state:
        bad("a rule that fires on deletes cannot write state (the key is gone): use publish= alone")
    if mode is TriggerMode.MESSAGE and writes_state and subject:
        bad(f"{action.value} needs state, but a message-only rule has none: add state_key=...")

    # --- types ---------------------------------------------------------------------
    hints = resolve_hints(method.fn, localns)
    ctx_state, ctx_message = context_args(param_hint(method.fn, hints, 1))
    message_type = o.message if o.message is not None else ctx_message
    if schedule and message_type not in (_UNSET, None, ScheduledRun):
        bad(f"a scheduled rule's message is a ScheduledRun, not {message_type!r}")
    elif schedule:
        message_type = ScheduledRun
    if subject:
        if message_type is _UNSET or message_type is None:
            bad(
                "cannot tell the message type: annotate ctx as RuleContext[State, Message] or pass message="
            )
            message_type = None
        else:
            problem = decodable(message_type)
            if problem:
                bad(f"message type {message_type!r} cannot be decoded: {problem}")
    else:
        message_type = None
    if (
        ctx_state not in (_UNSET, None, Any)
        and isinstance(ctx_state, type)
        and mode is not TriggerMode.MESSAGE
        and not issubclass(state_type, ctx_state)
    ):
        bad(
            f"ctx is annotated with state {ctx_state.__name__}, but the workflow state is {state_type.__name__}"
        )

    result_type: Any = None
    handler_name: str | None = None
    if action is ActionType.PUBLISH_ASYNC:
        handler = method.result_handler
        if handler is None:
            what = "child=" if child else "publish_async"
            bad(f"{what} without a result handler: add @<rule>.on_result")
        else:
            handler_name = handler.__name__
            result_type = method.result_type
            if result_type is _UNSET:
                result_type = param_hint(handler, resolve_hints(handler, localns), 2)
            if result_type is _UNSET and child is not None:
                result_type = child.state_type  # (the child's final state)
            if result_type is _UNSET:
                bad(
                    "cannot tell the result type: annotate the handler's result parameter or use @<rule>.on_result(Type)"
                )
                result_type = None
            else:
                problem = decodable(result_type)
                if problem:
                    bad(f"result type {result_type!r} cannot be decoded: {problem}")
    elif method.result_handler is not None:
        bad("on_result is only for publish_async rules")
    timing = compile_timing(o, method, mode, action, bad)

    # --- conditions and limits --------------------------------------------------------
    conditions: list[Condition] = []
    try:
        if o.when is not None:
            conditions.append(all_of(*(o.when if isinstance(o.when, list | tuple) else [o.when])))
        if o.when_any is not None:
            if not isinstance(o.when_any, list | tuple):
                raise TypeError("when_any takes a list of conditions")
            conditions.append(any_of(*o.when_any))
    except TypeError as e:
        bad(str(e))
        conditions = []
    cond = all_of(*conditions) if conditions else as_condition(lambda ctx: True)
    description = " & ".join(c.description for c in conditions) if conditions else "always"

    cooldown = 0.0
    cooldown_read = True  # (an unreadable one is reported once, not again by its scope)
    if o.cooldown is not None:
        try:
            cooldown = parse_duration(o.cooldown)
        except ValueError as e:
            bad(f"cooldown: {e}")
            cooldown_read = False
        if cooldown < 0:
            bad(f"negative cooldown {o.cooldown!r}")
            cooldown_read = False
    cooldown_scope = "execution"
    if o.cooldown_scope is not None:
        if o.cooldown_scope not in _COOLDOWN_SCOPES:
            bad(f"cooldown_scope must be 'execution' or 'workflow', got {o.cooldown_scope!r}")
        elif cooldown_read and cooldown == 0:
            bad(f"cooldown_scope={o.cooldown_scope!r} needs a cooldown (give cooldown=...)")
        else:
            cooldown_scope = o.cooldown_scope
    max_firings = o.max_firings or 0
    if o.max_firings is not None and (not isinstance(o.max_firings, int) or o.max_firings < 0):
        bad(f"max_firings must be a non-negative int, got {o.max_firings!r}")
        max_firings = 0

    if len(reasons) > start:
        return None
    return RuleDef(
        id=rule_id,
        workflow_id=wf_id,
        index=index,
        method_name=attr,
        mode=mode,
        action=action,
        writes_state=writes_state,
        condition=cond.fn if len(conditions) == 1 else cond,
        condition_description=description,
        bucket=bucket if mode is not TriggerMode.MESSAGE else "",
        pattern=pattern,
        subject=subject,
        stream=o.stream,
        state_key=o.state_key or (run_id if schedule else None),
        message_type=message_type,
        publish_subject=o.publish_async or o.publish or "",
        mutator=mutator,
        result_type=result_type,
        result_handler_name=handler_name,
        error_handler_name=timing.error_handler,
        timeout_handler_name=timing.timeout_handler,
        task_timeout=timing.task_timeout,
        creates=bool(o.create),
        retry=timing.retry,
        after=timing.after,
        every=timing.every,
        child=child.id if child else "",
        child_state=child.state_type if child else None,
        schedule=schedule.pattern if schedule else "",
        schedule_tz=schedule.tz if schedule else None,
        cooldown=cooldown,
        shared_cooldown=cooldown_scope == "workflow",
        max_firings=max_firings,
        on_deletes=bool(o.on_deletes),
        phases=cond.phases,
    )


def _marked(cls: type, mark: str) -> dict[str, Any]:
    """The methods of ``cls`` (through its bases, a subclass overriding by name) that carry
    ``mark``."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in klass.__dict__.items():
            if getattr(value, mark, False):
                found[attr] = value
            elif attr in found:
                found.pop(attr)
    return found
