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

from reactive.testing._events import (
    DEFAULT_EXECUTION_IDS as DEFAULT_EXECUTION_IDS,  # events()' default, kept importable
)
from reactive.testing._events import (
    Advance,
    BadMessage,
    Callback,
    Event,
    Message,
    Restart,
    WriteState,
    events,
    phases_of,
)
from reactive.testing._machine import WorkflowMachine, workflow_machine
from reactive.testing._states import execution_ids, states
from reactive.testing._values import messages, values

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

# Shown as reactive.testing.strategies.X, where users import them from. The event
# dataclasses keep their module: dataclasses and Hypothesis resolve their annotations there.
for _obj in (
    WorkflowMachine,
    events,
    execution_ids,
    messages,
    phases_of,
    states,
    values,
    workflow_machine,
):
    _obj.__module__ = __name__
del _obj
