"""``WorkflowMachine``: a Hypothesis state machine that drives a ``TestEngine`` and checks its invariants."""

from __future__ import annotations

import functools
import sys
import threading
import time
import unittest
import warnings
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import anyio
import hypothesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, run_state_machine_as_test
from hypothesis.stateful import rule as _machine_rule

from reactive.compiled import WorkflowDef
from reactive.dsl.state import ExecutionState
from reactive.dsl.workflow import Workflow, definition_of
from reactive.phases import model_of
from reactive.testing._checks import Checks, Invariant, shared_cooldown_end
from reactive.testing._coverage import Coverage, ExampleCoverage, UnreachedWarning
from reactive.testing._engine import TestEngine, nothing_else_ready
from reactive.testing._events import DEFAULT_EXECUTION_IDS, Event, Restart, events
from reactive.testing._host import EngineHost
from reactive.testing._invariants import Execution, time_points
from reactive.testing._progress import (
    Chooser,
    Drawing,
    Kinds,
    Pools,
    Seeded,
    draw_event,
    pools_for,
)
from reactive.testing._states import _TERMINAL
from reactive.testing._values import SearchStrategy

__all__ = ["WorkflowMachine", "machine_settings", "workflow_machine", "workflow_test"]

T = TypeVar("T")

# The options of events() that the machine's own (progress-biased) events honour; any other
# event option makes it draw from events() instead.
_PROGRESS_OPTIONS = frozenset(
    {"include_writes", "bad_input", "message_strategies", "result_strategies"}
)


def machine_settings(**changes: Any) -> hypothesis.settings:
    """The settings a machine's ``TestCase`` runs with unless told otherwise.

    Hypothesis's defaults (and your settings profile) except: no deadline (an
    example runs an engine), no health checks about slow or large data, and
    no explain phase (it replays a failing example many times over; turn it
    on with ``phases=list(Phase)`` when a failure's cause is not plain from
    its steps). ``changes`` override any of them; a machine's own TestCase
    also sets ``stateful_step_count`` (see ``WorkflowMachine.steps``).
    """
    options: dict[str, Any] = {
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
        "phases": [p for p in Phase if p is not Phase.explain],
    }
    options.update(changes)
    return hypothesis.settings(**options)


def default_steps(definitions: Sequence[WorkflowDef], execution_ids: Sequence[str]) -> int:
    """Steps an example takes by default: enough to run every execution of the pool to its end.

    An execution needs ``depth`` events (its start, and a result per async step: see
    ``Model.depth``); about half of the steps move one on, so twice that per execution id;
    at least 12, at most Hypothesis's default of 50. Past that, an example
    mostly sends events to executions that have ended: more examples find more than longer ones.
    """
    depth = max(model_of(d).depth() for d in definitions)
    return max(12, min(50, 2 * len(execution_ids) * depth))


# The machine whose steps are being drawn, on this thread (Hypothesis runs one example at a
# time: it builds the machine, then draws and runs its steps). Cheaper than st.runner().
_running = threading.local()


def _running_machine() -> WorkflowMachine:
    machine: WorkflowMachine | None = getattr(_running, "machine", None)
    if machine is None:
        raise RuntimeError("a WorkflowMachine's events are drawn only while it runs")
    return machine


@st.composite
def _drawn_event(draw: st.DrawFn) -> Event:
    return _running_machine().draw_event(Drawing(draw))


def _seeded_event(seed: int) -> Event:
    return _running_machine().draw_event(Seeded(seed))


# Hypothesis prints a mapped value as the call that made it (``_seeded_event(412)``) when that
# is valid Python and shorter than its repr; a name that is not an identifier makes it print
# the event itself, so a failing example reads as the events it is made of.
_seeded_event.__name__ = "event from seed"


# One choice per step: a seed (a few thousand of them: Hypothesis draws small indices of a
# large range far more often than large ones, and seeds should differ).
_SEEDS = st.sampled_from(range(4096)).map(_seeded_event)


class WorkflowMachine(RuleBasedStateMachine):
    """Drives a ``TestEngine`` with events and checks the engine's invariants.

    Subclass it and set ``workflows`` (and any option below), or use
    ``workflow_machine(...)`` / ``workflow_test(...)``; run it with
    ``YourMachine.TestCase`` (from a synchronous test: the engine runs on an
    event loop of the test's own thread for the whole example; every step
    applies one event and runs the loop until the engine has settled). The events are biased toward
    progress (see ``reactive.testing._progress``: callbacks answer waiting
    executions with results their handlers accept, messages go to the
    executions of ``execution_ids``, the clock moves mostly by a second, writes
    and restarts are rare); override ``event_strategy`` to draw your own, or
    give ``event_options`` that only ``events()`` knows to draw from it.

    Class options: ``workflows``, ``execution_ids``, ``phases`` (workflow id
    -> phases for state writes), ``max_advance``, ``event_options``
    (``include_writes``, ``bad_input``, ``message_strategies``,
    ``result_strategies``: see ``events``), ``engine_options`` (for
    ``TestEngine``), ``final_rounds``, ``restarts``, ``check_rules_at_rest``,
    ``execution_invariants`` (functions of an ``Execution``, run on every
    execution after every step), ``report_unreached`` (warn at the end of a run that
    passed of the rules, results, phases and terminal statuses it never
    reached), ``engines`` (how many engine processes share the backend and the
    clock: with two or more, compare-and-set conflicts, firing claims and
    shared consumers are exercised; events go through the first, which is also
    the one ``Restart`` replaces).

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
    11. ``execution_invariants``: each gets the ``Execution`` (state, timeline, the
        messages it published); and ``check_execution(definition, key, state)``,
        a hook for your own checks.

    At teardown (only when the run did not already fail), the clock is moved
    past every deadline, task deadline and cooldown end recorded in the live
    executions' states, in up to ``final_rounds`` rounds (a round can start new
    tasks), and all of the above is checked again. With 4 and 9 that means:
    every execution is terminal, or waiting on a task started in the last
    round, or running with no deadline (none, or in the future only if the
    rounds ran out) and with no rule left that should fire. Then the example
    reports what it reached to Hypothesis's statistics (``ExampleCoverage``).

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
    execution_invariants: ClassVar[Sequence[Invariant]] = ()
    report_unreached: ClassVar[bool] = True

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
        """The events the machine draws: its own (``draw_event``), or ``events(...)`` of every workflow."""
        if set(cls.event_options) <= _PROGRESS_OPTIONS:
            custom = any(
                cls.event_options.get(k) for k in ("message_strategies", "result_strategies")
            )
            return _drawn_event() if custom else _SEEDS
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

    @classmethod
    @functools.cache
    def _to_test_case(cls) -> type[Any]:
        # Hypothesis's own, with the machine's settings and a word on what the run never reached.
        steps = default_steps([definition_of(w) for w in cls.workflows], cls.execution_ids)

        class TestCase(unittest.TestCase):
            settings = machine_settings(stateful_step_count=steps)

            def runTest(self) -> None:
                cls.coverage = Coverage([definition_of(w) for w in cls.workflows])
                run_state_machine_as_test(cls, settings=self.settings)
                unreached = cls.coverage.unreached() if cls.report_unreached else []
                if unreached:
                    warnings.warn(
                        UnreachedWarning(
                            f"{cls.__name__}, {cls.coverage.examples} examples: "
                            + "; ".join(unreached)
                        ),
                        stacklevel=1,
                    )

            runTest.is_hypothesis_test = True  # type: ignore[attr-defined]
            runTest._hypothesis_state_machine_class = cls  # type: ignore[attr-defined]

        TestCase.__name__ = cls.__name__ + ".TestCase"
        TestCase.__qualname__ = cls.__qualname__ + ".TestCase"
        return TestCase

    coverage: ClassVar[Coverage]  # what the last run reached (set by TestCase, or on first use)

    def __init__(self) -> None:
        super().__init__()
        cls = type(self)
        self.definitions: list[WorkflowDef] = [definition_of(w) for w in self.workflows]
        if "coverage" not in cls.__dict__:
            cls.coverage = Coverage(self.definitions)
        hook = (
            None if cls.check_execution is WorkflowMachine.check_execution else self.check_execution
        )
        self.checks = Checks(
            self.definitions,
            rules_at_rest=self.check_rules_at_rest,
            invariants=self.execution_invariants,
            hook=hook,
        )
        self._pools: list[Pools] | None = None
        self.host = EngineHost()
        try:
            self.te: TestEngine = self.host.start(self._make_engine())
            self._others: list[TestEngine] = [
                self.host.start(self._make_engine(self.te)) for _ in range(self.engines - 1)
            ]
        except BaseException:
            self.host.close()
            raise
        _running.machine = self

    def _make_engine(self, previous: TestEngine | None = None) -> TestEngine:
        # The claim sweep only matters for claims an engine left when it died; a new engine
        # sweeps when it starts, and a sweep schedules itself for every claim it finds. Every
        # 30 s (the default), an advance by an hour would run 120 sweeps for nothing.
        options = {"sweep_interval": 86_400.0, **self.engine_options}
        if previous is None:
            return TestEngine(*self.workflows, **options)
        return TestEngine(
            *self.workflows, clock=previous.clock, backend=previous.backend, **options
        )

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the engine and start a new one (new instance id, empty memory) on the same
        backend and clock, ``down_for`` seconds later."""
        old = self.te
        self.host.stop(old)
        if down_for:
            old.clock.advance(down_for)
        self.te = self.host.start(self._make_engine(old))

    # ------------------------------------------------------------------ running

    def draw_event(self, chooser: Chooser) -> Event:
        """The next event, given the executions there are now (see ``reactive.testing._progress``)."""
        if self._pools is None:
            ids = tuple(self.execution_ids)
            self._pools = [
                pools_for(d, ids, _tuple((self.phases or {}).get(d.id)), self.max_advance)
                for d in self.definitions
            ]
        options = self.event_options
        kinds = Kinds(
            writes=options.get("include_writes", True),
            restarts=self.restarts,
            bad_input=options.get("bad_input", False),
            message_strategies=options.get("message_strategies") or {},
            result_strategies=options.get("result_strategies") or {},
        )
        if self.checks.stale:
            self.checks.refresh(self.te)
        return draw_event(chooser, self._pools, self.checks.live, self.execution_ids, kinds)

    def apply(self, event: Event) -> None:
        """Apply one event in the engine's event loop and wait until it settles."""
        try:
            if isinstance(event, Restart):
                self.restart(event.down_for)
            else:
                self.run(event.apply, self.te)
            if self._others:
                self.run(self.settle)
        except TimeoutError:
            raise AssertionError(
                f"the engine did not settle within {self.te.settle_timeout}s after {event!r} "
                "(rules that keep triggering each other?)"
            ) from None
        self.checks.stale = True  # (the invariants read the executions again, right after)

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run an async function in the engine's event loop."""
        return self.host.run(fn, *args)

    async def settle(self) -> None:
        """Wait until every engine process and the backend are at rest."""
        engines = [self.te, *self._others]
        give_up = time.monotonic() + self.te.settle_timeout
        quiet = 0
        while quiet < 8:
            await anyio.sleep(0)
            if self.te.backend.idle() and all(
                t.engine.idle and t.engine.ready and t._responders_busy == 0 for t in engines
            ):
                if nothing_else_ready():
                    return
                quiet += 1
            else:
                quiet = 0
                if time.monotonic() > give_up:
                    raise TimeoutError(f"not at rest after {self.te.settle_timeout}s")

    def teardown(self) -> None:
        try:
            if sys.exc_info()[0] is None:  # not when the run already failed
                try:
                    self.run(self._finish)
                except TimeoutError:
                    raise AssertionError(
                        f"the engine did not settle within {self.te.settle_timeout}s while the clock "
                        "was moved past every deadline (rules that keep triggering each other?)"
                    ) from None
                self.checks.check_all(self.te)
                reached = self.reached()
                reached.report()
                type(self).coverage.add(reached)
        finally:
            if getattr(_running, "machine", None) is self:
                _running.machine = None
            self.host.close()

    def reached(self) -> ExampleCoverage:
        """What this example reached: rules fired, results handled, phases, how executions ended."""
        out = ExampleCoverage()
        for d in self.definitions:
            published = self.checks.published[d.id]
            out.rules.update((d.id, r) for r in published.fired_without_state)
            for key, _rev, _raw, state in self.checks.entries(self.te, d):
                out.add(d, state, published.fired.get(d.execution_id_for(key), ()))
        return out

    # ------------------------------------------------------------------ checks

    @invariant()
    def engine_invariants(self) -> None:
        self.checks.check_all(self.te)

    def check_execution(self, definition: WorkflowDef, key: str, state: ExecutionState) -> None:
        """Your own per-execution checks, run after every step and at teardown. Raise AssertionError."""

    def execution(
        self, workflow: type[Workflow] | Workflow | str, execution_id: str
    ) -> Execution | None:
        """What the invariants see of one execution now: state, timeline, published messages."""
        wf_id = workflow if isinstance(workflow, str) else definition_of(workflow).id
        d = next(d for d in self.definitions if d.id == wf_id)
        return self.checks.execution(self.te, d, d.key(execution_id))

    async def _finish(self) -> None:
        te = self.te
        for _ in range(self.final_rounds):
            now = te.clock.now()
            due = [
                t
                for d in self.definitions
                for _key, _rev, _raw, state in self.checks.entries(te, d)
                if state.status not in _TERMINAL
                for t in time_points(d, state)
                if t >= now
            ] + [
                end
                for d in self.definitions
                for r in d.rules
                if (end := shared_cooldown_end(te, d, r)) is not None and end >= now
            ]
            if not due:
                break
            await te.advance(max(due) - now + 1.0)
            await self.settle()


def _tuple(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return tuple(values) if values is not None else None


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
    invariants: Sequence[Invariant] = (),
    report_unreached: bool = True,
    settings: hypothesis.settings | None = None,
    check_execution: Callable[[WorkflowMachine, WorkflowDef, str, ExecutionState], None]
    | None = None,
    name: str | None = None,
    **event_options: Any,
) -> type[WorkflowMachine]:
    """A ``WorkflowMachine`` subclass for ``workflows``: ``workflow_machine(MyWorkflow).TestCase`` is a test.

    ``execution_ids``, ``phases`` (workflow id -> phases for state writes),
    ``max_advance`` and ``**event_options`` (``include_writes=False``,
    ``bad_input=True``, ``message_strategies=...``, ``result_strategies=...``:
    see ``events``) shape the events; ``engine_options`` go to ``TestEngine``;
    ``engines``, ``restarts``, ``check_rules_at_rest``, ``final_rounds`` and
    ``report_unreached`` are the ``WorkflowMachine`` options of those names,
    ``invariants`` its ``execution_invariants``; ``check_execution`` adds your own per-execution check;
    ``settings`` become ``TestCase.settings`` (default: ``machine_settings()``).
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
        "execution_invariants": tuple(invariants),
        "report_unreached": report_unreached,
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


def workflow_test(
    *workflows: type[Workflow] | Workflow,
    invariants: Sequence[Invariant] = (),
    **options: Any,
) -> type[unittest.TestCase]:
    """A property test of ``workflows``: assign it to a ``Test...`` name and pytest runs it.

    ``TestOrders = workflow_test(OrderSaga)`` checks every invariant
    ``WorkflowMachine`` documents, plus ``invariants`` (functions of an
    ``Execution`` that raise AssertionError), over ``machine_settings()``'s
    examples of progress-biased events; ``options`` are ``workflow_machine``'s.
    """
    frame = sys._getframe(1).f_globals.get("__name__", __name__)
    machine = workflow_machine(*workflows, invariants=invariants, **options)
    machine.__module__ = frame
    test = machine.TestCase
    test.__module__ = frame
    return cast(type[unittest.TestCase], test)
