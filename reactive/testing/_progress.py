"""The events a ``WorkflowMachine`` draws by default: cheap, and biased toward progress.

Everything that can be is computed once per workflow (``Pools``): message
payloads and task results from ``samples`` (a few representative values, the
constants the code compares fields with first), each result tried on the
rule's result handler so that only results the handler accepts are sent, and
grouped by what they do to the execution (the phase and status the handler
leaves). A step then costs one choice: a number that seeds the few picks the
event is made of (which kind of event, of which workflow, then its details),
each a uniform index into a list of options.

The bias, step by step:

* a callback answers a task an execution waits for (nine times in ten, when
  one waits), with a result chosen by outcome: outcomes that lead on toward
  completion (by the rules' phase graph) three times as often as the others;
  now and then a worker's error, a stale task id, or an edge case of the
  result type (``samples(..., edge=True)``: empty, long, non-ASCII text, the
  ends of the number ranges...);
* a message goes to an execution of ``execution_ids`` (to one that exists
  more often than not); one in ten is an edge case of its type;
* the clock moves mostly by a second, sometimes just past a task timeout, the
  workflow's timeout or a cooldown;
* outside writes (mostly a sample of the state in a phase the rules test) and
  engine restarts are rarer than the rest.

With ``message_strategies`` or ``result_strategies`` (Hypothesis strategies of
your own), the picks are drawn one by one instead, and the values from them.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from hypothesis import strategies as st

from reactive.compiled import ActionType, RuleDef, WorkflowDef
from reactive.dsl.context import RuleContext
from reactive.dsl.state import ExecutionState, Status
from reactive.lint._model import Model, model_of
from reactive.testing._events import (
    Advance,
    BadMessage,
    Callback,
    Event,
    Message,
    Restart,
    WriteState,
    _steer,
    phases_of,
)
from reactive.testing._samples import hints_of, samples
from reactive.testing._values import SearchStrategy

__all__ = ["Chooser", "Drawing", "Kinds", "Pools", "Seeded", "draw_event", "pools_for"]

_BASE_FIELDS = frozenset(ExecutionState.__struct_fields__)
_EDGE: Any = object()  # "take an edge case of the type instead"
_ERROR, _STALE = object(), object()
_BAD_IDS = ("bad.id", "*", "with space", ">")
_GARBAGE = (b"", b"{", b"not json", b"[1, 2]", b"null")


@dataclass
class ResultPool:
    """The results of one async rule: ``picks`` (outcome indices, each as often as its
    weight, then a worker's error, a stale id and arbitrary values) and each outcome's results."""

    rule: RuleDef
    outcomes: list[list[Any]]
    picks: list[Any]
    edge: list[Any]
    widest: int  # the most results of one outcome


@dataclass
class Pools:
    """What the events of one workflow are drawn from."""

    definition: WorkflowDef
    model: Model
    messages: list[tuple[RuleDef, str, Any]]  # (rule, subject, payload or _EDGE)
    edge_messages: dict[str, list[Any]]  # rule id -> edge cases of its message type
    results: dict[str, ResultPool]
    advances: list[float]
    phases: list[str]
    states: list[Any]
    edge_states: list[Any]
    iterations: list[int]
    starts: dict[str, bool]  # message rule id -> it can start an execution


@functools.lru_cache(maxsize=256)
def pools_for(
    d: WorkflowDef,
    execution_ids: tuple[str, ...],
    phases: tuple[str, ...] | None,
    max_advance: float | None,
) -> Pools:
    """The pools of ``d`` (computed once per workflow and options)."""
    model = model_of(d)
    hints = hints_of(d)
    messages: list[tuple[RuleDef, str, Any]] = []
    for r in d.rules:
        if not r.subject:
            continue
        payloads = samples(r.message_type, hints) if r.message_type is not None else [None]
        payloads += [_EDGE] * max(1, len(payloads) // 9)  # about one in ten
        for subject in _concrete_subjects(r.subject):
            messages += [(r, subject, p) for p in payloads]
    results = {
        r.id: _result_pool(d, model, r, samples(r.result_type, hints))
        for r in d.rules
        if r.action is ActionType.PUBLISH_ASYNC
    }
    pool = list(phases) if phases is not None else [*phases_of(d), ""]
    own = [f for f in d.state_type.__struct_fields__ if f not in _BASE_FIELDS]
    top = d.max_iterations or 5
    return Pools(
        definition=d,
        model=model,
        messages=messages,
        edge_messages={
            r.id: samples(r.message_type, edge=True) or [None] for r in d.rules if r.subject
        },
        results=results,
        advances=_advances(d, max_advance),
        phases=pool,
        states=samples(d.state_type, hints, only=own) or [d.state_type()],
        edge_states=samples(d.state_type, only=own, edge=True) or [d.state_type()],
        iterations=[0] * (top + 1) + list(range(1, top + 1)),  # half of the writes at 0
        starts={m.rule.id: m.runs_in(model.initial) for m in model.rules if m.rule.subject},
    )


def _concrete_subjects(subject: str) -> list[str]:
    options = [
        ["a", "b"] if tok == "*" else ["x", "x.y"] if tok == ">" else [tok]
        for tok in subject.split(".")
    ]
    return [".".join(parts) for parts in itertools.product(*options)]


def _advances(d: WorkflowDef, max_advance: float | None) -> list[float]:
    marks = {d.task_timeout + 1}
    if d.timeout:
        marks.add(d.timeout + 1)
    for r in d.rules:
        if r.cooldown:
            marks |= {r.cooldown / 2, r.cooldown + 0.5}
    if max_advance is not None:
        marks = {m for m in marks if m <= max_advance}
    small = [min(1.0, max_advance)] if max_advance is not None else [1.0]
    return small * 6 + sorted(marks)  # mostly a second; now and then past a timeout


def _probe_state(d: WorkflowDef, model: Model, r: RuleDef) -> ExecutionState:
    """A state in which ``r`` fires: in its first phase (or the first the rules reach)."""
    state = d.state_type()
    m = next(m for m in model.rules if m.rule is r)
    where = sorted(m.enters) if m.enters is not None else sorted(model.reachable())
    state.phase = where[0] if where else state.phase
    state.id = "probe"
    state.workflow_id = d.id
    state.status = Status.RUNNING
    return state


def _result_pool(d: WorkflowDef, model: Model, r: RuleDef, candidates: list[Any]) -> ResultPool:
    """Results of ``r`` grouped by what its handler makes of a state in the rule's phase."""
    handler = getattr(d.cls(), r.result_handler_name or "", None)
    base = _probe_state(d, model, r)
    raw = msgspec.json.encode(base)
    by_outcome: dict[tuple[str, Status], list[Any]] = {}
    for value in candidates:
        state = msgspec.json.decode(raw, type=d.state_type)
        ctx: RuleContext[Any, Any] = RuleContext(
            state=state,
            message=None,
            workflow_id=d.id,
            execution_id="probe",
            key=d.key("probe"),
            bucket=d.bucket,
            revision=1,
            trigger_mode="callback",
            now=1_767_225_600.0,
            rule_id=r.id,
        )
        try:
            if handler is not None:
                handler(ctx, msgspec.convert(msgspec.to_builtins(value), r.result_type))
        except Exception:
            continue  # the handler does not accept it: an execution would fail on it
        by_outcome.setdefault((state.phase, state.status), []).append(value)
    if not by_outcome:  # nothing accepted on this probe: send the candidates as they are
        by_outcome[("", Status.RUNNING)] = candidates

    def weight(outcome: tuple[str, Status]) -> int:
        phase, status = outcome
        if status is Status.COMPLETED:
            return 4
        if status.is_terminal or phase == base.phase:
            return 1  # ends it otherwise, or asks again
        return 3 if model.leads_to(phase, [Status.COMPLETED]) else 1

    ranked = sorted(by_outcome.items(), key=lambda kv: -weight(kv[0]))
    # Out of about twenty: the outcomes by weight, then one error, one stale id, two edge cases.
    scale = max(1, round(16 / sum(weight(o) for o, _ in ranked)))
    picks: list[Any] = [i for i, (o, _) in enumerate(ranked) for _ in range(weight(o) * scale)]
    picks += [_ERROR, _STALE, _EDGE, _EDGE]
    outcomes = [vs for _, vs in ranked if vs] or [[None]]
    edge = samples(r.result_type, edge=True) or outcomes[0]
    return ResultPool(r, outcomes, picks, edge, max(len(vs) for vs in outcomes))


# --------------------------------------------------------------------------- drawing


class Chooser(Protocol):
    """Where an event's picks come from."""

    def index(self, *sizes: int) -> list[int]:
        """One index per size (each below it)."""
        ...

    def value(self, strategy: SearchStrategy[Any]) -> Any:
        """A value of a Hypothesis strategy (only with strategies of the user's)."""
        ...


_MASK = (1 << 64) - 1


class Seeded:
    """Picks from a seed (one choice of Hypothesis's per event: the seed), by splitmix64."""

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK

    def _next(self) -> int:
        self._state = z = (self._state + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def index(self, *sizes: int) -> list[int]:
        return [self._next() % n if n > 1 else 0 for n in sizes]

    def value(self, strategy: SearchStrategy[Any]) -> Any:
        raise RuntimeError("a seeded event cannot draw from a strategy")


_INDEX: dict[int, SearchStrategy[int]] = {}


class Drawing:
    """Picks drawn one by one (each a choice of Hypothesis's), and values from strategies."""

    def __init__(self, draw: Callable[[SearchStrategy[Any]], Any]) -> None:
        self._draw = draw

    def index(self, *sizes: int) -> list[int]:
        total = 1
        for n in sizes:
            total *= max(1, n)
        if total == 1:
            return [0] * len(sizes)
        strategy = _INDEX.get(total)
        if strategy is None:
            strategy = _INDEX[total] = st.sampled_from(range(total))
        i = self._draw(strategy)
        out = []
        for n in sizes:
            i, digit = divmod(i, max(1, n))
            out.append(digit)
        return out

    def value(self, strategy: SearchStrategy[Any]) -> Any:
        return self._draw(strategy)


@dataclass
class Kinds:
    """Which kinds of events the machine draws (its options)."""

    writes: bool = True
    restarts: bool = True
    bad_input: bool = False
    message_strategies: Mapping[str, SearchStrategy[Any]] = field(default_factory=dict)
    result_strategies: Mapping[str, SearchStrategy[Any]] = field(default_factory=dict)


def draw_event(
    c: Chooser,
    pools: Sequence[Pools],
    live: Mapping[str, Mapping[str, Any]],
    execution_ids: Sequence[str],
    kinds: Kinds,
) -> Event:
    """One event for the machine, given the executions there are now (``live``: workflow -> id -> state)."""
    menu: list[tuple[Pools, str, int]] = []
    for p in pools:
        mine = live.get(p.definition.id, {})
        waiting = any(s.status is Status.WAITING for s in mine.values())
        moving = any(not s.status.is_terminal for s in mine.values())
        unused = any(i not in mine for i in execution_ids)
        # Out of about a hundred: the kinds that move executions on, while they can.
        if p.messages:
            menu.append((p, "message", 25 if unused else 5))
        if p.results:
            menu.append((p, "callback", 50 if waiting else 3))
        menu.append((p, "advance", 10))
        if kinds.writes:
            menu.append((p, "write", 6))
        if kinds.restarts and moving:  # (a restart costs a dozen other events: when it matters)
            menu.append((p, "restart", 2))
        if kinds.bad_input and p.messages:
            menu.append((p, "bad", 3))
    (i,) = c.index(sum(w for _, _, w in menu))
    p, kind = _weighted(menu, i)
    mine = live.get(p.definition.id, {})
    if kind == "message":
        return _message(c, p, mine, execution_ids, kinds)
    if kind == "callback":
        return _callback(c, p, mine, execution_ids, kinds)
    if kind == "advance":
        (j,) = c.index(len(p.advances))
        return Advance(p.advances[j])
    if kind == "write":
        return _write(c, p, execution_ids)
    if kind == "restart":
        return Restart()
    return _bad(c, p)


def _weighted(menu: list[tuple[Pools, str, int]], i: int) -> tuple[Pools, str]:
    """The entry of ``menu`` that index ``i`` falls on, each entry ``w`` indices wide."""
    for p, kind, w in menu:
        if i < w:
            return p, kind
        i -= w
    raise IndexError(i)


def _targets(p: Pools, r: RuleDef, mine: Mapping[str, Any], ids: Sequence[str]) -> list[str]:
    """Execution ids to send a message of ``r`` to: any id, and more often those where it can
    do something: ids with no execution yet for a rule that starts executions, else existing ones."""
    starts = p.starts.get(r.id, False)
    favoured = [i for i in ids if (i not in mine) == starts]
    return [*ids, *favoured, *favoured, *favoured]


def _message(
    c: Chooser, p: Pools, mine: Mapping[str, Any], ids: Sequence[str], kinds: Kinds
) -> Event:
    m, t, e = c.index(len(p.messages), 4 * len(ids), 64)
    r, subject, payload = p.messages[m]
    targets = _targets(p, r, mine, ids)
    custom = kinds.message_strategies.get(r.subject)
    if custom is not None:
        return Message(subject, c.value(custom))
    if payload is _EDGE:
        edge = p.edge_messages[r.id]
        payload = edge[e % len(edge)]
    if r.state_key is not None:
        payload = _steer(payload, r.state_key, targets[t % len(targets)])
    return Message(subject, payload)


def _callback(
    c: Chooser, p: Pools, mine: Mapping[str, Any], ids: Sequence[str], kinds: Kinds
) -> Event:
    d = p.definition
    waiting = [i for i, s in mine.items() if s.status is Status.WAITING]
    targets = waiting * 9 + list(ids) if waiting else list(ids)
    (t,) = c.index(len(targets))
    target = targets[t]
    state = mine.get(target)
    rule_id = state.pending_rule_id if state is not None else ""
    pool = p.results.get(rule_id) or next(iter(p.results.values()))
    a, b = c.index(len(pool.picks), max(pool.widest, len(pool.edge)))
    pick = pool.picks[a]
    custom = kinds.result_strategies.get(pool.rule.id)
    if custom is not None:
        result = c.value(custom)
    else:
        options = (
            pool.edge
            if pick is _EDGE
            else pool.outcomes[pick]
            if isinstance(pick, int)
            else pool.outcomes[0]
        )
        result = options[b % len(options)]
    return Callback(
        d.id,
        target,
        results=((pool.rule.id, result),),
        error="worker failed" if pick is _ERROR else None,
        stale=pick is _STALE,
    )


def _write(c: Chooser, p: Pools, ids: Sequence[str]) -> Event:
    d = p.definition
    t, s, ph, it = c.index(len(ids) * 10, len(p.states), len(p.phases), len(p.iterations))
    target = ids[t % len(ids)]
    # One in ten: an edge case of the state.
    states = p.edge_states if t >= len(ids) * 9 else p.states
    state = msgspec.structs.replace(
        states[s % len(states)],
        id=target,
        workflow_id=d.id,
        phase=p.phases[ph],
        iteration=p.iterations[it],
        status=Status.PENDING,
    )
    return WriteState(d.id, target, state)


def _bad(c: Chooser, p: Pools) -> Event:
    m, how, which = c.index(len(p.messages), 2, len(_BAD_IDS) * len(_GARBAGE))
    r, subject, payload = p.messages[m]
    if how and r.state_key is not None and payload is not _EDGE:
        steered = _steer(payload, r.state_key, _BAD_IDS[which % len(_BAD_IDS)])
        return BadMessage(subject, msgspec.json.encode(steered))
    return BadMessage(subject, _GARBAGE[which % len(_GARBAGE)])
