"""Hypothesis strategies and a stateful machine for property-based tests of rule sets.

Hypothesis is a test dependency: import this module from tests only.

Strategies:

* ``values(tp)``: values of any type msgspec can encode and decode (structs,
  enums, literals, unions, collections, constrained ``Annotated`` types...),
  drawn so that they survive a JSON round trip.
* ``messages(MsgType, **overrides)``: message structs; ``overrides`` fix or
  draw single fields.
* ``states(StateType, phases=..., **overrides)``: execution states with the
  base fields kept consistent (status from ``Status``, ``iteration >= 0``, the
  pending task set exactly when waiting, ``completed_at`` exactly when terminal).
* ``events(Workflow, execution_ids=..., phases=..., max_advance=...)``: trigger
  events derived from a workflow's compiled definition: messages on each
  message rule's subject, callbacks for pending tasks, clock advances, and
  outside writes of state. Each is a small frozen dataclass with
  ``async apply(test_engine)``.

The machine: ``workflow_machine(*workflows, **options)`` (or subclass
``WorkflowMachine`` and set ``workflows``) gives a
``hypothesis.stateful.RuleBasedStateMachine`` that runs a ``TestEngine`` and,
after every step, checks the engine's invariants on every execution (see
``WorkflowMachine``)::

    from reactive.testing.strategies import workflow_machine

    PlanReviewMachine = workflow_machine(PlanReview, execution_ids=("p1", "p2"))
    TestPlanReview = PlanReviewMachine.TestCase          # collected by pytest

    # or, with checks of your own:
    class ReviewMachine(WorkflowMachine):
        workflows = (PlanReview,)

        def check_execution(self, definition, key, state):
            assert state.iteration <= 3

    TestReview = ReviewMachine.TestCase
    TestReview.settings = settings(max_examples=50, deadline=None)
"""

from __future__ import annotations

import abc
import ast
import math
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, TypeVar, cast

import anyio
import anyio.from_thread
import hypothesis
import msgspec
import msgspec.inspect as mi
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant
from hypothesis.stateful import rule as _machine_rule

from reactive.codecs import decode, encode_json
from reactive.compiled import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.context import RuleContext
from reactive.dsl.state import ExecutionState, Status, TimelineEntry
from reactive.dsl.workflow import Workflow, definition_of
from reactive.subjects import matches_pattern
from reactive.testing import TestEngine

__all__ = [
    "Advance",
    "BadMessage",
    "Callback",
    "Event",
    "Message",
    "Restart",
    "WorkflowMachine",
    "WriteState",
    "events",
    "execution_ids",
    "messages",
    "phases_of",
    "states",
    "values",
    "workflow_machine",
]

T = TypeVar("T")
S = TypeVar("S", bound=ExecutionState)
SearchStrategy = st.SearchStrategy

DEFAULT_EXECUTION_IDS: tuple[str, ...] = ("e1", "e2", "e3")

_TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.ESCALATED, Status.TIMED_OUT})
_INT64 = (-(2**63), 2**63 - 1)
_MAX_COLLECTION = 3
_EPOCH_MIN = datetime(2020, 1, 1)
_EPOCH_MAX = datetime(2035, 1, 1)

# ---------------------------------------------------------------------------------------
# values of any msgspec type
# ---------------------------------------------------------------------------------------


def values(tp: Any) -> SearchStrategy[Any]:
    """Values of ``tp`` (any type msgspec can decode) that survive a JSON round trip.

    Honours ``Annotated[..., msgspec.Meta(...)]`` bounds, lengths and patterns;
    floats are finite; ints fit in 64 bits; datetimes are in UTC; collections
    hold at most three items. Recursive structs are supported.
    """
    return _Translator().strategy(mi.type_info(tp))


_OMIT: Any = object()  # "leave this field at its default"


class _Translator:
    """Turns msgspec.inspect type trees into strategies, memoising shared (recursive) nodes."""

    def __init__(self) -> None:
        self._memo: dict[int, SearchStrategy[Any]] = {}

    def strategy(self, t: mi.Type) -> SearchStrategy[Any]:
        if isinstance(t, mi.Metadata):
            return self.strategy(t.type)
        if isinstance(t, mi.AnyType):
            return _json_values()
        if isinstance(t, mi.NoneType):
            return st.none()
        if isinstance(t, mi.BoolType):
            return st.booleans()
        if isinstance(t, mi.IntType):
            return _ints(t)
        if isinstance(t, mi.FloatType):
            return _floats(t)
        if isinstance(t, mi.StrType):
            return _strs(t)
        if isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
            out: SearchStrategy[Any] = st.binary(
                min_size=t.min_length or 0, max_size=_cap(t.min_length, t.max_length, 16)
            )
            if isinstance(t, mi.ByteArrayType):
                out = out.map(bytearray)
            return out
        if isinstance(t, mi.DateTimeType):
            aware = st.datetimes(_EPOCH_MIN, _EPOCH_MAX, timezones=st.just(UTC))
            return st.datetimes(_EPOCH_MIN, _EPOCH_MAX) if t.tz is False else aware
        if isinstance(t, mi.TimeType):
            return st.times(timezones=st.just(UTC)) if t.tz else st.times()
        if isinstance(t, mi.DateType):
            return st.dates(_EPOCH_MIN.date(), _EPOCH_MAX.date())
        if isinstance(t, mi.TimeDeltaType):
            return st.timedeltas(timedelta(days=-1000), timedelta(days=1000))
        if isinstance(t, mi.UUIDType):
            return st.uuids()
        if isinstance(t, mi.DecimalType):
            return st.decimals(
                allow_nan=False,
                allow_infinity=False,
                places=6,
                min_value=-(10**12),
                max_value=10**12,
            )
        if isinstance(t, mi.RawType):
            return st.just(msgspec.Raw(b"null"))
        if isinstance(t, mi.EnumType):
            return st.sampled_from(list(t.cls))
        if isinstance(t, mi.LiteralType):
            return st.sampled_from(t.values)
        if isinstance(t, mi.UnionType):
            return st.one_of(*(self.strategy(u) for u in t.types))
        if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
            items = self.strategy(t.item_type)
            lo, hi = t.min_length or 0, _cap(t.min_length, t.max_length, _MAX_COLLECTION)
            if isinstance(t, mi.SetType | mi.FrozenSetType):
                kind = set if isinstance(t, mi.SetType) else frozenset
                return st.sets(items, min_size=lo, max_size=hi).map(kind)
            lists = st.lists(items, min_size=lo, max_size=hi)
            return lists.map(tuple) if isinstance(t, mi.VarTupleType) else lists
        if isinstance(t, mi.TupleType):
            return st.tuples(*(self.strategy(i) for i in t.item_types))
        if isinstance(t, mi.DictType | mi.FrozenDictType):
            return st.dictionaries(
                self.strategy(t.key_type),
                self.strategy(t.value_type),
                min_size=t.min_length or 0,
                max_size=_cap(t.min_length, t.max_length, _MAX_COLLECTION),
            )
        if isinstance(t, mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType):
            return self.record(t, {})
        if isinstance(t, mi.CustomType):
            return _json_values() if t.cls is object else st.from_type(t.cls)
        raise TypeError(f"no strategy for {t!r}")  # pragma: no cover - ExtType is msgpack-only

    def record(
        self,
        t: mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType,
        overrides: Mapping[str, Any],
    ) -> SearchStrategy[Any]:
        """A struct (dataclass, named tuple, typed dict); ``overrides`` fix or draw fields."""
        key = id(t)
        if not overrides and key in self._memo:
            return self._memo[key]

        def build() -> SearchStrategy[Any]:
            fields: dict[str, SearchStrategy[Any]] = {}
            for f in t.fields:
                if f.name in overrides:
                    fields[f.name] = _as_strategy(overrides[f.name])
                elif f.required:
                    fields[f.name] = self.strategy(f.type)
                else:
                    fields[f.name] = st.one_of(st.just(_OMIT), self.strategy(f.type))
            cls = t.cls

            def make(kwargs: dict[str, Any]) -> Any:
                given = {k: v for k, v in kwargs.items() if v is not _OMIT}
                return dict(given) if isinstance(t, mi.TypedDictType) else cls(**given)

            return st.fixed_dictionaries(fields).map(make)

        out: SearchStrategy[Any] = st.deferred(build)
        if not overrides:
            self._memo[key] = out
        return out


def _as_strategy(value: Any) -> SearchStrategy[Any]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


def _cap(lo: int | None, hi: int | None, default: int) -> int:
    """A max size: ``default`` (or the minimum, if larger), within the type's own maximum."""
    cap = max(lo or 0, default)
    return min(hi, cap) if hi is not None else cap


def _ints(t: mi.IntType) -> SearchStrategy[int]:
    lo, hi = _INT64
    if t.ge is not None:
        lo = max(lo, t.ge)
    if t.gt is not None:
        lo = max(lo, t.gt + 1)
    if t.le is not None:
        hi = min(hi, t.le)
    if t.lt is not None:
        hi = min(hi, t.lt - 1)
    m = t.multiple_of
    if m:
        return st.integers(-(-lo // m), hi // m).map(lambda n: n * m)
    return st.integers(lo, hi)


def _floats(t: mi.FloatType) -> SearchStrategy[float]:
    lo = t.ge if t.ge is not None else t.gt
    hi = t.le if t.le is not None else t.lt
    if t.multiple_of:
        m = t.multiple_of
        ilo = math.ceil(lo / m) if lo is not None else -(10**6)
        ihi = math.floor(hi / m) if hi is not None else 10**6
        return st.integers(ilo, ihi).map(lambda n: n * m).filter(lambda x: _in_float_bounds(x, t))
    return st.floats(
        min_value=lo,
        max_value=hi,
        exclude_min=t.gt is not None and t.ge is None,
        exclude_max=t.lt is not None and t.le is None,
        allow_nan=False,
        allow_infinity=False,
    )


def _in_float_bounds(x: float, t: mi.FloatType) -> bool:
    return (
        (t.ge is None or x >= t.ge)
        and (t.gt is None or x > t.gt)
        and (t.le is None or x <= t.le)
        and (t.lt is None or x < t.lt)
    )


def _strs(t: mi.StrType) -> SearchStrategy[str]:
    lo, hi = t.min_length or 0, _cap(t.min_length, t.max_length, 16)
    if t.pattern is not None:
        top = t.max_length
        return st.from_regex(t.pattern).filter(
            lambda s: lo <= len(s) and (top is None or len(s) <= top)
        )
    return st.text(min_size=lo, max_size=hi)


def _json_values() -> SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(*_INT64)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=8)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=5,
    )


def messages(msg_type: type[T], **overrides: Any) -> SearchStrategy[T]:
    """Instances of a message type (a struct, dataclass, ...); ``overrides`` map field names to values or strategies."""
    info = mi.type_info(msg_type)
    if overrides:
        if not isinstance(
            info, mi.StructType | mi.DataclassType | mi.NamedTupleType | mi.TypedDictType
        ):
            raise TypeError(f"field overrides need a struct-like type, not {msg_type!r}")
        unknown = set(overrides) - {f.name for f in info.fields}
        if unknown:
            raise TypeError(f"{msg_type.__name__} has no field(s) {', '.join(sorted(unknown))}")
        return cast(SearchStrategy[T], _Translator().record(info, overrides))
    return cast(SearchStrategy[T], _Translator().strategy(info))


# ---------------------------------------------------------------------------------------
# execution states
# ---------------------------------------------------------------------------------------

_BASE_FIELDS = frozenset(ExecutionState.__struct_fields__)


def execution_ids() -> SearchStrategy[str]:
    """Token-safe execution ids (letters, digits, '-' and '_')."""
    return st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True)


def _phase_strategy(phases: Sequence[str] | None) -> SearchStrategy[str]:
    if phases:
        return st.sampled_from(list(phases))
    return st.text("abcdefghijklmnopqrstuvwxyz_", max_size=10)


def _utc_times() -> SearchStrategy[datetime]:
    return st.datetimes(_EPOCH_MIN, _EPOCH_MAX, timezones=st.just(UTC))


def states(
    state_type: type[S],
    *,
    phases: Sequence[str] | None = None,
    statuses: Sequence[Status | str] | None = None,
    ids: SearchStrategy[str] | Sequence[str] | None = None,
    workflow_id: str | None = None,
    max_iteration: int = 10,
    pending_rules: Sequence[str] | None = None,
    timeline: bool = True,
    **overrides: Any,
) -> SearchStrategy[S]:
    """Instances of ``state_type`` (an ``ExecutionState`` subclass) with consistent base fields.

    * ``status`` from ``statuses`` (default: every ``Status``); ``phase`` from
      ``phases`` (default: short lowercase words); ``0 <= iteration <= max_iteration``.
    * ``pending_task_id`` / ``pending_rule_id`` (from ``pending_rules``) and
      ``task_deadline`` are set exactly when the status is waiting; ``completed_at``
      exactly when it is terminal; ``error`` only when failed, escalated or timed
      out; ``created_at`` whenever it is not pending. Times are UTC.
    * ``id`` from ``ids`` (a strategy or a list; default token-safe ids),
      ``workflow_id`` as given (default: drawn).
    * The engine's bookkeeping (firings, outbox, owner) is left empty.
    * The subclass's own fields are drawn from their types (see ``values``).

    ``overrides`` map any field name to a value or a strategy and win over all of the above.
    """
    if not (isinstance(state_type, type) and issubclass(state_type, ExecutionState)):
        raise TypeError(f"{state_type!r} does not subclass ExecutionState")
    info = mi.type_info(state_type)
    assert isinstance(info, mi.StructType)
    unknown = set(overrides) - set(state_type.__struct_fields__)
    if unknown:
        raise TypeError(f"{state_type.__name__} has no field(s) {', '.join(sorted(unknown))}")
    translator = _Translator()
    own: dict[str, SearchStrategy[Any]] = {}
    for f in info.fields:
        if f.name in _BASE_FIELDS or f.name in overrides:
            continue
        strat = translator.strategy(f.type)
        own[f.name] = strat if f.required else st.one_of(st.just(_OMIT), strat)
    status_pool = [Status(s) for s in statuses] if statuses else list(Status)
    id_strategy: SearchStrategy[str] = (
        execution_ids()
        if ids is None
        else ids
        if isinstance(ids, st.SearchStrategy)
        else st.sampled_from(list(ids))
    )
    token = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
    rule_ids = st.sampled_from(list(pending_rules)) if pending_rules else token
    fixed = {k: _as_strategy(v) for k, v in overrides.items()}

    @st.composite
    def draw_state(draw: st.DrawFn) -> S:
        status: Status = (
            draw(fixed["status"]) if "status" in fixed else draw(st.sampled_from(status_pool))
        )
        kw: dict[str, Any] = {
            "id": draw(id_strategy),
            "workflow_id": workflow_id if workflow_id is not None else draw(token),
            "phase": draw(_phase_strategy(phases)),
            "iteration": draw(st.integers(0, max(0, max_iteration))),
            "status": status,
        }
        if status in (Status.FAILED, Status.ESCALATED, Status.TIMED_OUT):
            kw["error"] = draw(st.text(min_size=1, max_size=20))
        if status is not Status.PENDING:
            created = draw(_utc_times())
            kw["created_at"] = created
            kw["updated_at"] = created + timedelta(seconds=draw(st.integers(0, 3600)))
            if draw(st.booleans()):
                kw["deadline"] = created + timedelta(seconds=draw(st.integers(1, 7200)))
            if status in _TERMINAL:
                kw["completed_at"] = kw["updated_at"]
            if status is Status.WAITING:
                kw["pending_rule_id"] = draw(rule_ids)
                kw["pending_task_id"] = (
                    f"{kw['id']}-{kw['pending_rule_id']}-{draw(st.integers(1, 99))}"
                )
                kw["pending_since"] = kw["updated_at"]
                kw["task_deadline"] = kw["updated_at"] + timedelta(
                    seconds=draw(st.integers(1, 600))
                )
            if timeline:
                kw["timeline"] = draw(
                    st.lists(
                        st.builds(
                            TimelineEntry,
                            timestamp=st.just(created),
                            rule_id=token,
                            trigger_mode=st.sampled_from(
                                ["kv", "message", "message+state", "callback", "timer"]
                            ),
                            action=st.sampled_from([a.value for a in ActionType]),
                            phase=_phase_strategy(phases),
                            iteration=st.integers(0, max(0, max_iteration)),
                        ),
                        max_size=2,
                    )
                )
        for name, strat in own.items():
            value = draw(strat)
            if value is not _OMIT:
                kw[name] = value
        for name, strat in fixed.items():
            kw[name] = draw(strat) if name != "status" else status
        return state_type(**kw)

    return draw_state()


# ---------------------------------------------------------------------------------------
# events
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event(abc.ABC):
    """Something that happens to a running engine; ``apply`` makes it happen and settles."""

    @abc.abstractmethod
    async def apply(self, te: TestEngine) -> None:
        """Make it happen on ``te`` and let the engine settle."""


@dataclass(frozen=True)
class Message(Event):
    """A message published on ``subject`` (as a producer would)."""

    subject: str
    payload: Any

    async def apply(self, te: TestEngine) -> None:
        await te.trigger_message(self.subject, self.payload)


@dataclass(frozen=True)
class BadMessage(Event):
    """Bytes that are not a valid message (or carry an invalid execution id)."""

    subject: str
    data: bytes

    async def apply(self, te: TestEngine) -> None:
        await te.trigger_message(self.subject, self.data)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Advance(Event):
    """The clock moves forward ``seconds`` (deadlines, task timeouts and cooldown ends fire)."""

    seconds: float

    async def apply(self, te: TestEngine) -> None:
        await te.advance(self.seconds)


@dataclass(frozen=True)
class Restart(Event):
    """The engine process stops and a new one (new instance id, nothing in memory) starts.

    It runs on the same backend and clock, so it must pick up every execution
    where the last committed state left it. Only ``WorkflowMachine`` can apply
    it (it replaces the machine's ``TestEngine``); ``apply`` refuses.
    """

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


@dataclass(frozen=True)
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
    * ``BadMessage`` (only with ``bad_input=True``): bytes that do not decode, or
      a message whose state key is not a valid execution id.
    """
    d = definition_of(workflow)
    ids = st.sampled_from(list(execution_ids))
    custom = dict(message_strategies or {})
    parts: list[SearchStrategy[Event]] = []
    if include_messages:
        for r in d.rules:
            if not r.subject:
                continue
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
    if not parts:
        raise ValueError(f"no events for workflow {d.id!r}: everything is excluded")
    return st.one_of(*parts)


def _keyed(
    r: RuleDef, payloads: SearchStrategy[Any], ids: SearchStrategy[str]
) -> SearchStrategy[Any]:
    state_key = r.state_key
    assert state_key is not None
    return st.tuples(payloads, ids).map(lambda pair: _steer(pair[0], state_key, pair[1]))


# ---------------------------------------------------------------------------------------
# the state machine
# ---------------------------------------------------------------------------------------


@dataclass
class _Terminal:
    revision: int
    value: bytes
    timeline: int
    fired: int


class WorkflowMachine(RuleBasedStateMachine):
    """Drives a ``TestEngine`` with ``events(...)`` and checks the engine's invariants.

    Subclass it and set ``workflows`` (and any option below), or use
    ``workflow_machine(...)``; run it with ``YourMachine.TestCase``. The engine
    runs in an anyio blocking portal (a thread with an event loop) for the
    whole example; every step applies one event (``events(...)`` of each
    workflow, plus ``Restart`` unless ``restarts = False``) and waits until the
    engine has settled. Class options: ``workflows``, ``execution_ids``,
    ``phases`` (workflow id -> phases for state writes), ``max_advance``,
    ``event_options`` (more ``events()`` arguments), ``engine_options`` (for
    ``TestEngine``), ``final_rounds``, ``restarts``, ``check_rules_at_rest``,
    ``engines`` (how many engine processes share the backend and the clock:
    with two or more, compare-and-set conflicts, firing claims and shared
    consumers are exercised; events go through the first, which is also the
    one ``Restart`` replaces).

    After every step (the engine at rest), for every execution of every
    workflow (every key ``<workflow_id>.*`` of its bucket), it checks:

    1. **The state decodes** into the workflow's state type.
    2. **Consistent fields.** Status is pending (only a state an outside writer
       put that no rule has taken up yet), running, waiting or terminal.
       Waiting <=> ``pending_task_id`` is set <=> ``pending_rule_id`` is set,
       and then the pending rule is an async rule of the workflow and
       ``task_deadline`` is set. Terminal => ``completed_at`` is set; not
       terminal => it is not. Once started, ``id`` and ``workflow_id`` match
       the key. ``iteration >= 0``.
    3. **Max iterations.** ``iteration <= max_iterations`` (when the workflow has one).
    4. **Time is enforced.** A live (not terminal) execution's ``deadline`` and,
       while waiting, its ``task_deadline`` are later than the clock.
    5. **Terminal states absorb.** Once seen terminal, the execution's KV
       entry keeps the same revision and bytes for the rest of the run.
    6. **Nothing fires after a terminal state.** No new timeline entry, and no
       new publish by a rule that does not write state (counted by the
       ``Nats-Msg-Id`` the engine gives such publishes,
       ``<workflow>:<rule>:<bucket>.<key>:<trigger>``).
    7. **Lifecycle events.** On the workflow's on_complete / on_fail /
       on_escalate subjects, exactly one event for a terminal execution whose
       status has a subject (completed: on_complete; escalated: on_escalate;
       failed and timed out: on_fail), none for a live one.
    8. **The request of a waiting execution went out**: exactly one publish on
       the pending rule's subject carries its pending task id (in the
       ``Reactive-Task-Id`` header), not counting those a stream dropped as
       duplicates.
    9. **Nothing left undone** (unless ``check_rules_at_rest = False``): no
       state-writing KV rule of the workflow that matches a live execution's
       key has conditions that hold on its current state, unless the rule is
       held back by its ``max_firings``, by a cooldown still running, or (an
       async rule) by the execution waiting. Turn it off for conditions that
       read ``ctx.now`` or anything outside the state: the engine evaluates
       rules on changes, not on the passing of time.
    10. **Executions do not vanish** once seen.
    11. ``check_execution(definition, key, state)``, a hook for your own checks.

    At teardown (only when the run did not already fail), the clock is moved
    past every deadline, task deadline and cooldown end recorded in the live
    executions' states, in up to ``final_rounds`` rounds (a round can start new
    tasks), and all of the above is checked again. With 4 and 9 that means:
    every execution is terminal, or waiting on a task started in the last
    round, or running with no deadline (none, or in the future only if the
    rounds ran out) and with no rule left that should fire.

    A run in which the engine does not settle (rules that keep triggering each
    other, say) fails with an AssertionError naming the event.
    """

    workflows: ClassVar[tuple[type[Workflow] | Workflow, ...]] = ()
    execution_ids: ClassVar[Sequence[str]] = DEFAULT_EXECUTION_IDS
    phases: ClassVar[Mapping[str, Sequence[str]] | None] = None  # workflow id -> phases for writes
    max_advance: ClassVar[float | None] = None
    event_options: ClassVar[Mapping[str, Any]] = {}  # more keyword arguments for events()
    engine_options: ClassVar[Mapping[str, Any]] = {}  # keyword arguments for TestEngine
    final_rounds: ClassVar[int] = 6
    restarts: ClassVar[bool] = True  # draw Restart events
    check_rules_at_rest: ClassVar[bool] = True  # invariant 9; off for conditions that read ctx.now
    engines: ClassVar[int] = 1  # engine processes sharing the backend and the clock

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "workflows" in cls.__dict__ and cls.workflows:
            strategy = cls.event_strategy()

            def step(self: WorkflowMachine, event: Event) -> None:
                self.apply(event)

            step.__qualname__ = f"{cls.__qualname__}.step"
            cls.step = _machine_rule(event=strategy)(step)  # type: ignore[attr-defined]

    @classmethod
    def event_strategy(cls) -> SearchStrategy[Event]:
        """The events the machine draws: ``events(...)`` of every workflow, as one strategy."""
        parts = []
        for wf in cls.workflows:
            d = definition_of(wf)
            parts.append(
                events(
                    wf,
                    execution_ids=cls.execution_ids,
                    phases=(cls.phases or {}).get(d.id),
                    max_advance=cls.max_advance,
                    include_restarts=cls.restarts,
                    **cls.event_options,
                )
            )
        return st.one_of(*parts)

    def __init__(self) -> None:
        super().__init__()
        self.definitions: list[WorkflowDef] = [definition_of(w) for w in self.workflows]
        self._terminal: dict[tuple[str, str], _Terminal] = {}
        self._seen: set[tuple[str, str]] = set()
        self._portal_cm = anyio.from_thread.start_blocking_portal("asyncio")
        self.portal = self._portal_cm.__enter__()
        try:
            te = self.portal.call(self._make_engine)
            self._te_cm = self.portal.wrap_async_context_manager(te)
            self.te: TestEngine = self._te_cm.__enter__()
            self._others: list[tuple[Any, TestEngine]] = []
            for _ in range(self.engines - 1):
                other = self.portal.call(self._make_engine, self.te)
                cm = self.portal.wrap_async_context_manager(other)
                self._others.append((cm, cm.__enter__()))
        except BaseException:
            self._close()
            raise

    def _make_engine(self, previous: TestEngine | None = None) -> TestEngine:
        if previous is None:
            return TestEngine(*self.workflows, **dict(self.engine_options))
        return TestEngine(
            *self.workflows,
            clock=previous.clock,
            backend=previous.backend,
            **dict(self.engine_options),
        )

    def restart(self) -> None:
        """Stop the engine and start a new one (new instance id, empty memory) on the same backend and clock."""
        old = self.te
        self._te_cm.__exit__(None, None, None)
        te = self.portal.call(self._make_engine, old)
        self._te_cm = self.portal.wrap_async_context_manager(te)
        self.te = self._te_cm.__enter__()

    # ------------------------------------------------------------------ running

    def apply(self, event: Event) -> None:
        """Apply one event in the engine's event loop and wait until it settles."""
        try:
            if isinstance(event, Restart):
                self.restart()
            else:
                self.run(event.apply, self.te)
            if self._others:
                self.run(self.settle)
        except TimeoutError:
            raise AssertionError(
                f"the engine did not settle within {self.te.settle_timeout}s after {event!r} "
                "(rules that keep triggering each other?)"
            ) from None

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run an async function in the engine's event loop."""
        return self.portal.call(fn, *args)

    async def settle(self) -> None:
        """Wait until every engine process and the backend are at rest."""
        engines = [self.te, *(te for _, te in self._others)]
        with anyio.fail_after(self.te.settle_timeout):
            quiet = 0
            while quiet < 8:
                await anyio.sleep(0)
                if self.te.backend.idle() and all(
                    t.engine.idle and t.engine.ready for t in engines
                ):
                    quiet += 1
                else:
                    quiet = 0

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:  # not when the run already failed
                try:
                    outcomes = self.portal.call(self._finish)
                except TimeoutError:
                    raise AssertionError(
                        f"the engine did not settle within {self.te.settle_timeout}s while the clock "
                        "was moved past every deadline (rules that keep triggering each other?)"
                    ) from None
                for outcome in sorted(set(outcomes)):
                    hypothesis.event(outcome)  # shown by pytest --hypothesis-show-statistics
        finally:
            self._close()

    def _close(self) -> None:
        try:
            for cm, _ in reversed(getattr(self, "_others", [])):
                cm.__exit__(None, None, None)
            if hasattr(self, "_te_cm"):
                self._te_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    # ------------------------------------------------------------------ checks

    @invariant()
    def engine_invariants(self) -> None:
        self.portal.call(self._check_all)

    def check_execution(self, definition: WorkflowDef, key: str, state: ExecutionState) -> None:
        """Your own per-execution checks, run after every step and at teardown. Raise AssertionError."""

    async def _finish(self) -> list[str]:
        te = self.te
        for _ in range(self.final_rounds):
            now = te.clock.now()
            due = [
                t
                for d in self.definitions
                for _key, _rev, _raw, state in self._entries(d)
                if state.status not in _TERMINAL
                for t in _time_points(d, state)
                if t >= now
            ] + [
                end
                for d in self.definitions
                for r in d.rules
                if (end := self._shared_cooldown_end(d, r)) is not None and end >= now
            ]
            if not due:
                break
            await te.advance(max(due) - now + 1.0)
            await self.settle()
        self._check_all()
        return [
            f"{d.id}: an execution ends {state.status.value}"
            for d in self.definitions
            for _key, _rev, _raw, state in self._entries(d)
        ]

    def _entries(self, d: WorkflowDef) -> Iterable[tuple[str, int, bytes, Any]]:
        backend = self.te.backend
        for key in backend.peek_keys(d.bucket, f"{d.id}.*"):
            entry = backend.peek(d.bucket, key)
            if entry is None:
                continue
            try:
                state = decode(d.state_type, entry.value)
            except Exception as e:
                raise AssertionError(f"{d.id}: the state at {key} does not decode: {e}") from e
            yield key, entry.revision, entry.value, state

    def _check_all(self) -> None:
        te = self.te
        now = te.clock.now()
        published = [m for m in te.backend.published if not m.duplicate]
        for d in self.definitions:
            present = set()
            lifecycle = _lifecycle_counts(d, published)
            requests = _request_counts(published)
            fired = _nonwriting_counts(d, published)
            for key, revision, raw, state in self._entries(d):
                exec_id = d.execution_id_for(key)
                present.add(key)
                self._seen.add((d.id, key))
                where = f"{d.id}/{exec_id} (status {state.status.value}, phase {state.phase!r})"
                _check_fields(d, exec_id, state, where)
                terminal = state.status in _TERMINAL
                if not terminal:
                    if state.deadline is not None:
                        assert state.deadline.timestamp() > now, (
                            f"{where}: deadline {state.deadline.isoformat()} has passed "
                            f"(clock {_iso(now)}) but the execution is not timed out"
                        )
                    if state.status is Status.WAITING and state.task_deadline is not None:
                        assert state.task_deadline.timestamp() > now, (
                            f"{where}: task {state.pending_task_id} timed out at "
                            f"{state.task_deadline.isoformat()} (clock {_iso(now)}) but is still awaited"
                        )
                # Terminal states absorb; nothing fires after them.
                seen = self._terminal.get((d.id, key))
                n_fired = fired.get(key, 0)
                if seen is not None:
                    assert len(state.timeline) == seen.timeline, (
                        f"{where}: {len(state.timeline) - seen.timeline} timeline entries after it became "
                        f"terminal: {state.timeline[seen.timeline :]!r}"
                    )
                    assert (revision, raw) == (seen.revision, seen.value), (
                        f"{where}: terminal state changed (revision {seen.revision} -> {revision}):\n"
                        f"  was {seen.value!r}\n  now {raw!r}"
                    )
                    assert n_fired == seen.fired, (
                        f"{where}: {n_fired - seen.fired} publish(es) by rules that do not write state "
                        "after it became terminal"
                    )
                elif terminal:
                    self._terminal[(d.id, key)] = _Terminal(
                        revision, raw, len(state.timeline), n_fired
                    )
                if state.status is Status.WAITING:
                    r = d.rules_by_id[state.pending_rule_id]
                    n = requests.get((r.publish_subject, state.pending_task_id), 0)
                    assert n == 1, (
                        f"{where}: {n} request(s) for its pending task {state.pending_task_id} "
                        f"on {r.publish_subject!r}, expected 1"
                    )
                # Lifecycle events.
                expected = 1 if terminal and _event_subject(d, state.status) else 0
                got = lifecycle.get(state.id or exec_id, 0)
                assert got == expected, (
                    f"{where}: {got} lifecycle event(s) on {sorted(_lifecycle_subjects(d))}, expected {expected}"
                )
                if self.check_rules_at_rest:
                    self._check_nothing_left(d, key, revision, state, now, where)
                self.check_execution(d, key, state)
            lost = {k for (w, k) in self._seen if w == d.id} - present
            assert not lost, f"{d.id}: executions vanished: {sorted(lost)}"

    def _check_nothing_left(
        self, d: WorkflowDef, key: str, revision: int, state: ExecutionState, now: float, where: str
    ) -> None:
        """No state-writing KV rule holds on a live execution at rest unless its limits hold it back."""
        if state.status in _TERMINAL:
            return
        for r in d.rules:
            if r.mode is not TriggerMode.STATE or not r.writes_state or r.on_deletes:
                continue
            if r.action is ActionType.PUBLISH_ASYNC and state.status is Status.WAITING:
                continue
            if r.bucket != d.bucket or not matches_pattern(key, r.pattern):
                continue
            probe = decode(d.state_type, encode_json(state))
            if probe.status is Status.PENDING:
                probe.status = Status.RUNNING  # as the engine sees a state put by an outside writer
            ctx: RuleContext[Any, Any] = RuleContext(
                state=probe,
                message=None,
                workflow_id=d.id,
                execution_id=state.id or d.execution_id_for(key),
                key=key,
                bucket=d.bucket,
                revision=revision,
                trigger_mode="kv",
                now=now,
                rule_id=r.id,
            )
            try:
                passes = bool(r.condition(ctx))
            except Exception:
                passes = False
            if not passes:
                continue
            firing = state.firings.get(r.id)
            held = firing is not None and (
                (r.max_firings and firing.count >= r.max_firings)
                or (
                    r.cooldown
                    and not r.shared_cooldown
                    and now < firing.last_at + r.cooldown  # as the engine holds
                )
            )
            if not held and r.shared_cooldown:
                end = self._shared_cooldown_end(d, r)
                held = end is not None and now < end

            assert held, (
                f"{where}: at rest, but rule {r.id!r} ({r.condition_description}) holds on "
                f"revision {revision} and did not fire (firings: {firing!r})"
            )

    def _shared_cooldown_end(self, d: WorkflowDef, r: RuleDef) -> float | None:
        """When the workflow-wide cooldown of ``r`` last claimed ends (None: none claimed)."""
        if not r.shared_cooldown:
            return None
        entry = self.te.backend.peek(self.te.engine.meta_bucket, f"cool.{d.id}.{r.id}")
        if entry is None:
            return None
        claim = msgspec.json.decode(entry.value)
        return float(claim.get("at", 0.0)) + r.cooldown


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def _time_points(d: WorkflowDef, state: ExecutionState) -> list[float]:
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


def _check_fields(d: WorkflowDef, exec_id: str, state: ExecutionState, where: str) -> None:
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


def _event_subject(d: WorkflowDef, status: Status) -> str:
    if status is Status.COMPLETED:
        return d.on_complete
    if status is Status.ESCALATED:
        return d.on_escalate
    if status in (Status.FAILED, Status.TIMED_OUT):
        return d.on_fail
    return ""


def _lifecycle_subjects(d: WorkflowDef) -> set[str]:
    return {s for s in (d.on_complete, d.on_fail, d.on_escalate) if s}


def _lifecycle_counts(d: WorkflowDef, published: Sequence[Any]) -> dict[str, int]:
    """Lifecycle events of ``d`` per execution id (events name both the execution and the workflow)."""
    subjects = _lifecycle_subjects(d)
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


def _request_counts(published: Sequence[Any]) -> dict[tuple[str, str], int]:
    """Async requests per (subject, task id)."""
    counts: dict[tuple[str, str], int] = {}
    for m in published:
        task_id = m.headers.get("Reactive-Task-Id") if m.headers else None
        if task_id:
            k = (m.subject, task_id)
            counts[k] = counts.get(k, 0) + 1
    return counts


def _nonwriting_counts(d: WorkflowDef, published: Sequence[Any]) -> dict[str, int]:
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


def workflow_machine(
    *workflows: type[Workflow] | Workflow,
    execution_ids: Sequence[str] = DEFAULT_EXECUTION_IDS,
    phases: Mapping[str, Sequence[str]] | None = None,
    max_advance: float | None = None,
    engine_options: Mapping[str, Any] | None = None,
    final_rounds: int = 6,
    engines: int = 1,
    restarts: bool = True,
    check_rules_at_rest: bool = True,
    settings: hypothesis.settings | None = None,
    check_execution: Callable[[WorkflowMachine, WorkflowDef, str, ExecutionState], None]
    | None = None,
    name: str | None = None,
    **event_options: Any,
) -> type[WorkflowMachine]:
    """A ``WorkflowMachine`` subclass for ``workflows``: ``workflow_machine(MyWorkflow).TestCase`` is a test.

    ``execution_ids``, ``phases`` (workflow id -> phases for state writes),
    ``max_advance`` and ``**event_options`` (``include_writes=False``,
    ``bad_input=True``, ``message_strategies=...``: see ``events``) shape the
    events; ``engine_options`` go to ``TestEngine``; ``engines``, ``restarts``,
    ``check_rules_at_rest`` and ``final_rounds`` are the ``WorkflowMachine``
    options of those names; ``check_execution`` adds your own per-execution
    check; ``settings`` become ``TestCase.settings``.
    """
    if engines < 1:
        raise ValueError("engines must be at least 1")
    if not workflows:
        raise ValueError("workflow_machine needs at least one workflow")
    namespace: dict[str, Any] = {
        "workflows": tuple(workflows),
        "execution_ids": tuple(execution_ids),
        "phases": dict(phases) if phases else None,
        "max_advance": max_advance,
        "engine_options": dict(engine_options or {}),
        "event_options": dict(event_options),
        "final_rounds": final_rounds,
        "engines": engines,
        "restarts": restarts,
        "check_rules_at_rest": check_rules_at_rest,
        "__module__": sys._getframe(1).f_globals.get("__name__", __name__),
    }
    if check_execution is not None:
        namespace["check_execution"] = check_execution
    cls_name = (
        name
        or "".join(type(w).__name__ if not isinstance(w, type) else w.__name__ for w in workflows)
        + "Machine"
    )
    machine = cast(type[WorkflowMachine], type(cls_name, (WorkflowMachine,), namespace))
    if settings is not None:
        machine.TestCase.settings = settings
    return machine
