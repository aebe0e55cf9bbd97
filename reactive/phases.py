"""A workflow's rules as a graph of phases, read from its compiled definition and its code.

The rule-set lint (``reactive.lint``) reports what it proves; the property machine
(``reactive.testing``) biases its events toward the phases that lead to completion and
sizes its examples by it.

Each rule enters in the phases its conditions require (``phase_is``,
``phase_in``, and what combines them), or in any phase. What it does is read
from the source of its method (and, for an async rule, of its result
handler), one path at a time: the phase each path assigns (``st.phase =
"x"``, ``complete("x")``, a mutator's ``transition("x")``) and the terminal
status it sets (``complete()``, ``fail()``, ``escalate()``, the
``complete=True`` action). Branches (``if``, conditional expressions, loops,
``try``) fork paths; a phase assigned from anything but a constant is
*dynamic* (unknown here; exploration decides).

The graph's nodes are phases; an execution starts in its state type's default
phase (usually ``""``). Only the rules move it: the engine's own ends (the
workflow's timeout, a task's timeout, a worker's error) are kept apart.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from reactive.compiled import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.state import Status

__all__ = ["Model", "Outcome", "RuleModel", "model_of", "outcomes_of"]

_STATUS_CALLS = {
    "complete": Status.COMPLETED,
    "fail": Status.FAILED,
    "escalate": Status.ESCALATED,
    "time_out": Status.TIMED_OUT,
    "cancel": Status.CANCELLED,
}
_MAX_PATHS = 64
DYNAMIC = "<dynamic>"  # a phase assigned from something that is not a constant


@dataclass(frozen=True)
class Outcome:
    """One path through a method: the phase it leaves (None: unchanged) and the status it sets."""

    phase: str | None = None
    status: Status | None = None
    iterates: bool = False  # it changes the iteration

    def then(self, other: Outcome) -> Outcome:
        """This path followed by ``other`` (a later assignment wins; a terminal status stays)."""
        return Outcome(
            other.phase if other.phase is not None else self.phase,
            self.status or other.status,
            self.iterates or other.iterates,
        )


@dataclass
class RuleModel:
    """What one rule does, as far as its code tells."""

    rule: RuleDef
    enters: frozenset[str] | None  # phases in which its conditions can hold (None: any)
    outcomes: list[Outcome]  # of its method (a state-writing rule), after its action
    results: list[Outcome] = field(default_factory=list)  # of its result handler (async)
    known: bool = True  # its source could be read

    @property
    def writes(self) -> bool:
        return self.rule.writes_state

    def runs_in(self, phase: str) -> bool:
        return self.enters is None or phase in self.enters


@dataclass
class Model:
    """The phase graph of one workflow."""

    workflow: WorkflowDef
    rules: list[RuleModel]
    initial: str
    starts: bool  # a message rule starts executions (or only outside writers do)
    edges: dict[str, set[str | Status]] = field(default_factory=dict)
    named: set[str] = field(default_factory=set)  # every phase a condition or a rule names
    # What the workflow's own handlers (limit, cancellation) make of any phase.
    anywhere: list[Outcome] = field(default_factory=list)

    def successors(self, phase: str) -> set[str | Status]:
        return self.edges.get(phase, set())

    def reachable(self) -> set[str]:
        """Phases the rules can take an execution to, from its first phase."""
        seen = {self.initial}
        todo = [self.initial]
        while todo:
            for nxt in self.successors(todo.pop()):
                if not isinstance(nxt, Status) and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def leads_to(self, phase: str, targets: Iterable[Status]) -> bool:
        """Whether the rules can take an execution from ``phase`` to one of ``targets``."""
        wanted = set(targets)
        seen = {phase}
        todo = [phase]
        while todo:
            for nxt in self.successors(todo.pop()):
                if isinstance(nxt, Status):
                    if nxt in wanted:
                        return True
                elif nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    def depth(self) -> int:
        """How many events (messages, results) it takes the rules to end an execution.

        The fewest along any path from the first phase to completion (or, if the rules
        cannot complete it, to any terminal status): the start (a message, or an outside
        writer) counts one, so does every result an async rule waits for.
        """
        costs: dict[str, list[tuple[int, str | Status]]] = {}
        for m in self.rules:
            if not m.writes:
                continue
            is_async = m.rule.action is ActionType.PUBLISH_ASYNC
            cost = 1 if is_async or m.rule.mode is not TriggerMode.STATE else 0
            for p in sorted(self.named) if m.enters is None else sorted(m.enters):
                for o in m.results if is_async else m.outcomes:
                    nxt: str | Status | None = o.status or (
                        o.phase if o.phase not in (None, DYNAMIC) else None
                    )
                    if nxt is not None and nxt != p:
                        costs.setdefault(p, []).append((cost, nxt))
        for wanted in ({Status.COMPLETED}, set(Status) - {Status.PENDING, Status.RUNNING}):
            first = 0 if self.starts else 1  # a start message is the rule's own cost
            best: dict[str | Status, int] = {self.initial: first}
            todo: list[tuple[int, str | Status]] = [(first, self.initial)]
            while todo:
                todo.sort(key=lambda t: t[0])
                dist, here = todo.pop(0)
                if isinstance(here, Status):
                    if here in wanted:
                        return dist
                    continue
                for cost, nxt in costs.get(here, []):
                    if dist + cost < best.get(nxt, 1 << 30):
                        best[nxt] = dist + cost
                        todo.append((dist + cost, nxt))
        return 1 + sum(1 for m in self.rules if m.rule.action is ActionType.PUBLISH_ASYNC)

    def idle(self) -> set[str]:
        """Reachable phases in which no rule that writes state runs: an execution stays there."""
        return {
            p
            for p in self.reachable()
            if not any(m.writes and m.runs_in(p) for m in self.rules)
            and not (p == self.initial and self.starts)
        }

    def terminal_statuses(self, *, outside: bool = False) -> set[Status]:
        """Terminal statuses an execution can reach through the rules and the engine's own ends
        (a worker's error, a task's timeout, max iterations, the timeout of an execution left
        with nothing to do). With ``outside``, also through what happens to it from outside
        (an outside writer's state, an engine down past its deadline): any with a timeout."""
        d = self.workflow
        reached: set[Status] = set()
        for p in self.reachable():
            reached |= {s for s in self.successors(p) if isinstance(s, Status)}
        if d.timeout and (outside or self.idle() or (d.has_async and d.timeout <= d.task_timeout)):
            reached.add(Status.TIMED_OUT)
        if d.has_async:
            reached.add(Status.FAILED)  # a worker's error, a result that does not decode
            reached.add(Status.FAILED if d.on_task_timeout == "fail" else Status.ESCALATED)
        if d.max_iterations and any(o.iterates for m in self.rules for o in m.outcomes + m.results):
            reached.add(Status.ESCALATED)
        return reached


# --------------------------------------------------------------------------- reading code


def _source_tree(fn: Callable[..., Any]) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def _constant(node: ast.expr, fn: Callable[..., Any]) -> list[str] | None:
    """The strings ``node`` can be (a constant, a conditional of constants, a str global), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        a, b = _constant(node.body, fn), _constant(node.orelse, fn)
        return None if a is None or b is None else a + b
    if isinstance(node, ast.Name):
        value = _lookup(fn, node.id)
        if isinstance(value, str):
            return [value]
    return None


def _lookup(fn: Callable[..., Any], name: str) -> Any:
    code = getattr(fn, "__code__", None)
    closure = getattr(fn, "__closure__", None) or ()
    if code is not None and name in code.co_freevars:
        try:
            return closure[code.co_freevars.index(name)].cell_contents
        except (ValueError, IndexError):
            return None
    return getattr(fn, "__globals__", {}).get(name)


class _Paths:
    """Walks a function body, forking at branches, collecting each path's Outcome."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def block(
        self, stmts: list[ast.stmt], paths: list[Outcome]
    ) -> tuple[list[Outcome], list[Outcome]]:
        """(paths still running after ``stmts``, paths that returned or raised in them)."""
        done: list[Outcome] = []
        for stmt in stmts:
            if not paths:
                break
            paths, ended = self.stmt(stmt, paths)
            done += ended
        return _cap(paths), _cap(done)

    def stmt(self, s: ast.stmt, paths: list[Outcome]) -> tuple[list[Outcome], list[Outcome]]:
        if isinstance(s, ast.Return):
            effect = self.effects(s.value) if s.value is not None else [Outcome()]
            return [], [p.then(e) for p in paths for e in effect]
        if isinstance(s, ast.Raise):
            return [], [p.then(Outcome(status=Status.FAILED)) for p in paths]
        if isinstance(s, ast.If):
            a, a_done = self.block(s.body, paths)
            b, b_done = self.block(s.orelse, paths)
            return a + b, a_done + b_done
        if isinstance(s, ast.For | ast.AsyncFor | ast.While):
            once, done = self.block(s.body, paths)
            rest, rest_done = self.block(s.orelse, paths + once)
            return rest, done + rest_done
        if isinstance(s, ast.With | ast.AsyncWith):
            return self.block(s.body, paths)
        if isinstance(s, ast.Try):
            body, done = self.block(s.body, paths)
            out = body
            for h in s.handlers:
                caught, caught_done = self.block(h.body, paths + body)
                out, done = out + caught, done + caught_done
            out, more = self.block(s.orelse, out)
            final, final_done = self.block(s.finalbody, out)
            return final, done + more + final_done
        if isinstance(s, ast.Match):
            out, done = [], []
            for case in s.cases:
                a, a_done = self.block(case.body, paths)
                out, done = out + a, done + a_done
            return out + paths, done
        if isinstance(s, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            return paths, []
        effect = self.effects(s)
        return [p.then(e) for p in paths for e in effect], []

    def effects(self, node: ast.AST) -> list[Outcome]:
        """What one simple statement (or expression) does to the phase and status."""
        out = [Outcome()]
        for n in ast.walk(node):
            if isinstance(n, ast.Assign | ast.AnnAssign | ast.AugAssign):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                # (``st.phase, st.why = "refund", reason``: each target with its value.)
                pairs: list[tuple[ast.expr, ast.expr | None]] = []
                for t in targets:
                    if isinstance(t, ast.Tuple) and isinstance(n.value, ast.Tuple):
                        pairs += zip(t.elts, n.value.elts, strict=False)
                    else:
                        pairs.append((t, n.value))
                for t, value in pairs:
                    if isinstance(t, ast.Attribute) and t.attr == "phase" and value is not None:
                        names = _constant(value, self.fn)
                        out = [o.then(Outcome(phase=p)) for o in out for p in (names or [DYNAMIC])]
                    elif isinstance(t, ast.Attribute) and t.attr == "iteration":
                        out = [o.then(Outcome(iterates=True)) for o in out]
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
                name = n.func.attr
                if name in _STATUS_CALLS:
                    phase = None
                    if name == "complete" and n.args:
                        names = _constant(n.args[0], self.fn)
                        phase = names[0] if names else DYNAMIC
                    out = [o.then(Outcome(phase, _STATUS_CALLS[name])) for o in out]
                elif name == "set_phase" and n.args:
                    names = _constant(n.args[0], self.fn) or [DYNAMIC]
                    out = [o.then(Outcome(phase=p)) for o in out for p in names]
                elif name in ("increment_iteration", "set_iteration"):
                    out = [o.then(Outcome(iterates=True)) for o in out]
        return out


def _cap(paths: list[Outcome]) -> list[Outcome]:
    return list(dict.fromkeys(paths))[:_MAX_PATHS]


def outcomes_of(fn: Callable[..., Any] | None) -> list[Outcome] | None:
    """Each path's Outcome through ``fn`` (a method, handler or mutator); None if its source is unknown."""
    if fn is None:
        return [Outcome()]
    fn = getattr(fn, "fn", fn)  # a RuleMethod
    if getattr(fn, "__name__", "") == "_transition":  # reactive.dsl.mutators.transition
        phase = _lookup(fn, "phase")
        return [Outcome(phase=phase if isinstance(phase, str) else DYNAMIC)]
    if getattr(fn, "__name__", "") == "_increment":
        return [Outcome(iterates=True)]
    if getattr(fn, "__name__", "") == "_chain":
        parts = _lookup(fn, "mutators") or ()
        out = [Outcome()]
        for m in parts:
            each = outcomes_of(m)
            if each is None:
                return None
            out = _cap([a.then(b) for a in out for b in each])
        return out
    tree = _source_tree(fn)
    if tree is None:
        return None
    body = tree.body[0] if isinstance(tree, ast.Module) and tree.body else None
    if not isinstance(body, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
        return None
    stmts = body.body if isinstance(body, ast.FunctionDef | ast.AsyncFunctionDef) else []
    walker = _Paths(fn)
    running, ended = walker.block(list(stmts), [Outcome()])
    return _cap(running + ended) or [Outcome()]


# --------------------------------------------------------------------------- the model


def model_of(d: WorkflowDef) -> Model:
    """The phase graph of ``d`` (from its definition and its code)."""
    initial = d.state_type().phase
    rules: list[RuleModel] = []
    for r in d.rules:
        method = getattr(d.cls, r.method_name, None)
        own = outcomes_of(method)
        known = own is not None
        paths = own or [Outcome()]
        if r.mutator is not None:
            before = outcomes_of(r.mutator)
            known = known and before is not None
            paths = _cap([a.then(b) for a in (before or [Outcome()]) for b in paths])
        if r.action is ActionType.COMPLETE:
            paths = [p.then(Outcome(status=p.status or Status.COMPLETED)) for p in paths]
        elif not r.writes_state:
            paths = [Outcome()]
        results: list[Outcome] = []
        if r.action is ActionType.PUBLISH_ASYNC:
            paths = [Outcome(iterates=p.iterates) for p in paths]  # it parks; its result moves on
            results = []
            # Its result's handler, and its failure handlers: each moves it on from waiting.
            for name in (r.result_handler_name, r.error_handler_name, r.timeout_handler_name):
                handler = getattr(d.cls, name or "", None)
                if handler is None and name is not r.result_handler_name:
                    continue
                found = outcomes_of(handler) if handler is not None else [Outcome()]
                known = known and found is not None
                results += found or [Outcome()]
        enters = r.phases
        if enters is None and r.mode is TriggerMode.MESSAGE_AND_STATE and r.max_firings == 1:
            enters = frozenset({initial})  # it takes an execution in once: when it starts it
        rules.append(RuleModel(r, enters, paths, results, known))
    starts = any(r.mode is TriggerMode.MESSAGE_AND_STATE for r in d.rules)
    model = Model(d, rules, initial, starts)
    # The workflow's own handlers (the max-iterations limit, a cancellation) may move an
    # execution on from any phase.
    for name in (d.limit_handler_name, d.cancel_handler_name):
        handler = getattr(d.cls, name or "", None)
        if handler is not None:
            model.anywhere += [o for o in outcomes_of(handler) or [] if o.phase]
    model.named = {initial}
    for m in rules:
        model.named |= set(m.enters or ())
        model.named |= {o.phase for o in m.outcomes + m.results if o.phase not in (None, DYNAMIC)}
    model.named |= {o.phase for o in model.anywhere if o.phase not in (None, DYNAMIC)}
    every = sorted(model.named)
    for m in rules:
        if not m.writes:
            continue
        for p in every if m.enters is None else sorted(m.enters):
            nexts = model.edges.setdefault(p, set())
            for o in m.results if m.rule.action is ActionType.PUBLISH_ASYNC else m.outcomes:
                if o.status is not None:
                    nexts.add(o.status)  # (the phase it ends in is where it stays: terminal)
                elif o.phase == DYNAMIC:
                    nexts.update(q for q in every if q != p)  # anywhere, as far as we know
                elif o.phase is not None and o.phase != p:
                    nexts.add(o.phase)
    for o in model.anywhere:
        for p in every:
            if o.phase not in (None, DYNAMIC, p):
                model.edges.setdefault(p, set()).add(o.phase)
    return model
