"""``WorkflowMachine``: a Hypothesis state machine that drives a ``TestEngine`` and checks its invariants."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import anyio
import anyio.from_thread
import hypothesis
import msgspec
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant
from hypothesis.stateful import rule as _machine_rule

from reactive.codecs import decode, encode_json
from reactive.compiled import ActionType, RuleDef, TriggerMode, WorkflowDef
from reactive.dsl.context import RuleContext
from reactive.dsl.state import ExecutionState, Status
from reactive.dsl.workflow import Workflow, definition_of
from reactive.subjects import matches_pattern
from reactive.testing._engine import TestEngine
from reactive.testing._events import DEFAULT_EXECUTION_IDS, Event, Restart, events
from reactive.testing._invariants import (
    Terminal,
    check_fields,
    event_subject,
    iso_time,
    lifecycle_counts,
    lifecycle_subjects,
    nonwriting_counts,
    request_counts,
    time_points,
)
from reactive.testing._states import _TERMINAL
from reactive.testing._values import SearchStrategy

__all__ = ["WorkflowMachine", "workflow_machine"]

T = TypeVar("T")


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
        self._terminal: dict[tuple[str, str], Terminal] = {}
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
                for t in time_points(d, state)
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
            lifecycle = lifecycle_counts(d, published)
            requests = request_counts(published)
            fired = nonwriting_counts(d, published)
            for key, revision, raw, state in self._entries(d):
                exec_id = d.execution_id_for(key)
                present.add(key)
                self._seen.add((d.id, key))
                where = f"{d.id}/{exec_id} (status {state.status.value}, phase {state.phase!r})"
                check_fields(d, exec_id, state, where)
                terminal = state.status in _TERMINAL
                if not terminal:
                    if state.deadline is not None:
                        assert state.deadline.timestamp() > now, (
                            f"{where}: deadline {state.deadline.isoformat()} has passed "
                            f"(clock {iso_time(now)}) but the execution is not timed out"
                        )
                    if state.status is Status.WAITING and state.task_deadline is not None:
                        assert state.task_deadline.timestamp() > now, (
                            f"{where}: task {state.pending_task_id} timed out at "
                            f"{state.task_deadline.isoformat()} (clock {iso_time(now)}) but is still awaited"
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
                    self._terminal[(d.id, key)] = Terminal(
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
                expected = 1 if terminal and event_subject(d, state.status) else 0
                got = lifecycle.get(state.id or exec_id, 0)
                assert got == expected, (
                    f"{where}: {got} lifecycle event(s) on {sorted(lifecycle_subjects(d))}, expected {expected}"
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
