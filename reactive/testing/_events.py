"""Events that happen to a running engine, and the strategy that draws them from a workflow's definition."""

from __future__ import annotations

import abc
import ast
import dataclasses
import enum
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st

from reactive import cron
from reactive.codecs import decode, encode_json
from reactive.compiled import ActionType, RuleDef, WorkflowDef
from reactive.dsl.state import ExecutionState, Status
from reactive.dsl.workflow import Workflow, definition_of
from reactive.testing._engine import TestEngine
from reactive.testing._states import _TERMINAL, states
from reactive.testing._values import SearchStrategy, messages, values

__all__ = [
    "Advance",
    "BadMessage",
    "Callback",
    "Cancel",
    "Event",
    "Message",
    "Restart",
    "WriteKey",
    "WriteState",
    "events",
    "phases_of",
]

DEFAULT_EXECUTION_IDS: tuple[str, ...] = ("e1", "e2", "e3")


@dataclass(frozen=True, repr=False)
class Event(abc.ABC):
    """Something that happens to a running engine; ``apply`` makes it happen and settles.

    Its repr is Python that builds it again (enums as ``Status.PENDING``, a struct with
    only the fields that are not at their default), so a failing example reads as code.
    """

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{f.name}={plain_repr(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        )
        return f"{type(self).__name__}({fields})"

    @abc.abstractmethod
    async def apply(self, te: TestEngine) -> None:
        """Make it happen on ``te`` and let the engine settle."""


@dataclass(frozen=True, repr=False)
class Message(Event):
    """A message published on ``subject`` (as a producer would)."""

    subject: str
    payload: Any

    async def apply(self, te: TestEngine) -> None:
        await te.trigger_message(self.subject, self.payload)


@dataclass(frozen=True, repr=False)
class BadMessage(Event):
    """Bytes that are not a valid message (or carry an invalid execution id)."""

    subject: str
    data: bytes

    async def apply(self, te: TestEngine) -> None:
        await te.trigger_message(self.subject, self.data)


@dataclass(frozen=True, repr=False)
class Callback(Event):
    """A worker's answer to the task an execution waits for.

    ``results`` holds one result per async rule of the workflow; the one of the
    rule the execution is waiting on is sent (with its pending task id). With
    ``error`` the task reports a failure instead; with ``stale`` the callback
    names a task id that is not pending (a late or duplicate answer). An
    execution that is not waiting gets a callback it must ignore.
    """

    workflow_id: str
    execution_id: str
    results: tuple[tuple[str, Any], ...] = ()
    error: str | None = None
    stale: bool = False

    async def apply(self, te: TestEngine) -> None:
        current = te.state(self.workflow_id, self.execution_id)
        task_id = current.pending_task_id if current is not None else ""
        rule_id = current.pending_rule_id if current is not None else ""
        if self.stale:
            task_id = f"{self.execution_id}-stale-0"
        by_rule = dict(self.results)
        result = by_rule.get(rule_id, self.results[0][1] if self.results else None)
        body = msgspec.to_builtins(result) if result is not None else {}
        if not isinstance(body, dict):
            body = {}
        body["task_id"] = task_id
        await te.callback(
            self.workflow_id, self.execution_id, body, task_id=task_id, error=self.error
        )


@dataclass(frozen=True, repr=False)
class Cancel(Event):
    """An execution is cancelled (``Engine.cancel``); one that has ended or does not exist
    is left as it is."""

    workflow_id: str
    execution_id: str

    async def apply(self, te: TestEngine) -> None:
        await te.cancel(self.workflow_id, self.execution_id, "cancelled by the test")


@dataclass(frozen=True, repr=False)
class Advance(Event):
    """The clock moves forward ``seconds`` (deadlines, task timeouts and cooldown ends fire)."""

    seconds: float

    async def apply(self, te: TestEngine) -> None:
        await te.advance(self.seconds)


@dataclass(frozen=True, repr=False)
class Restart(Event):
    """The engine process stops and a new one (new instance id, nothing in memory) starts.

    It runs on the same backend and clock, so it must pick up every execution
    where the last committed state left it; ``down_for`` seconds pass in
    between, while no engine runs (deadlines can pass meanwhile). Only
    ``WorkflowMachine`` can apply it (it replaces the machine's ``TestEngine``);
    ``apply`` refuses.
    """

    down_for: float = 0.0

    async def apply(self, te: TestEngine) -> None:
        raise TypeError("Restart replaces the TestEngine: it is applied by WorkflowMachine")


# Fields an outside writer leaves as the engine wrote them.
_ENGINE_FIELDS: tuple[str, ...] = (
    "id",
    "workflow_id",
    "status",
    "pending_task_id",
    "pending_rule_id",
    "created_at",
    "updated_at",
    "completed_at",
    "deadline",
    "timeline",
    *sorted(ExecutionState.__reactive_bookkeeping__),
)


@dataclass(frozen=True, repr=False)
class WriteState(Event):
    """An outside writer puts an execution's state in KV.

    A missing execution is created with ``state`` as it is. An existing one is
    edited: the written value takes the workflow's own fields, ``phase``,
    ``iteration`` and ``error`` from ``state`` and keeps everything the engine
    owns (status, pending task, times, deadline, timeline, firings, outbox) from
    the current value. A terminal execution is left alone unless
    ``overwrite_terminal``.
    """

    workflow_id: str
    execution_id: str
    state: ExecutionState
    overwrite_terminal: bool = False

    async def apply(self, te: TestEngine) -> None:
        current = te.state(self.workflow_id, self.execution_id)
        new = decode(type(self.state), encode_json(self.state))  # a copy: events stay immutable
        if current is not None:
            if current.status in _TERMINAL and not self.overwrite_terminal:
                return
            for name in _ENGINE_FIELDS:
                setattr(new, name, getattr(current, name))
        await te.trigger_kv(self.workflow_id, self.execution_id, new)


@dataclass(frozen=True, repr=False)
class WriteKey(Event):
    """An outside writer (a sensor, another service) puts ``value`` at a key a rule watches.

    For rules that watch an entity-state bucket, or keys other than the
    workflow's own executions (``watch_kv="unit.*"``).
    """

    bucket: str
    key: str
    value: Any

    async def apply(self, te: TestEngine) -> None:
        await te.put(self.bucket, self.key, self.value)


def plain_repr(value: Any) -> str:
    """``repr`` that is valid Python: enum members by name, structs by their non-default fields."""
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, msgspec.Struct):
        parts = [
            f"{name}={plain_repr(getattr(value, name))}"
            for name, default in _defaults(type(value))
            if default is _REQUIRED or getattr(value, name) != default
        ]
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, list):
        return "[" + ", ".join(map(plain_repr, value)) + "]"
    if isinstance(value, tuple):
        inner = ", ".join(map(plain_repr, value))
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{plain_repr(k)}: {plain_repr(v)}" for k, v in value.items()) + "}"
    return repr(value)


_REQUIRED: Any = object()


@functools.cache
def _defaults(tp: type[msgspec.Struct]) -> tuple[tuple[str, Any], ...]:
    """Each field of the struct type and its default (``_REQUIRED`` if it has none)."""
    out = []
    for f in msgspec.structs.fields(tp):
        if f.default is not msgspec.NODEFAULT:
            out.append((f.name, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            out.append((f.name, f.default_factory()))
        else:
            out.append((f.name, _REQUIRED))
    return tuple(out)


_PHASE_CALL = re.compile(r"phase_(?:is|in)\(([^()]*)\)")


def phases_of(workflow: type[Workflow] | Workflow | WorkflowDef) -> list[str]:
    """Phases a workflow's rule conditions test with ``phase_is`` / ``phase_in`` (in order, without repeats)."""
    d = workflow if isinstance(workflow, WorkflowDef) else definition_of(workflow)
    out: list[str] = []
    for r in d.rules:
        for args in _PHASE_CALL.findall(r.condition_description):
            try:
                parsed = ast.literal_eval(f"({args},)")
            except (ValueError, SyntaxError):
                continue
            for p in parsed:
                if isinstance(p, str) and p not in out:
                    out.append(p)
    return out


def _concrete_subject(subject: str) -> SearchStrategy[str]:
    """Subjects matching ``subject`` ('*' and '>' filled with small tokens)."""
    tokens = subject.split(".")
    parts: list[SearchStrategy[str]] = []
    for tok in tokens:
        if tok == "*":
            parts.append(st.sampled_from(["a", "b"]))
        elif tok == ">":
            parts.append(st.sampled_from(["x", "x.y"]))
        else:
            parts.append(st.just(tok))
    return st.tuples(*parts).map(".".join)


_PROBE = "zzprobe9"


def _steer(msg: Any, state_key: Callable[[Any], str], exec_id: str) -> Any:
    """``msg`` with the field that ``state_key`` reads set to ``exec_id``, if one can be found.

    Each top-level field that holds a string (or None) is set to a probe in turn;
    the first whose probe shows up in ``state_key``'s answer is the key field.
    """
    if not isinstance(msg, msgspec.Struct):
        return msg
    for name in msg.__struct_fields__:
        if not isinstance(getattr(msg, name), str | None):
            continue
        try:
            probed = msgspec.structs.replace(msg, **{name: _PROBE})
            key = state_key(probed)
        except Exception:
            continue
        if isinstance(key, str) and _PROBE in key:
            return msgspec.structs.replace(msg, **{name: exec_id})
    return msg


def _advances(d: WorkflowDef, max_advance: float | None) -> SearchStrategy[Advance]:
    marks = {1.0, d.task_timeout, d.task_timeout + 1}
    if d.timeout:
        marks |= {d.timeout, d.timeout + 1}
    for r in d.rules:
        if r.cooldown:
            marks |= {r.cooldown / 2, r.cooldown, r.cooldown + 0.5}
        # (A rule's own task timeout, a retry's backoff, a timer rule's period.)
        # (And a schedule's time between runs.)
        between = cron.period(r.schedule, r.schedule_tz) if r.schedule else None
        for period in (
            r.task_timeout,
            r.retry.backoff if r.retry else None,
            r.after or r.every,
            between,
        ):
            if period:
                marks |= {period, period + 0.5}
    top = max_advance if max_advance is not None else max(marks) * 1.1
    marks = {m for m in marks if m <= top}
    amounts = st.one_of(
        st.sampled_from(sorted(marks)) if marks else st.nothing(),
        st.integers(0, max(1, int(top))).map(float),
    )
    return amounts.map(Advance)


def events(
    workflow: type[Workflow] | Workflow,
    *,
    execution_ids: Sequence[str] = DEFAULT_EXECUTION_IDS,
    phases: Sequence[str] | None = None,
    max_advance: float | None = None,
    include_messages: bool = True,
    include_callbacks: bool = True,
    include_advances: bool = True,
    include_writes: bool = True,
    include_restarts: bool = False,
    include_cancels: bool | None = None,
    bad_input: bool = False,
    message_strategies: Mapping[str, SearchStrategy[Any]] | None = None,
    result_strategies: Mapping[str, SearchStrategy[Any]] | None = None,
) -> SearchStrategy[Event]:
    """Trigger events for ``workflow``, derived from its compiled definition.

    * ``Message``: for every rule with ``on_subject``, a message of the rule's
      message type on a subject matching it. For a message + state rule the
      field its ``state_key`` reads is set to an id from ``execution_ids`` (so
      events keep hitting the same few executions); give
      ``message_strategies={subject: strategy}`` where that guess cannot work.
    * ``Callback``: if the workflow has async rules, an answer for whatever task
      an execution from ``execution_ids`` waits on: a result of the rule's
      result type (or from ``result_strategies={rule_id: strategy}``),
      sometimes an error, sometimes a stale task id.
    * ``Advance``: the clock moves by up to ``max_advance`` seconds (default a
      bit past the longest timeout, task timeout or cooldown), often by exactly
      one of those.
    * ``WriteState``: an outside writer creates or edits an execution (phase from
      ``phases``, default the phases the rule conditions test, plus "";
      ``iteration`` within ``max_iterations``).
    * ``Restart`` (only with ``include_restarts=True``; ``WorkflowMachine`` turns
      it on): the engine process is replaced by a new one.
    * ``Cancel``: an execution from ``execution_ids`` is cancelled (by default only
      for a workflow with a ``@when_cancelled`` handler: ``include_cancels``).
    * ``BadMessage`` (only with ``bad_input=True``): bytes that do not decode, or
      a message whose state key is not a valid execution id.
    """
    d = definition_of(workflow)
    ids = st.sampled_from(list(execution_ids))
    custom = dict(message_strategies or {})
    parts: list[SearchStrategy[Event]] = []
    if include_messages:
        for r in d.rules:
            if not r.subject or r.schedule:
                continue  # (a schedule's runs come with the clock: Advance)
            subjects = _concrete_subject(r.subject)
            if r.subject in custom:
                payloads = custom[r.subject]
            else:
                payloads = (
                    _keyed(r, messages(r.message_type), ids)
                    if r.state_key
                    else messages(r.message_type)
                )
            parts.append(st.builds(Message, subject=subjects, payload=payloads))
            if bad_input:
                garbage = st.sampled_from([b"", b"{", b"not json", b"[1, 2]", b"null"])
                parts.append(st.builds(BadMessage, subject=subjects, data=garbage))
                if r.state_key is not None:
                    bad_ids = st.sampled_from(["bad.id", "*", "with space", ">"])
                    steered = _keyed(r, messages(r.message_type), bad_ids).map(encode_json)
                    parts.append(st.builds(BadMessage, subject=subjects, data=steered))
    async_rules = [r for r in d.rules if r.action is ActionType.PUBLISH_ASYNC]
    if include_callbacks and async_rules:
        chosen = dict(result_strategies or {})
        results = st.tuples(
            *(
                st.tuples(st.just(r.id), chosen[r.id] if r.id in chosen else values(r.result_type))
                for r in async_rules
            )
        )
        parts.append(
            st.builds(
                Callback,
                workflow_id=st.just(d.id),
                execution_id=ids,
                results=results,
                error=st.sampled_from([None, None, None, "worker failed"]),
                stale=st.sampled_from([False, False, False, True]),
            )
        )
    if include_advances:
        parts.append(_advances(d, max_advance))
    if include_writes:
        pool = list(phases) if phases is not None else [*phases_of(d), ""]

        written = states(
            d.state_type,
            phases=pool,
            statuses=[Status.PENDING],
            ids=list(execution_ids),
            workflow_id=d.id,
            max_iteration=d.max_iterations or 5,
            error="",
        )
        parts.append(written.map(lambda state: WriteState(d.id, state.id, state)))
    if include_restarts:
        parts.append(st.just(Restart()))
    if include_cancels if include_cancels is not None else bool(d.cancel_handler_name):
        parts.append(st.builds(Cancel, workflow_id=st.just(d.id), execution_id=ids))
    if not parts:
        raise ValueError(f"no events for workflow {d.id!r}: everything is excluded")
    return st.one_of(*parts)


def _keyed(
    r: RuleDef, payloads: SearchStrategy[Any], ids: SearchStrategy[str]
) -> SearchStrategy[Any]:
    state_key = r.state_key
    assert state_key is not None
    return st.tuples(payloads, ids).map(lambda pair: _steer(pair[0], state_key, pair[1]))
