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
  engine restarts are rarer than the rest;
* for rules that watch keys other than the workflow's executions (an entity
  bucket: ``watch_kv="unit.*"``), an outside writer puts a sample of the state
  at such a key (the wildcard filled with a pool id).

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

from reactive.compiled import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.context import RuleContext
from reactive.dsl.state import ExecutionState, Status
from reactive.phases import Model, model_of
from reactive.subjects import matches_pattern
from reactive.testing._events import (
    Advance,
    BadMessage,
    Callback,
    Event,
    Message,
    Restart,
    WriteKey,
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
    # message rule id -> pool id -> the execution id its messages steered to that id name
    # (the same, unless state_key computes the id from more than the field it is steered by)
    aliases: dict[str, dict[str, str]]
    entity_keys: list[tuple[str, str]]  # (bucket, key) watched by a rule, not an execution's
    own_keys: bool  # some rule watches the workflow's own execution keys


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
    aliases: dict[str, dict[str, str]] = {}
    for r in d.rules:
        if not r.subject:
            continue
        payloads = samples(r.message_type, hints) if r.message_type is not None else [None]
        if r.state_key is not None:
            payloads, aliases[r.id] = _keyed(r, payloads, execution_ids)
        payloads += [_EDGE] * max(1, len(payloads) // 9)  # about one in ten
        for subject in _concrete_subjects(r.subject):
            messages += [(r, subject, p) for p in payloads]
    results = {
        r.id: _result_pool(d, model, r, samples(r.result_type, hints))
        for r in d.rules
        if r.action is ActionType.PUBLISH_ASYNC
    }
    # The phases the rules test, and those their code sets (a phase no rule takes up, too).
    pool = (
        list(phases)
        if phases is not None
        else [*phases_of(d), *sorted(model.named - set(phases_of(d)))]
    )
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
        aliases=aliases,
        entity_keys=_entity_keys(d, execution_ids),
        own_keys=any(
            r.mode is TriggerMode.STATE
            and r.bucket == d.bucket
            and matches_pattern(d.key(execution_ids[0] if execution_ids else "e1"), r.pattern)
            for r in d.rules
        )
        or any(r.mode is not TriggerMode.STATE for r in d.rules),
    )


def _entity_keys(d: WorkflowDef, ids: tuple[str, ...]) -> list[tuple[str, str]]:
    """Keys (one per pool id) of the patterns KV rules watch that are not the executions'."""
    out: list[tuple[str, str]] = []
    for r in d.rules:
        if r.mode is not TriggerMode.STATE:
            continue
        for i in ids:
            key = ".".join(i if tok in ("*", ">") else tok for tok in r.pattern.split("."))
            if (r.bucket == d.bucket and key == d.key(i)) or (r.bucket, key) in out:
                continue
            out.append((r.bucket, key))
    return out


def _keyed(
    r: RuleDef, payloads: list[Any], ids: tuple[str, ...]
) -> tuple[list[Any], dict[str, str]]:
    """The payloads that, steered to a pool id, name the same execution as the first does
    (so that messages keep to a few executions when ``state_key`` reads more than one field),
    and the execution id each pool id then stands for."""
    state_key = r.state_key
    assert state_key is not None

    def key(payload: Any, exec_id: str) -> str | None:
        try:
            return str(state_key(_steer(payload, state_key, exec_id)))
        except Exception:
            return None

    base = payloads[0] if payloads else None
    probe = ids[0] if ids else "e1"
    kept = [p for p in payloads if key(p, probe) == key(base, probe)] or payloads
    return kept, {i: key(base, i) or i for i in ids}


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
    """One event for the machine, given the executions there are now (``live``: workflow -> id -> state).

    The kind of event comes from a menu that does not depend on the executions (so that
    dropping one step leaves the others' kinds alone, and a failing example shrinks step by
    step); a kind that would be wasted now stands in for one that is not: a callback with
    nothing waiting for one is a message (or, when every execution of the pool has started,
    an advance), a message to executions that have all ended or a restart with nothing
    running is an advance.
    """
    menu: list[tuple[Pools, str, int]] = []
    for p in pools:
        # Out of about a hundred: the kinds that move executions on first.
        if p.messages:
            menu.append((p, "message", 25))
        if p.results:
            menu.append((p, "callback", 50))
        menu.append((p, "advance", 10))
        if kinds.writes and p.own_keys:
            menu.append((p, "write", 6))
        if p.entity_keys:  # (what drives such rules: on even without writes of executions)
            menu.append((p, "entity", 25))
        if kinds.restarts:  # (a restart costs a dozen other events)
            menu.append((p, "restart", 2))
        if kinds.bad_input and p.messages:
            menu.append((p, "bad", 3))
    (i,) = c.index(sum(w for _, _, w in menu))
    p, kind = _weighted(menu, i)
    mine = live.get(p.definition.id, {})
    moving = any(not s.is_terminal for s in mine.values())
    starting = any(
        alias.get(i, i) not in mine
        for r_id, alias in p.aliases.items()
        if p.starts.get(r_id)
        for i in execution_ids
    )
    if kind == "callback" and not any(s.is_waiting for s in mine.values()):
        kind = "message" if p.messages and (starting or not p.aliases) else "advance"
    elif kind == "restart" and not moving:
        kind = "advance"
    elif kind == "message" and p.aliases and not starting and not moving:
        kind = "advance"  # every execution of the pool has ended: a message would be a repeat
    if kind == "message":
        return _message(c, p, mine, execution_ids, kinds)
    if kind == "callback":
        return _callback(c, p, mine, execution_ids, kinds)
    if kind == "advance":
        (j,) = c.index(len(p.advances))
        return Advance(p.advances[j])
    if kind == "write":
        return _write(c, p, mine, execution_ids)
    if kind == "restart":
        # Mostly at once; now and then after an outage (deadlines pass while no engine runs).
        (j,) = c.index(len(p.advances) * 2)
        return Restart(p.advances[j] if j < len(p.advances) and p.advances[j] > 1.0 else 0.0)
    if kind == "entity":
        k, s, e = c.index(len(p.entity_keys), len(p.states), 10)
        states = p.edge_states if e == 0 else p.states  # one in ten: an edge case
        bucket, key = p.entity_keys[k]
        return WriteKey(bucket, key, states[s % len(states)])
    return _bad(c, p)


def _weighted(menu: list[tuple[Pools, str, int]], i: int) -> tuple[Pools, str]:
    """The entry of ``menu`` that index ``i`` falls on, each entry ``w`` indices wide."""
    for p, kind, w in menu:
        if i < w:
            return p, kind
        i -= w
    raise IndexError(i)


def _prefer(candidates: Sequence[str], preferred: Sequence[str], i: int, keep: bool) -> str:
    """``candidates[i]``, moved on to the next preferred candidate (in their order) unless it is
    preferred itself, there is none, or ``keep``.

    A pick that depends on the executions there are only where it must: drop a step that
    touched another execution, and the pick stays the same (steps shrink one at a time).
    """
    chosen = candidates[i % len(candidates)]
    if keep or not preferred or chosen in preferred:
        return chosen
    n = len(candidates)
    for k in range(1, n):
        nxt = candidates[(i + k) % n]
        if nxt in preferred:
            return nxt
    return preferred[0]


def _message(
    c: Chooser, p: Pools, mine: Mapping[str, Any], ids: Sequence[str], kinds: Kinds
) -> Event:
    m, t, keep, e = c.index(len(p.messages), len(ids), 4, 64)
    r, subject, payload = p.messages[m]
    custom = kinds.message_strategies.get(r.subject)
    if custom is not None:
        return Message(subject, c.value(custom))
    if payload is _EDGE:
        edge = p.edge_messages[r.id]
        payload = edge[e % len(edge)]
    if r.state_key is not None:
        # Mostly where it can do something: an id with no execution yet for a rule that starts
        # executions, else one that exists.
        starts = p.starts.get(r.id, False)
        alias = p.aliases.get(r.id, {})
        favoured = [i for i in ids if (alias.get(i, i) not in mine) == starts]
        target = _prefer(ids, favoured, t, keep == 0) if ids else "e1"
        payload = _steer(payload, r.state_key, target)
    return Message(subject, payload)


def _callback(
    c: Chooser, p: Pools, mine: Mapping[str, Any], ids: Sequence[str], kinds: Kinds
) -> Event:
    d = p.definition
    known = [*ids, *sorted(i for i in mine if i not in ids)]
    waiting = [i for i in known if i in mine and mine[i].status is Status.WAITING]
    t, keep = c.index(len(known), 10)
    target = _prefer(known, waiting, t, keep == 0)  # nine in ten answer a waiting execution
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


def _write(c: Chooser, p: Pools, mine: Mapping[str, Any], ids: Sequence[str]) -> Event:
    d = p.definition
    t, keep, s, ph, it, e = c.index(
        len(ids), 2, len(p.states), len(p.phases), len(p.iterations), 10
    )
    # Half of the writes start an execution where there is none (an edit of one that has
    # ended changes nothing), the others edit any.
    live = [i for i in ids if i not in mine or not mine[i].is_terminal]
    target = _prefer(ids, live, t, keep == 0) if ids else "e1"
    states = p.edge_states if e == 0 else p.states  # one in ten: an edge case of the state
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
